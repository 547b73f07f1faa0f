"""params.yaml is the one source of defaults: where a library dataclass gives a parameter a default,
it is the value params.yaml sets, so the library called without arguments does what `dvc repro` does."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from matrice.method.attribution.common import AttributionConfig
from matrice.data.sources import DatasetConfig
from matrice.data.split import HeldOutSplit
from matrice.experiments.degenerate import DegenerateConfig
from matrice.experiments.edit import EditConfig
from matrice.experiments.inject import InjectConfig
from matrice.finetune import TrainConfig
from matrice.method.selection import SelectionConfig
from matrice.method.uncertainty import AggregationConfig

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())

# dataclass field -> the params.yaml path it stands for
PARAMETERS: dict[type, dict[str, str]] = {
    AttributionConfig: {"steps": "steps", "baseline": "baseline", "integration": "integration",
                        "batch_size": "attribute.batch_size"},
    AggregationConfig: {"layer_norm": "layer_norm", "lang_norm": "lang_norm", "alpha1": "alpha1", "alpha2": "alpha2",
                        "beta1": "beta1", "beta2": "beta2"},
    SelectionConfig: {"tau": "tau", "tau_amig": "tau_amig", "seed": "seed"},
    EditConfig: {"lambda1": "edit.lambda1", "lambda2": "edit.lambda2", "scaling": "edit.scaling",
                 "locality_k": "edit.locality_k", "batch_size": "edit.batch_size", "seed": "seed"},
    InjectConfig: {"lrs": "inject.lrs", "epochs": "inject.epochs", "batch_size": "inject.batch_size",
                   "lora_r": "inject.lora_r", "max_new": "inject.max_new", "max_old": "inject.max_old", "seed": "seed",
                   "seeds": "inject.seeds", "lr_extend": "inject.lr_extend"},
    TrainConfig: {"epochs": "inject.epochs", "batch_size": "inject.batch_size", "seed": "seed"},
    HeldOutSplit: {"localisation": "attribute.templates_per_language"},
    DegenerateConfig: {"t_high": "degenerate.t_high", "t_low": "degenerate.t_low",
                       "max_candidates": "degenerate.max_candidates", "max_group": "degenerate.max_group"},
    DatasetConfig: {name: f"dataset.{name}" for name in (
        "source", "languages", "relations", "max_facts_per_relation", "max_templates_per_language", "causal",
        "zh_simplified", "mlama_dir", "mpararel_dir")} | {"seed": "seed"},
}


def param(path: str) -> Any:
    node: Any = PARAMS
    for key in path.split("."):
        node = node[key]
    return node


def _as_lists(value: Any) -> Any:
    """A tuple default reads as the YAML list it is written as."""
    return [_as_lists(v) for v in value] if isinstance(value, tuple) else value


def default(cls: type, name: str) -> Any:
    field = {f.name: f for f in fields(cls)}[name]
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING


@pytest.mark.parametrize("cls", PARAMETERS, ids=lambda cls: cls.__name__)
def test_a_dataclass_default_is_the_params_yaml_value(cls):
    names = {f.name for f in fields(cls)}
    assert set(PARAMETERS[cls]) <= names, f"{cls.__name__} has no field {set(PARAMETERS[cls]) - names}"
    wrong = {name: (default(cls, name), param(path)) for name, path in PARAMETERS[cls].items()
             if default(cls, name) is not MISSING and _as_lists(default(cls, name)) != param(path)}
    assert not wrong, f"{cls.__name__} defaults (dataclass, params.yaml) disagree: {wrong}"


def test_the_check_catches_a_disagreement(monkeypatch):
    monkeypatch.setitem(PARAMS, "tau", 0.3)
    with pytest.raises(AssertionError, match="tau"):
        test_a_dataclass_default_is_the_params_yaml_value(SelectionConfig)


@pytest.mark.parametrize("cls", [cls for cls in PARAMETERS if hasattr(cls, "from_params")], ids=lambda cls: cls.__name__)
def test_a_config_built_from_params_yaml_is_the_default_config(cls):
    """The one place each stage builds its config reads params.yaml into exactly the library's defaults."""
    assert cls.from_params(PARAMS) == cls()


def test_from_params_follows_params_yaml():
    from matrice.experiments.edit import EditConfig

    changed = {**PARAMS, "edit": {**PARAMS["edit"], "lambda1": 2.5, "locality_k": 7}, "seed": 3}
    cfg = EditConfig.from_params(changed)
    assert (cfg.lambda1, cfg.locality_k, cfg.seed) == (2.5, 7, 3)
