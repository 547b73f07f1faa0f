"""New-knowledge injection by fine-tuning (paper §IV-H, Table V).

Q_new = the queries the probe marked incorrect (knowledge to learn), Q_old = those it marked
correct (knowledge to keep). The model is fine-tuned on Q_new with cross-entropy on the whole gold
answer (teacher forcing after the prompt for causal models; on the [MASK] positions for masked
ones), then greedy-decoded on Q_new and Q_old; accuracy per language and variant (and "Avg", the
mean of the two, as in Table V).

Variants (each starts from a deep copy of the caller's model, which is never modified):
- ``"direct_ft"``: all parameters (Direct_FT).
- a neuron-set method name (``"matrice"``, ``"random"``, ``"amig"``, …): only the parameters of the
  neurons — their rows of the FFN input projections (+ bias entries) and their column of the output
  projection (:func:`matrice.interventions.neuron_param_masks`; Conv1D handled). Everything else has
  requires_grad False and the trained tensors' gradients are multiplied by the mask; Adam without
  weight decay then leaves every other entry bit-identical, which is verified after training
  (``verify``) against the caller's model.
- ``"lora"``: PEFT LoRA on every layer's FFN input and output projections (rank ``lora_r``).

Choices where the paper is silent:
- The neurons of a masked variant are the union over the facts in Q_new of that method's sets
  (one fine-tuning run on all of Q_new, as the paper describes a single training on Q_new). A
  method whose union is empty trains nothing (its row shows the unedited model, n_trainable 0).
- Training runs in eval mode (no dropout) unless ``dropout`` is set, so it is deterministic.
- ``max_old`` optionally evaluates a seeded sample of Q_old (it can be most of the dataset).
- ``"base"`` (``include_base``): the untouched model, a check that Q_new accuracy is 0 and Q_old 1.
"""

from __future__ import annotations

import copy
import gc
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from matrice.data.schema import Query
from matrice.experiments import (
    NeuronSetsLike, ProbesLike, as_probe_map, encode_all, experiment_rng, fact_neurons,
)
from matrice.interventions import (
    TrainConfig, check_masked_update, enable_masked_training, ffn_module_names, neuron_param_masks, train_on_answers,
)
from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.predict import greedy_decode, is_correct

log = logging.getLogger(__name__)

DEFAULT_VARIANTS: tuple[str, ...] = ("direct_ft", "random", "amig", "matrice", "lora")


@dataclass(frozen=True)
class InjectConfig:
    """Fine-tuning parameters shared by all variants (``variant_lr`` overrides ``lr`` per variant)."""

    lr: float = 1e-3
    epochs: int = 10
    batch_size: int = 8
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    dropout: bool = False
    max_grad_norm: float | None = None
    max_old: int | None = None
    max_new: int | None = None  # seeded subsample of Q_new (fine-tuning cost grows with it)
    eval_batch_size: int = 32
    verify: bool = True
    include_base: bool = True
    variant_lr: dict[str, float] = field(default_factory=dict)

    def train_config(self, variant: str) -> TrainConfig:
        return TrainConfig(lr=self.variant_lr.get(variant, self.lr), epochs=self.epochs, batch_size=self.batch_size,
                           seed=self.seed, dropout=self.dropout, max_grad_norm=self.max_grad_norm)


@dataclass
class InjectionResult:
    """``variants[name]``: n_trainable (parameter entries that may change), n_neurons, losses per
    epoch, ``per_lang[lang]`` and ``overall`` with q_new / q_old accuracy, avg and counts.
    ``rows``: the same flattened per (variant, lang), with lang ``"all"`` for the overall row."""

    config: dict[str, Any] = field(default_factory=dict)
    n_new: int = 0
    n_old: int = 0
    n_unprobed: int = 0
    unencodable: dict[str, str] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "n_new": self.n_new, "n_old": self.n_old, "n_unprobed": self.n_unprobed,
                "unencodable": self.unencodable, "variants": self.variants, "rows": self.rows}


def split_new_old(queries: Sequence[Query], probes: ProbesLike, languages: Sequence[str] | None = None
                  ) -> tuple[list[Query], list[Query], int]:
    """(Q_new, Q_old, number of queries without a probe record) within ``languages`` (None = all)."""
    pm = as_probe_map(probes)
    keep = [q for q in queries if languages is None or q.lang in set(languages)]
    new = [q for q in keep if q.query_id in pm and not pm[q.query_id].correct]
    old = [q for q in keep if q.query_id in pm and pm[q.query_id].correct]
    return new, old, sum(q.query_id not in pm for q in keep)


def union_neurons(sets: NeuronSetsLike, fact_ids: Sequence[str], method: str, adapter: ModelAdapter) -> np.ndarray:
    """Sorted distinct (layer, neuron) pairs of ``method`` over ``fact_ids``."""
    pairs = {(int(l), int(i)) for fid in dict.fromkeys(fact_ids) for l, i in fact_neurons(sets, fid, method, adapter)}
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def _accuracy(adapter: ModelAdapter, qs: Sequence[Query], encs: Mapping[str, Encoded], batch_size: int) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = defaultdict(list)
    if not qs:
        return out
    gen = greedy_decode(adapter, [encs[q.query_id] for q in qs], batch_size=batch_size)
    for q, g in zip(qs, gen):
        out[q.lang].append(bool(is_correct(adapter, g, q.answer)))
    return out


def _table(new_ok: Mapping[str, list[bool]], old_ok: Mapping[str, list[bool]]) -> tuple[dict[str, Any], dict[str, Any]]:
    def block(a: list[bool], b: list[bool]) -> dict[str, Any]:
        qn = float(np.mean(a)) if a else None
        qo = float(np.mean(b)) if b else None
        both = [v for v in (qn, qo) if v is not None]
        return {"q_new": qn, "q_old": qo, "avg": float(np.mean(both)) if len(both) == 2 else None,
                "n_new": len(a), "n_old": len(b)}

    per_lang = {lang: block(new_ok.get(lang, []), old_ok.get(lang, [])) for lang in sorted(set(new_ok) | set(old_ok))}
    overall = block([x for v in new_ok.values() for x in v], [x for v in old_ok.values() for x in v])
    return per_lang, overall


def train_variant(adapter: ModelAdapter, variant: str, pairs: np.ndarray | None, encs_new: Sequence[Encoded],
                  cfg: InjectConfig, progress: bool = True) -> tuple[ModelAdapter, dict[str, Any]]:
    """Fine-tune a deep copy of the caller's model as ``variant`` ("direct_ft", "lora", or masked on
    ``pairs``) on ``encs_new``; returns an adapter around the trained copy and
    {n_trainable, n_neurons, losses, lr}. The caller's model is not touched."""
    model = copy.deepcopy(adapter.model)
    work = ModelAdapter(model, adapter.tokenizer, adapter.family)  # freezes every parameter
    info: dict[str, Any] = {"n_neurons": None if pairs is None else int(len(pairs))}
    tcfg = cfg.train_config(variant)
    info["lr"] = tcfg.lr
    if variant == "direct_ft":
        for p in model.parameters():
            p.requires_grad_(True)
        params = list(model.parameters())
        info["n_trainable"] = int(sum(p.numel() for p in params))
        info["losses"] = train_on_answers(work, encs_new, params, tcfg, desc=variant, progress=progress)
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=ffn_module_names(work), fan_in_fan_out=adapter.family.conv1d)
        peft_model = get_peft_model(model, lcfg)  # injects LoRA layers into `model` in place
        params = [p for p in peft_model.parameters() if p.requires_grad]
        info["n_trainable"] = int(sum(p.numel() for p in params))
        info["losses"] = train_on_answers(work, encs_new, params, tcfg, model=peft_model, desc=variant, progress=progress)
    else:
        masks = neuron_param_masks(work, pairs)
        params, handles = enable_masked_training(model, masks)
        info["n_trainable"] = int(sum(int(m.sum()) for m in masks.values()))
        try:
            info["losses"] = train_on_answers(work, encs_new, params, tcfg, desc=variant, progress=progress)
        finally:
            for h in handles:
                h.remove()
        if cfg.verify:
            check_masked_update(adapter.model, model, masks)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return work, info


def inject_knowledge(
    adapter: ModelAdapter,
    queries: Sequence[Query],
    probes: ProbesLike,
    sets: NeuronSetsLike,
    variants: Sequence[str] = DEFAULT_VARIANTS,
    cfg: InjectConfig | None = None,
    languages: Sequence[str] | None = None,
    few_shot: bool = False,
    encoded: Mapping[str, Encoded] | None = None,
    progress: bool = True,
) -> InjectionResult:
    """Fine-tune each variant on Q_new and report Q_new / Q_old accuracy per language (module doc)."""
    cfg = cfg or InjectConfig()
    new_q, old_q, unprobed = split_new_old(queries, probes, languages)
    if cfg.max_new is not None and len(new_q) > cfg.max_new:
        idx = experiment_rng(cfg.seed, "q_new").choice(len(new_q), size=cfg.max_new, replace=False)
        new_q = [new_q[i] for i in sorted(idx)]
    if cfg.max_old is not None and len(old_q) > cfg.max_old:
        idx = experiment_rng(cfg.seed, "q_old").choice(len(old_q), size=cfg.max_old, replace=False)
        old_q = [old_q[i] for i in sorted(idx)]
    encs, failed = encode_all(adapter, new_q + old_q, few_shot, encoded)
    new_q = [q for q in new_q if q.query_id in encs]
    old_q = [q for q in old_q if q.query_id in encs]
    encs_new = [encs[q.query_id] for q in new_q]
    new_facts = [q.fact_id for q in new_q]
    result = InjectionResult(config={**cfg.__dict__, "variants": list(variants), "languages": languages},
                             n_new=len(new_q), n_old=len(old_q), n_unprobed=unprobed, unencodable=failed)
    # resolve every neuron set first, so a missing fact fails before hours of training
    unions = {v: union_neurons(sets, new_facts, v, adapter) for v in variants if v not in ("direct_ft", "lora")}
    log.info("injection: %d Q_new, %d Q_old queries; neurons per variant: %s",
             len(new_q), len(old_q), {v: len(u) for v, u in unions.items()})

    todo = (["base"] if cfg.include_base else []) + list(variants)
    for variant in todo:
        if variant == "base":
            work, info = adapter, {"n_trainable": 0, "n_neurons": None, "losses": [], "lr": None}
        elif variant in unions and len(unions[variant]) == 0:
            log.warning("variant %s: no neurons for the facts of Q_new; nothing is trained", variant)
            work, info = adapter, {"n_trainable": 0, "n_neurons": 0, "losses": [], "lr": None}
        else:
            work, info = train_variant(adapter, variant, unions.get(variant), encs_new, cfg, progress)
        per_lang, overall = _table(_accuracy(work, new_q, encs, cfg.eval_batch_size),
                                   _accuracy(work, old_q, encs, cfg.eval_batch_size))
        result.variants[variant] = {**info, "per_lang": per_lang, "overall": overall}
        result.rows += [{"variant": variant, "lang": lang, **row} for lang, row in per_lang.items()]
        result.rows.append({"variant": variant, "lang": "all", **overall})
        if work is not adapter:
            del work
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return result
