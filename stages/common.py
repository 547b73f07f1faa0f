"""What every stage shares: params, logging, where a model's prepared files and results live."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import yaml

if TYPE_CHECKING:  # torch and transformers cost seconds to import: only stages that load a model pay
    from matrice.models.adapter import ModelAdapter

T = TypeVar("T")
PARAMS = Path("params.yaml")
DATASET_DIR = Path("data/dataset")
MODELS_DIR = Path("models")
RESULTS_DIR = Path("results")
REPORTS_DIR = Path("reports")


def load_params(path: Path = PARAMS) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def model_arg(description: str) -> str:
    """Parse the single positional argument every per-model stage takes: the key under `models`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model", help="key of the model under `models:` in params.yaml")
    return parser.parse_args().model


def config_from_params(cls: type[T], params: dict[str, Any], section: str) -> T:
    """``cls.from_params(params)``, a bad or missing value reported as params.yaml's, section named."""
    try:
        return cls.from_params(params)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"params.yaml: {section}: {exc}") from exc


def model_params(params: dict[str, Any], key: str) -> dict[str, Any]:
    models = params.get("models") or {}
    if key not in models:
        raise SystemExit(f"params.yaml: models.{key} is not defined; defined models: {sorted(models)}")
    return models[key]


def prepared_dir(key: str) -> Path:
    return MODELS_DIR / key


def results_dir(key: str) -> Path:
    return RESULTS_DIR / key


def load_prepared(key: str, params: dict[str, Any], dtype: str | None = None, weights: bool = True) -> ModelAdapter:
    """Load the model `prepare_model` made ready: converted safetensors, or the id/path it points to.
    `weights=False`: tokenizer and shapes only (a Ray driver, which encodes and dispatches)."""
    from matrice.models.loading import load_adapter, load_skeleton

    info_path = prepared_dir(key) / "source.json"
    if not info_path.exists():
        raise SystemExit(f"{info_path} is missing: run the prepare_model stage first (dvc repro)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    cfg = model_params(params, key)
    dtype = dtype or cfg.get("dtype", "float32")
    try:
        if not weights:
            return load_skeleton(info["load_from"], dtype)
        return load_adapter(info["load_from"], cfg.get("device", "auto"), dtype, cfg.get("device_map"))
    except ValueError as exc:
        raise SystemExit(f"params.yaml: models.{key}: {exc}") from exc


def load_neuron_sets(key: str):
    from matrice.selection import NeuronSets

    path = results_dir(key) / "neurons.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run the select stage for model {key} first (dvc repro)")
    return NeuronSets.from_json(path)


def load_probes(key: str) -> list[dict]:
    from matrice.io import read_jsonl

    path = results_dir(key) / "probe.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} is missing: model {key} has not been probed yet (run the probe stage)")
    return read_jsonl(path)


def queries_of(queries, fact_ids) -> list:
    """The queries of the facts that have neuron sets (the attributed facts)."""
    wanted = set(fact_ids)
    return [q for q in queries if q.fact_id in wanted]


def relation_of(queries) -> Callable[[str], str]:
    """fact id -> its relation, from the dataset's queries: the unit every table and verdict averages over."""
    relations = {q.fact_id: q.relation for q in queries}
    return lambda fact: relations.get(fact, fact)


def figure_path(key: str, name: str) -> Path:
    return REPORTS_DIR / "figures" / key / name


def evaluation_rule(params: dict[str, Any]):
    """is_evaluation(query_id): the query's paraphrase (template ≥ attribute.templates_per_language)
    was never attributed, so every experiment can score on queries selection never saw."""
    from matrice.data.schema import load_queries
    from matrice.data.split import HeldOutSplit

    split = HeldOutSplit.from_params(params)
    held_out = {q.query_id: split.is_held_out(q) for q in load_queries(DATASET_DIR / "queries.jsonl")}
    return held_out.__getitem__


def split_empty(sets, methods) -> tuple[list[str], list[str]]:
    """(methods with neurons for some fact, methods empty for every fact): a figure draws the first
    and names the second, so "no neurons" is never drawn as a measured zero."""
    empty = [m for m in methods if all(len(per[m]) == 0 for per in sets.facts.values())]
    return [m for m in methods if m not in empty], empty


def not_drawn_note(empty: list[str], name) -> str:
    return f" ({', '.join(name(m) for m in empty)}: no neurons for any fact, not drawn)" if empty else ""
