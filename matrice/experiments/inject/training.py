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

The learning rate is chosen without the evaluated data, then every seed runs at it:

- Q_old is split by fact (seeded) into ``old_select``, which chooses the rate, and ``old``, which is
  evaluated; no fact is in both.
- Every rate of the variant's grid ``lrs`` (log-spaced) is trained with the first seed of ``seeds``;
  the *selected* rate is the one with the best mean of ``trained`` and ``old_select`` accuracy (what a
  practitioner can measure without held-out data). While the best rate is an end of the grid, the grid
  grows by one log-step past that end (at most ``lr_extend`` steps a side); a selection still at an
  end is recorded (``at_edge``).
- The other seeds then train at the selected rate. A fact's accuracy is its mean over the seeds, so a
  seed's luck is in every fact's value (the per-seed table shows the spread).

Variants (each starts from a deep copy of the caller's model, which is never modified):
- ``"direct_ft"``: all parameters (Direct_FT).
- a neuron-set method name (``"matrice"``, ``"random"``, ``"amig"``, …): only the parameters of the
  neurons — their rows of the FFN input projections (+ bias entries) and their column of the output
  projection (:func:`matrice.finetune.neuron_param_masks`; Conv1D handled). Everything else has
  requires_grad False and the trained tensors' gradients are multiplied by the mask; Adam without
  weight decay then leaves every other entry bit-identical, which is verified after training
  (``verify``) against the caller's model.
- ``"lora"``: PEFT LoRA on every layer's FFN input and output projections (rank ``lora_r``).
- ``"<method>_lora"`` (e.g. ``"matrice_lora"``, MEMLA-style): LoRA of rank ``lora_r`` on the FFN
  projections of the method's neurons' layers, its update confined to the neurons' rows and columns
  (:func:`matrice.finetune.masked_lora`).
- ``"random"`` (Random_FT), when ``"matrice"`` is a variant too: as many random neurons in each layer
  as MATRICE_FT's union has there (uniform within the layer, drawn afresh for each seed), so the two
  differ in which neurons they train, not in how many or where.

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
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from matrice.data.schema import Query
from matrice.data.split import HeldOutSplit
from matrice.experiments import NeuronSetsLike, ProbesLike, _facts_of, dataclass_dict, encode_all, experiment_rng
from matrice.experiments.inject.units import Unit, choose_q_old, choose_units, neuron_method, split_q_old, union_neurons
from matrice.finetune import TrainConfig, train_variant
from matrice.memo import Memo
from matrice.method.selection import layer_matched_random
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.predict import HEAD_ROWS, greedy_decode, is_correct

log = logging.getLogger(__name__)

DEFAULT_VARIANTS: tuple[str, ...] = ("direct_ft", "random", "amig", "matrice", "lora", "matrice_lora")


@dataclass(frozen=True)
class InjectConfig:
    """Fine-tuning parameters shared by all variants; ``lrs[variant]`` (else ``lrs["default"]``) is the
    variant's learning-rate sweep."""

    lrs: dict[str, list[float]] = field(default_factory=lambda: {"default": [3e-4, 1e-3, 3e-3, 1e-2],
                                                                 "direct_ft": [1e-5, 3e-5, 1e-4, 3e-4]})
    epochs: int = 5
    batch_size: int = 8
    seed: int = 0  # units, Q_old and its split
    seeds: tuple[int, ...] = (0, 1, 2)  # training runs per variant at its selected rate (the first also sweeps)
    lr_extend: int = 2  # log-steps the grid may grow past each end while the best rate is there
    lora_r: int = 8
    lora_alpha: int = 16
    dropout: bool = False
    max_grad_norm: float | None = None
    max_old: int | None = 64
    max_new: int | None = 8  # units (facts) to inject; fine-tuning cost grows with it
    eval_batch_size: int = 32
    verify: bool = True
    include_base: bool = True

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"inject.seeds must be distinct integers, at least one, got {self.seeds!r}")
        if self.lr_extend < 0:
            raise ValueError(f"inject.lr_extend must be >= 0, got {self.lr_extend!r}")
        if "default" not in self.lrs:
            raise ValueError("inject.lrs needs a 'default' list of learning rates")
        for variant, lrs in self.lrs.items():
            if not lrs or any(not isinstance(lr, (int, float)) or lr <= 0 for lr in lrs):
                raise ValueError(f"inject.lrs.{variant} must be a non-empty list of positive numbers, got {lrs!r}")

    def sweep(self, variant: str) -> list[float]:
        """The variant's learning-rate grid, ascending."""
        return sorted(float(lr) for lr in self.lrs.get(variant, self.lrs["default"]))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "InjectConfig":
        s = params["inject"]
        return cls(lrs={k: list(v) for k, v in s["lrs"].items()}, epochs=s["epochs"], batch_size=s["batch_size"],
                   seed=params["seed"], seeds=tuple(int(x) for x in s["seeds"]), lr_extend=s["lr_extend"],
                   lora_r=s["lora_r"], max_new=s["max_new"], max_old=s["max_old"])

    def train_config(self, lr: float, seed: int | None = None) -> TrainConfig:
        return TrainConfig(lr=lr, epochs=self.epochs, batch_size=self.batch_size,
                           seed=self.seeds[0] if seed is None else seed, dropout=self.dropout,
                           max_grad_norm=self.max_grad_norm)


SPLITS: tuple[str, ...] = ("heldout", "trained", "transfer", "old", "old_select")


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
    seed: int | None = None  # the training seed (None: nothing trained)


@dataclass
class InjectionResult:
    """``runs[variant][str(lr)]``: accuracy per split (mean over the seeds run at that rate), n_trainable,
    n_neurons, and ``seeds[str(seed)]`` (each run's losses and accuracies); ``selected[variant]`` the lr
    picked by the rule in the module doc, ``at_edge[variant]`` whether it is still an end of the grown
    grid; ``records``: every decoded query of every run."""

    config: dict[str, Any] = field(default_factory=dict)
    units: list[dict[str, Any]] = field(default_factory=list)
    n_old: int = 0
    n_old_select: int = 0
    unencodable: dict[str, str] = field(default_factory=dict)
    runs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    selected: dict[str, float | None] = field(default_factory=dict)
    at_edge: dict[str, bool] = field(default_factory=dict)
    records: list[InjectionRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "units": self.units, "n_old": self.n_old, "n_old_select": self.n_old_select,
                "unencodable": self.unencodable, "runs": self.runs, "selected": self.selected,
                "at_edge": self.at_edge, "records": [dataclass_dict(r) for r in self.records]}


def _decode_correct(adapter: ModelAdapter, qs: Sequence[Query], encs: Mapping[str, Encoded], batch_size: int) -> list[bool]:
    if not qs:
        return []
    gen = greedy_decode(adapter, [encs[q.query_id] for q in qs], batch_size=batch_size, head_rows=HEAD_ROWS)
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


Evaluated = list[tuple[str, "Unit | None", Query]]  # (split, the unit or None for Q_old, query)


class _Runs:
    """One (variant, lr, seed) run at a time: trained (or read back from the memo), decoded on every split,
    turned into records. The unedited model's answers are decoded once for every run that trains nothing."""

    def __init__(self, adapter: ModelAdapter, cfg: InjectConfig, encs: Mapping[str, Encoded],
                 encs_train: list[Encoded], evaluated: Evaluated, unions: Mapping[str, np.ndarray],
                 memo: Memo | None, progress: bool) -> None:
        self.adapter, self.cfg, self.encs, self.encs_train = adapter, cfg, encs, encs_train
        self.evaluated, self.unions, self.memo, self.progress = evaluated, unions, memo, progress
        self.unedited: list[bool] = []
        self.shared_key = {"train": encs_train,
                           "evaluated": [(split, None if u is None else u.fact_id, q.query_id, q.answer, encs[q.query_id])
                                         for split, u, q in evaluated],
                           "config": {k: getattr(cfg, k) for k in _RUN_FIELDS}}

    def neurons(self, variant: str, seed: int) -> np.ndarray | None:
        """The variant's neurons for a seed's run (None: not a neuron-set variant)."""
        if variant == "random" and "matrice" in self.unions:
            return layer_matched_random(self.unions["matrice"], self.adapter.n_neurons,
                                        experiment_rng(seed, "random_ft"))
        return self.unions.get(variant)

    def records_of(self, variant: str, lr: float | None, seed: int | None, ok: Sequence[bool]) -> list[InjectionRecord]:
        return [InjectionRecord(variant, lr, split, q.fact_id if u is None else u.fact_id, q.lang, q.query_id, bool(c),
                                seed) for (split, u, q), c in zip(self.evaluated, ok)]

    def decode_all(self, work: ModelAdapter) -> list[bool]:
        """Every split in one decoding call (full batches), each query once."""
        return _decode_correct(work, [q for _, _, q in self.evaluated], self.encs, self.cfg.eval_batch_size)

    def unedited_answers(self) -> list[bool]:
        if not self.unedited:
            self.unedited.extend(_memoized(self.memo, {**self.shared_key, "variant": "base"},
                                           lambda: self.decode_all(self.adapter)))
        return self.unedited

    def base(self) -> tuple[dict[str, Any], list[InjectionRecord]]:
        info = {"n_trainable": 0, "n_neurons": None, "losses": [], "lr": None}
        return info, self.records_of("base", None, None, self.unedited_answers())

    def run(self, variant: str, lr: float, seed: int) -> tuple[dict[str, Any], list[InjectionRecord]]:
        """(info, records) of one run; a neuron variant without neurons trains nothing."""
        pairs = self.neurons(variant, seed)
        if pairs is not None and len(pairs) == 0:
            info = {"n_trainable": 0, "n_neurons": 0, "losses": [], "lr": lr}
            return info, self.records_of(variant, lr, seed, self.unedited_answers())

        def trained() -> dict[str, Any]:
            work, info = train_variant(self.adapter, variant, pairs, self.encs_train, self.cfg, lr, self.progress, seed)
            ok = self.decode_all(work)
            del work
            _free_memory()
            return {"info": info, "correct": ok}

        out = _memoized(self.memo, {**self.shared_key, "variant": variant, "lr": lr, "seed": seed, "neurons": pairs},
                        trained)
        return out["info"], self.records_of(variant, lr, seed, out["correct"])


def _selection_fit(records: Sequence[InjectionRecord]) -> float:
    """What chooses the rate: mean of training and Q_old-selection accuracy (no evaluated data)."""
    acc = _accuracies(records)
    vals = [acc[s] for s in ("trained", "old_select") if acc[s] is not None]
    return float(np.mean(vals)) if vals else -1.0


def best_rate(grid: Sequence[float], fits: Mapping[float, float]) -> float:
    """The rate with the best fit; among equals an interior one (then the smallest), so a tie with an
    end does not grow the grid."""
    top = max(fits[lr] for lr in grid)
    tied = [lr for lr in grid if fits[lr] == top]
    interior = [lr for lr in tied if lr not in (grid[0], grid[-1])]
    return (interior or tied)[0]


def sweep_variant(runs: _Runs, variant: str, cfg: InjectConfig) -> tuple[float, bool, dict[tuple[float, int], tuple]]:
    """The first seed over the (growing) grid, then the other seeds at the selected rate.
    Returns (selected rate, still at an end of the grid, {(lr, seed): (info, records)})."""
    grid, first = cfg.sweep(variant), cfg.seeds[0]
    done: dict[tuple[float, int], tuple] = {}
    grown = {"low": 0, "high": 0}
    while True:
        for lr in grid:
            if (lr, first) not in done:
                done[lr, first] = runs.run(variant, lr, first)
        best = best_rate(grid, {lr: _selection_fit(done[lr, first][1]) for lr in grid})
        end = "low" if best == grid[0] else "high" if best == grid[-1] else None
        if end is None or len(grid) < 2 or grown[end] >= cfg.lr_extend:
            break
        grown[end] += 1
        grid = [_sig(grid[0] ** 2 / grid[1]), *grid] if end == "low" else [*grid, _sig(grid[-1] ** 2 / grid[-2])]
        log.info("injection %s: best rate %g is the grid's %s end; trying %g", variant, best, end,
                 grid[0] if end == "low" else grid[-1])
    for seed in cfg.seeds[1:]:
        done[best, seed] = runs.run(variant, best, seed)
    return best, len(grid) < 2 or best in (grid[0], grid[-1]), done


def _sig(lr: float) -> float:
    """A grown grid point to 3 significant digits (2e-05, not 1.9999999999999998e-05)."""
    return float(f"{lr:.3g}")


def _run_summary(by_seed: Mapping[int, tuple[dict[str, Any], list[InjectionRecord]]]) -> dict[str, Any]:
    """One rate's entry of ``runs``: accuracies over all its seeds' records, and each seed's own."""
    first_info = next(iter(by_seed.values()))[0]
    records = [r for _, recs in by_seed.values() for r in recs]
    return {**{k: v for k, v in first_info.items() if k != "losses"}, **_accuracies(records),
            "seeds": {str(seed): {"losses": info["losses"], "n_neurons": info["n_neurons"], **_accuracies(recs)}
                      for seed, (info, recs) in by_seed.items()}}


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
    """Fine-tune every variant over its rate grid and seeds on the units' localisation paraphrases and
    score every split (module doc). Units: facts with neuron sets; Q_old: every other fact.
    ``is_evaluation(query)`` marks held-out paraphrases (default: :class:`HeldOutSplit`'s). With ``memo``,
    a run whose inputs (encodings, neurons, training config, seed, model, code) were seen before is read
    back instead of retrained."""
    cfg = cfg or InjectConfig()
    is_evaluation = is_evaluation or HeldOutSplit().is_held_out
    by_id = {q.query_id: q for q in queries}
    units, old_q = _units_and_q_old(queries, probes, sets, is_evaluation, cfg)
    wanted = [by_id[i] for u in units for i in (*u.train, *u.heldout, *u.transfer)] + old_q
    encs, failed = encode_all(adapter, wanted, few_shot, encoded)
    split_queries = {split: [(u, by_id[i]) for u in units for i in getattr(u, split) if i in encs]
                     for split in ("train", "heldout", "transfer")}
    old_select, old_eval = split_q_old([q for q in old_q if q.query_id in encs], cfg.seed)
    encs_train = [encs[q.query_id] for _, q in split_queries["train"]]
    result = InjectionResult(config={**cfg.__dict__, "variants": list(variants)},
                             units=[dataclass_dict(u) for u in units], n_old=len(old_eval),
                             n_old_select=len(old_select), unencodable=failed)
    # resolve every neuron set first, so a missing fact fails before hours of training
    unit_facts = sorted({u.fact_id for u in units})
    unions = {v: union_neurons(sets, unit_facts, neuron_method(v), adapter) for v in variants
              if v not in ("direct_ft", "lora")}
    evaluated: Evaluated = [(split, u, q) for split, key in (("trained", "train"), ("heldout", "heldout"),
                                                             ("transfer", "transfer")) for u, q in split_queries[key]]
    evaluated += [("old", None, q) for q in old_eval] + [("old_select", None, q) for q in old_select]
    runs = _Runs(adapter, cfg, encs, encs_train, evaluated, unions, memo, progress)
    log.info("injection: %d units, %d training queries, Q_old %d evaluated + %d choosing the rate; neurons per "
             "variant (first seed): %s; rate grids: %s; seeds %s", len(units), len(encs_train), len(old_eval),
             len(old_select), {v: len(runs.neurons(v, cfg.seeds[0])) for v in unions},
             {v: cfg.sweep(v) for v in variants}, list(cfg.seeds))
    if cfg.include_base:
        info, records = runs.base()
        result.records += records
        result.runs["base"] = {"None": {**info, **_accuracies(records)}}
        result.selected["base"] = None
    for variant in variants:
        best, at_edge, done = sweep_variant(runs, variant, cfg)
        result.selected[variant], result.at_edge[variant] = best, at_edge
        for lr in sorted({lr for lr, _ in done}):
            by_seed = {seed: done[lr_, seed] for lr_, seed in done if lr_ == lr}
            result.records += [r for _, recs in by_seed.values() for r in recs]
            result.runs.setdefault(variant, {})[str(lr)] = _run_summary(by_seed)
    return result


def _units_and_q_old(queries: Sequence[Query], probes: ProbesLike, sets: NeuronSetsLike,
                     is_evaluation: Callable[[Query], bool], cfg: InjectConfig) -> tuple[list[Unit], list[Query]]:
    """The units (from the facts with neuron sets) and Q_old (from the others)."""
    with_sets = set(_facts_of(sets))
    units = choose_units([q for q in queries if q.fact_id in with_sets], probes, is_evaluation, cfg.max_new, cfg.seed)
    if not units:
        raise ValueError("injection: no (fact, language) has held-out paraphrases the model gets wrong")
    return units, choose_q_old(queries, probes, {u.fact_id for u in units}, cfg.max_old, cfg.seed)


def _free_memory() -> None:
    """Collect a trained copy (its last reference just dropped) before the next run builds its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
