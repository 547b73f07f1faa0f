"""Run attribution over many queries in resumable shards (one shard per fact).

A shard is written atomically and carries a fingerprint of everything that determines its numbers
(engine settings, model, token ids). On restart, a shard whose fingerprint matches is kept; anything
else is recomputed. The manifest, written last, is what downstream stages read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from matrice.attribution.common import AttributionConfig
from matrice.attribution.fast import fast_attribution_many
from matrice.data.schema import Query
from matrice.io import atomic_save_npz, atomic_write_json
from matrice.models.adapter import Encoded, ModelAdapter

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Shard:
    name: str
    fact_id: str
    query_ids: list[str]


FACT_POLICIES = ("known", "any")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def sample_facts_per_relation(queries: Sequence[Query], per_relation: int | None, seed: int,
                              eligible: set[str] | None = None) -> list[str]:
    """A seeded sample of fact ids per relation (all facts when `per_relation` is null), drawn from
    `eligible` facts when given. A relation with fewer eligible facts than asked gives what it has
    (logged), never an ineligible one."""
    by_relation: dict[str, list[str]] = defaultdict(list)
    for q in queries:
        if q.fact_id not in by_relation[q.relation] and (eligible is None or q.fact_id in eligible):
            by_relation[q.relation].append(q.fact_id)
    chosen: list[str] = []
    for relation in sorted(by_relation):
        facts = sorted(by_relation[relation])
        if per_relation is not None and per_relation < len(facts):
            facts = sorted(random.Random(f"{seed}:{relation}").sample(facts, per_relation))
        elif per_relation is not None and len(facts) < per_relation:
            log.warning("relation %s: only %d eligible facts for facts_per_relation=%d", relation, len(facts), per_relation)
        chosen += facts
    return chosen


def known_facts(probes: Iterable[Mapping[str, Any]], lang: str) -> set[str]:
    """Facts whose original query (template 0) in `lang` the model answers correctly (probe stage)."""
    return {p["fact_id"] for p in probes if p["lang"] == lang and p["template_id"] == 0 and p["correct"]}


def choose_facts(queries: Sequence[Query], per_relation: int | None, seed: int, policy: str,
                 probes: Iterable[Mapping[str, Any]] | None = None, lang: str = "en") -> list[str]:
    """The facts to attribute: `known` = facts the model answers in `lang` (default: the editing
    language), so an edit or a suppression changes knowledge the model has; `any` = every fact."""
    if policy not in FACT_POLICIES:
        raise ValueError(f"attribute.fact_policy must be one of {FACT_POLICIES}, got {policy!r}")
    if policy == "any":
        return sample_facts_per_relation(queries, per_relation, seed)
    if probes is None:
        raise ValueError("attribute.fact_policy 'known' needs the probe results")
    return sample_facts_per_relation(queries, per_relation, seed, known_facts(probes, lang))


def shard_name(fact_id: str) -> str:
    """A shard is named by its fact, so a run that attributes more (or other) facts keeps every
    finished shard of the facts it shares with an earlier run. Ids that are not file-name safe get
    a hash suffix so two of them cannot collide."""
    if _SAFE_NAME.fullmatch(fact_id):
        return f"shard-{fact_id}.npz"
    digest = hashlib.sha1(fact_id.encode()).hexdigest()[:10]
    return f"shard-{_UNSAFE_CHARS.sub('_', fact_id)[:80]}-{digest}.npz"


def plan_shards(queries: Sequence[Query], fact_ids: Sequence[str]) -> list[Shard]:
    by_fact: dict[str, list[str]] = defaultdict(list)
    for q in queries:
        by_fact[q.fact_id].append(q.query_id)
    return [Shard(shard_name(fact), fact, by_fact[fact]) for fact in fact_ids]


def fingerprint(settings: dict, encs: Sequence[Encoded]) -> str:
    payload = json.dumps({"settings": settings, "encoded": [asdict(e) for e in encs]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _shard_is_done(path: Path, print_: str) -> bool:
    if not path.exists():
        return False
    try:
        with np.load(path) as data:
            return str(data["fingerprint"]) == print_
    except Exception:  # unreadable shard: recompute it
        return False


def run_attribution(
    adapter: ModelAdapter,
    queries: Sequence[Query],
    encs: Sequence[Encoded],
    shards: Sequence[Shard],
    cfg: AttributionConfig,
    settings: dict,
    out_dir: Path,
) -> dict:
    """Compute (or resume) every shard; returns and writes the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    enc_by_id = {q.query_id: e for q, e in zip(queries, encs)}
    total = sum(len(s.query_ids) for s in shards)
    bar = tqdm(total=total, desc="attribute", unit="query")
    started, computed = time.time(), 0
    for shard in shards:
        shard_encs = [enc_by_id[q] for q in shard.query_ids]
        print_ = fingerprint(settings, shard_encs)
        path = out_dir / shard.name
        if _shard_is_done(path, print_):
            log.info("%s (%s) already done, kept", shard.name, shard.fact_id)
            bar.update(len(shard_encs))
            continue
        raw, n_base = [], []
        for attr in fast_attribution_many(adapter, shard_encs, cfg):  # [B, L, N] per query, in order
            raw.append(attr.sum(dim=0).numpy())
            n_base.append(attr.shape[0])
            computed += 1
            bar.update(1)
            bar.set_postfix(q_per_min=f"{60 * computed / (time.time() - started):.1f}")
        atomic_save_npz(
            path, query_ids=np.array(shard.query_ids), raw=np.stack(raw).astype(np.float32),
            n_baselines=np.array(n_base), fingerprint=np.array(print_), fact_id=np.array(shard.fact_id),
        )
    bar.close()
    keep = {s.name for s in shards}
    for stale in out_dir.glob("shard-*.npz"):
        if stale.name not in keep:
            stale.unlink()
    manifest = {
        "settings": settings,
        "layers": adapter.n_layers,
        "neurons": adapter.n_neurons,
        "shards": [asdict(s) for s in shards],
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def load_attributions(out_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Manifest and raw [L, N] attribution per query id."""
    manifest = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
    raw: dict[str, np.ndarray] = {}
    for shard in manifest["shards"]:
        with np.load(out_dir / shard["name"]) as data:
            for qid, scores in zip(data["query_ids"], data["raw"]):
                raw[str(qid)] = scores
    return manifest, raw
