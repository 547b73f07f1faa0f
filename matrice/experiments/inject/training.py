"""New-knowledge injection by fine-tuning (paper §IV-H, Table V), designed to measure learning, not
memorising.

A *unit* is a (fact, language) whose held-out paraphrase(s) the model gets wrong (probe): knowledge
to learn. At most one unit per fact, a seeded sample of ``max_new`` facts. Each variant is
fine-tuned on the units' *localisation* paraphrases (cross-entropy on the whole gold answer, teacher
forcing after the prompt for causal models; on the [MASK] positions for masked ones) and
greedy-decoded on:

- ``heldout``: the unit's held-out paraphrases (never trained on): did it learn the fact?
- ``trained``: the paraphrases it was trained on (memorising; labelled as such);
- ``transfer``: the fact's original query in every other language that the model got wrong before:
  does knowledge injected in one language appear in the others?
- ``old``: Q_old, a seeded sample of ``max_old`` queries the model answered correctly, of other facts:
  forgetting.

Every (variant, learning rate) of the sweep ``lrs`` is trained and scored; the *selected* rate of a
variant is the one with the best mean of its ``trained`` and ``old`` accuracy, which a practitioner
can measure without held-out data, so the held-out numbers are not chosen on themselves.

Variants (each starts from a deep copy of the caller's model, which is never modified):
- ``"direct_ft"``: all parameters (Direct_FT).
- a neuron-set method name (``"matrice"``, ``"random"``, ``"amig"``, …): only the parameters of the
  neurons — their rows of the FFN input projections (+ bias entries) and their column of the output
  projection (:func:`matrice.finetune.neuron_param_masks`; Conv1D handled). Everything else has
  requires_grad False and the trained tensors' gradients are multiplied by the mask; Adam without
  weight decay then leaves every other entry bit-identical, which is verified after training
  (``verify``) against the caller's model.
- ``"lora"``: PEFT LoRA on every layer's FFN input and output projections (rank ``lora_r``).

Choices where the paper is silent:
- The neurons of a masked variant are the union over the facts in Q_new of that method's sets
  (one fine-tuning run on all of Q_new, as the paper describes a single training on Q_new). A
  method whose union is empty trains nothing (its row shows the unedited model, n_trainable 0).
- Training runs in eval mode (no dropout) unless ``dropout`` is set, so it is deterministic.
- ``"base"`` (``include_base``): the untouched model, a check that held-out accuracy is 0 and Q_old 1.
"""

from __future__ import annotations

import gc
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from matrice.data.schema import Query
from matrice.data.split import HeldOutSplit
from matrice.experiments import (
    NeuronSetsLike, ProbesLike, _facts_of, as_probe_map, dataclass_dict, encode_all, experiment_rng, fact_neurons,
    original_queries,
)
from matrice.finetune import TrainConfig, train_variant
from matrice.memo import Memo
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.predict import greedy_decode, is_correct

log = logging.getLogger(__name__)

DEFAULT_VARIANTS: tuple[str, ...] = ("direct_ft", "random", "amig", "matrice", "lora")


@dataclass(frozen=True)
class InjectConfig:
    """Fine-tuning parameters shared by all variants; ``lrs[variant]`` (else ``lrs["default"]``) is the
    variant's learning-rate sweep."""

    lrs: dict[str, list[float]] = field(default_factory=lambda: {"default": [1e-3, 3e-3], "direct_ft": [3e-5, 1e-4]})
    epochs: int = 5
    batch_size: int = 8
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    dropout: bool = False
    max_grad_norm: float | None = None
    max_old: int | None = 32
    max_new: int | None = 8  # units (facts) to inject; fine-tuning cost grows with it
    eval_batch_size: int = 32
    verify: bool = True
    include_base: bool = True

    def __post_init__(self) -> None:
        if "default" not in self.lrs:
            raise ValueError("inject.lrs needs a 'default' list of learning rates")
        for variant, lrs in self.lrs.items():
            if not lrs or any(not isinstance(lr, (int, float)) or lr <= 0 for lr in lrs):
                raise ValueError(f"inject.lrs.{variant} must be a non-empty list of positive numbers, got {lrs!r}")

    def sweep(self, variant: str) -> list[float]:
        return list(self.lrs.get(variant, self.lrs["default"]))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "InjectConfig":
        s = params["inject"]
        return cls(lrs={k: list(v) for k, v in s["lrs"].items()}, epochs=s["epochs"], batch_size=s["batch_size"],
                   seed=params["seed"], lora_r=s["lora_r"], max_new=s["max_new"], max_old=s["max_old"])

    def train_config(self, lr: float) -> TrainConfig:
        return TrainConfig(lr=lr, epochs=self.epochs, batch_size=self.batch_size, seed=self.seed, dropout=self.dropout,
                           max_grad_norm=self.max_grad_norm)


SPLITS: tuple[str, ...] = ("heldout", "trained", "transfer", "old")


@dataclass(frozen=True)
class InjectionRecord:
    """One query greedy-decoded after one (variant, lr) run; ``fact_id`` is the unit's fact for the
    first three splits and the query's own fact for ``old``."""

    variant: str
    lr: float | None
    split: str
    fact_id: str
    lang: str
    query_id: str
    correct: bool


@dataclass(frozen=True)
class Unit:
    fact_id: str
    lang: str
    train: list[str]  # query ids (localisation paraphrases)
    heldout: list[str]
    transfer: list[str]


@dataclass
class InjectionResult:
    """``runs[variant][str(lr)]``: n_trainable, n_neurons, losses, accuracy per split; ``selected[variant]``
    the lr picked by the rule in the module doc; ``records``: every decoded query of every run."""

    config: dict[str, Any] = field(default_factory=dict)
    units: list[dict[str, Any]] = field(default_factory=list)
    n_old: int = 0
    unencodable: dict[str, str] = field(default_factory=dict)
    runs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    selected: dict[str, float | None] = field(default_factory=dict)
    records: list[InjectionRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "units": self.units, "n_old": self.n_old, "unencodable": self.unencodable,
                "runs": self.runs, "selected": self.selected, "records": [dataclass_dict(r) for r in self.records]}


def choose_units(queries: Sequence[Query], probes: ProbesLike, is_evaluation: Callable[[Query], bool],
                 max_units: int | None, seed: int) -> list[Unit]:
    """One (fact, language) per fact whose held-out paraphrases in that language the model gets all
    wrong and that has localisation paraphrases there (seeded language choice), then a seeded sample
    of ``max_units`` facts."""
    pm = as_probe_map(probes)
    by_fact: dict[str, list[Query]] = defaultdict(list)
    for q in queries:
        if q.query_id in pm:
            by_fact[q.fact_id].append(q)
    units = []
    for fid in sorted(by_fact):
        fqs = by_fact[fid]
        candidates = []
        for lang in sorted({q.lang for q in fqs}):
            held = [q for q in fqs if q.lang == lang and is_evaluation(q)]
            train = [q for q in fqs if q.lang == lang and not is_evaluation(q)]
            if held and train and not any(pm[q.query_id].correct for q in held):
                candidates.append((lang, train, held))
        if not candidates:
            continue
        lang, train, held = candidates[int(experiment_rng(seed, "unit", fid).integers(len(candidates)))]
        transfer = [q.query_id for l, q in sorted(original_queries(fqs).items())
                    if l != lang and not pm[q.query_id].correct]
        units.append(Unit(fid, lang, [q.query_id for q in train], [q.query_id for q in held], transfer))
    if max_units is not None and len(units) > max_units:
        idx = experiment_rng(seed, "units").choice(len(units), size=max_units, replace=False)
        units = [units[i] for i in sorted(idx)]
    return units


def union_neurons(sets: NeuronSetsLike, fact_ids: Sequence[str], method: str, adapter: ModelAdapter) -> np.ndarray:
    """Sorted distinct (layer, neuron) pairs of ``method`` over ``fact_ids``."""
    pairs = {(int(l), int(i)) for fid in dict.fromkeys(fact_ids) for l, i in fact_neurons(sets, fid, method, adapter)}
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def _decode_correct(adapter: ModelAdapter, qs: Sequence[Query], encs: Mapping[str, Encoded], batch_size: int) -> list[bool]:
    if not qs:
        return []
    gen = greedy_decode(adapter, [encs[q.query_id] for q in qs], batch_size=batch_size)
    return [bool(is_correct(adapter, g, q.answer)) for q, g in zip(qs, gen)]


_RUN_FIELDS = ("epochs", "batch_size", "seed", "lora_r", "lora_alpha", "dropout", "max_grad_norm", "eval_batch_size",
               "verify")  # what a run's result depends on besides its inputs (the sweep and sample sizes are in those)


def _memoized(memo: Memo | None, key_parts: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
    return compute() if memo is None else memo.get_or_compute(compute, kind="inject_run", **key_parts)


def _accuracies(records: Sequence[InjectionRecord]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in SPLITS:
        rs = [r.correct for r in records if r.split == split]
        out[split] = float(np.mean(rs)) if rs else None
        out[f"n_{split}"] = len(rs)
    return out


def inject_knowledge(
    adapter: ModelAdapter,
    queries: Sequence[Query],
    probes: ProbesLike,
    sets: NeuronSetsLike,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    cfg: InjectConfig | None = None,
    is_evaluation: Callable[[Query], bool] | None = None,
    few_shot: bool = False,
    encoded: Mapping[str, Encoded] | None = None,
    progress: bool = True,
    memo: Memo | None = None,
) -> InjectionResult:
    """Fine-tune every (variant, lr) on the units' localisation paraphrases and score the four splits
    (module doc). Units: facts with neuron sets; Q_old: every other fact. ``is_evaluation(query)`` marks
    held-out paraphrases (default: :class:`HeldOutSplit`'s). With ``memo``, a run whose inputs (encodings,
    neurons, training config, model, code) were seen before is read back instead of retrained."""
    cfg = cfg or InjectConfig()
    is_evaluation = is_evaluation or HeldOutSplit().is_held_out
    by_id = {q.query_id: q for q in queries}
    units, old_q = _units_and_q_old(queries, probes, sets, is_evaluation, cfg)
    unit_facts = {u.fact_id for u in units}
    wanted = [by_id[i] for u in units for i in (*u.train, *u.heldout, *u.transfer)] + old_q
    encs, failed = encode_all(adapter, wanted, few_shot, encoded)
    split_queries = {split: [(u, by_id[i]) for u in units for i in getattr(u, split) if i in encs]
                     for split in ("train", "heldout", "transfer")}
    old_q = [q for q in old_q if q.query_id in encs]
    encs_train = [encs[q.query_id] for _, q in split_queries["train"]]
    result = InjectionResult(config={**cfg.__dict__, "variants": list(variants)},
                             units=[dataclass_dict(u) for u in units], n_old=len(old_q), unencodable=failed)
    # resolve every neuron set first, so a missing fact fails before hours of training
    unions = {v: union_neurons(sets, sorted(unit_facts), v, adapter) for v in variants if v not in ("direct_ft", "lora")}
    log.info("injection: %d units, %d training queries, %d Q_old; neurons per variant: %s; lr sweeps: %s",
             len(units), len(encs_train), len(old_q), {v: len(u) for v, u in unions.items()},
             {v: cfg.sweep(v) for v in variants})
    evaluated = [(split, u, q) for split, key in (("trained", "train"), ("heldout", "heldout"), ("transfer", "transfer"))
                 for u, q in split_queries[key]] + [("old", None, q) for q in old_q]
    unedited: list[bool] = []  # the caller's model's answers, decoded once for every run that trains nothing
    shared_key = {"train": encs_train, "evaluated": [(split, None if u is None else u.fact_id, q.query_id, q.answer,
                                                      encs[q.query_id]) for split, u, q in evaluated],
                  "config": {k: getattr(cfg, k) for k in _RUN_FIELDS}}

    def records_of(variant: str, lr: float | None, ok: Sequence[bool]) -> list[InjectionRecord]:
        return [InjectionRecord(variant, lr, split, q.fact_id if u is None else u.fact_id, q.lang, q.query_id, bool(c))
                for (split, u, q), c in zip(evaluated, ok)]

    def decode_all(work: ModelAdapter) -> list[bool]:
        """Every split in one decoding call (full batches), each query once."""
        return _decode_correct(work, [q for _, _, q in evaluated], encs, cfg.eval_batch_size)

    def unedited_answers() -> list[bool]:
        if not unedited:
            unedited.extend(_memoized(memo, {**shared_key, "variant": "base"}, lambda: decode_all(adapter)))
        return unedited

    def trained_run(variant: str, lr: float) -> dict[str, Any]:
        """{info, correct} of one fine-tuning run and its decoding."""
        work, info = train_variant(adapter, variant, unions.get(variant), encs_train, cfg, lr, progress)
        ok = decode_all(work)
        del work
        _free_memory()
        return {"info": info, "correct": ok}

    todo = [("base", None)] if cfg.include_base else []
    todo += [(v, lr) for v in variants for lr in cfg.sweep(v)]
    for variant, lr in todo:
        if variant == "base":
            info, ok = {"n_trainable": 0, "n_neurons": None, "losses": [], "lr": None}, unedited_answers()
        elif variant in unions and len(unions[variant]) == 0:
            log.warning("variant %s: no neurons for the units' facts; nothing is trained", variant)
            info, ok = {"n_trainable": 0, "n_neurons": 0, "losses": [], "lr": lr}, unedited_answers()
        else:
            run = _memoized(memo, {**shared_key, "variant": variant, "lr": lr, "neurons": unions.get(variant)},
                            lambda: trained_run(variant, lr))
            info, ok = run["info"], run["correct"]
        records = records_of(variant, lr, ok)
        result.records += records
        result.runs.setdefault(variant, {})[str(lr)] = {**info, **_accuracies(records)}
    result.selected = {variant: select_rate(runs) for variant, runs in result.runs.items()}
    return result


def _units_and_q_old(queries: Sequence[Query], probes: ProbesLike, sets: NeuronSetsLike,
                     is_evaluation: Callable[[Query], bool], cfg: InjectConfig) -> tuple[list[Unit], list[Query]]:
    """The units (from the facts with neuron sets) and Q_old (from the others)."""
    with_sets = set(_facts_of(sets))
    units = choose_units([q for q in queries if q.fact_id in with_sets], probes, is_evaluation, cfg.max_new, cfg.seed)
    if not units:
        raise ValueError("injection: no (fact, language) has held-out paraphrases the model gets wrong")
    return units, choose_q_old(queries, probes, {u.fact_id for u in units}, cfg.max_old, cfg.seed)


def choose_q_old(queries: Sequence[Query], probes: ProbesLike, unit_facts: set[str], max_old: int | None, seed: int
                 ) -> list[Query]:
    """Q_old: the queries the model answers correctly, of facts not injected (a seeded sample of ``max_old``)."""
    pm = as_probe_map(probes)
    old_q = [q for q in queries if q.query_id in pm and pm[q.query_id].correct and q.fact_id not in unit_facts]
    if max_old is not None and len(old_q) > max_old:
        idx = experiment_rng(seed, "q_old").choice(len(old_q), size=max_old, replace=False)
        old_q = [old_q[i] for i in sorted(idx)]
    return old_q


def select_rate(runs: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The learning rate with the best mean of training and Q_old accuracy (no held-out data); the first
    of equals in the sweep's order."""
    def fit(run: Mapping[str, Any]) -> float:
        vals = [run[s] for s in ("trained", "old") if run[s] is not None]
        return float(np.mean(vals)) if vals else -1.0

    return runs[max(runs, key=lambda lr: fit(runs[lr]))]["lr"]


def _free_memory() -> None:
    """Collect a trained copy (its last reference just dropped) before the next run builds its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
