"""What every stage shares: params, logging, where a model's prepared files and results live."""

from __future__ import annotations

import argparse
import functools
import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

if TYPE_CHECKING:  # torch and transformers cost seconds to import: only stages that load a model pay
    from matrice.memo import Memo
    from matrice.models.adapter import ModelAdapter

T = TypeVar("T")
PARAMS = Path("params.yaml")
DATASET_DIR = Path("data/dataset")
MODELS_DIR = Path("models")
RESULTS_DIR = Path("results")
REPORTS_DIR = Path("reports")


def load_params(path: Path = PARAMS) -> dict[str, Any]:
    from matrice.io import read_params

    return read_params(path)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def model_args(description: str, options: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse the positional argument every per-model stage takes (the key under `models`), and the
    stage's own `options` if it has any."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model", help="key of the model under `models:` in params.yaml")
    if options:
        options(parser)
    return parser.parse_args()


def model_arg(description: str) -> str:
    return model_args(description).model


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


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the OS. glibc maps every
    large allocation afresh and unmaps it when freed, so a fine-tuning step that allocates gigabytes
    of gradients and optimizer temporaries faults all of it in again, page by page, every step. Same
    arithmetic, same results; the process holds on to its peak memory until it exits. False where
    the C library is not glibc (nothing changes there)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    # glibc reads the threshold as a size_t, so -1 is SIZE_MAX: never trim. The int maximum, 2 GB, is
    # less than one Direct_FT step frees at once (three 671 MB gradient temporaries of the tied
    # embedding, Adam's): the heap's top went back to the OS and the next training faulted it in again.
    never_trim = -1
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, never_trim))


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
    from matrice.method.selection import NeuronSets

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


def evaluation_rule(params: dict[str, Any], queries=None):
    """is_evaluation(query_id): the query's paraphrase (template ≥ attribute.templates_per_language)
    was never attributed, so every experiment can score on queries selection never saw."""
    from matrice.data.schema import load_queries
    from matrice.data.split import HeldOutSplit

    split = HeldOutSplit.from_params(params)
    queries = load_queries(DATASET_DIR / "queries.jsonl") if queries is None else queries
    held_out = {q.query_id: split.is_held_out(q) for q in queries}
    return held_out.__getitem__


@dataclass
class ModelStage:
    """One per-model stage's inputs, each read on first use: the model, its neuron sets, the dataset's
    queries, the probe, the held-out rule and the relation of each fact, and where outputs go."""

    key: str
    params: dict[str, Any]
    args: argparse.Namespace | None = None  # the stage's own command-line options, if it has any
    memo_code: tuple[str, ...] = ()  # the modules computing what the stage's memos store

    @classmethod
    def start(cls, description: str, options: Callable[[argparse.ArgumentParser], None] | None = None,
              memo_code: Sequence[str] = ()) -> "ModelStage":
        """Logging set up, the model key (and any `options`) parsed from the command line, params read.
        ``memo_code`` is hashed here, before any model loads: a memo key names the code this process
        imported, not files edited while it ran."""
        if memo_code:
            from matrice.memo import code_fingerprint

            code_fingerprint(*memo_code)  # cached: every memo of the process reuses this hash
        setup_logging()
        args = model_args(description, options)
        return cls(args.model, load_params(), args, tuple(memo_code))

    def memo(self, name: str) -> "Memo":
        """The memo folder ``name`` of this model's results, keyed by the model's weights, its
        tokenizer and ``memo_code`` (a stage that stores results names the code that computes them)."""
        from matrice.memo import Memo

        if not self.memo_code:
            raise RuntimeError("a stage with a memo must name the code computing its values: "
                               "ModelStage.start(..., memo_code=[module, ...])")
        return Memo.for_model(self.out / name, self.adapter.model, code=self.memo_code,
                              tokenizer=self.adapter.tokenizer)

    def config(self, cls: type[T], section: str) -> T:
        return config_from_params(cls, self.params, section)

    @cached_property
    def adapter(self) -> "ModelAdapter":
        return load_prepared(self.key, self.params)

    def loader(self, **options: Any) -> Callable[..., "ModelAdapter"]:
        """`load_prepared` for this model as a picklable callable (a Ray actor calls it to load its copy)."""
        return functools.partial(load_prepared, self.key, self.params, **options)

    @property
    def model(self) -> dict[str, Any]:
        """The model's entry under `models:` in params.yaml."""
        return model_params(self.params, self.key)

    @cached_property
    def split(self):
        """Which paraphrases localise and which are held out (`attribute.templates_per_language`)."""
        from matrice.data.split import HeldOutSplit

        return HeldOutSplit.from_params(self.params)

    @cached_property
    def sets(self):
        return load_neuron_sets(self.key)

    @cached_property
    def queries(self) -> list:
        from matrice.data.schema import load_queries

        return load_queries(DATASET_DIR / "queries.jsonl")

    @property
    def attributed_queries(self) -> list:
        return queries_of(self.queries, self.sets.facts)

    @cached_property
    def probes(self) -> list[dict]:
        return load_probes(self.key)

    @cached_property
    def rule(self) -> Callable[[str], bool]:
        return evaluation_rule(self.params, self.queries)

    @cached_property
    def relations(self) -> Callable[[str], str]:
        return relation_of(self.queries)

    @property
    def out(self) -> Path:
        return results_dir(self.key)

    @cached_property
    def outputs(self):
        from matrice.io import RunOutputs

        return RunOutputs(results_dir(self.key), REPORTS_DIR / "figures" / self.key, self.key)
