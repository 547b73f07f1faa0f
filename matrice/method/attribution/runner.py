"""Run attribution over many queries in resumable shards (one shard per fact).

A shard is written atomically and carries a fingerprint of everything that determines its numbers
(engine settings, model, token ids). On restart, a shard whose fingerprint matches is kept; anything
else is recomputed; under ``answer_token: all`` a first-token run's shard of the same queries and
settings serves as token 1 of every answer. The manifest, written last, is what downstream stages
read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.executors import LocalExecutor, RawMaps, ShardExecutor, ShardJob
from matrice.data.schema import Query
from matrice.io import atomic_save_npz, atomic_write_json, safe_stem
from matrice.models.adapter import Encoded, ModelAdapter

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


MAPS_DIR, AMIG_MAPS_DIR, ZERO_MAPS_DIR = "attributions", "attributions_amig", "attributions_zero"  # per-arm shard folders

@dataclass(frozen=True)
class Shard:
    name: str
    fact_id: str
    query_ids: list[str]


FACT_POLICIES = ("known", "any")
STORE_DTYPES = ("float32", "float16")


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
    facts = sample_facts_per_relation(queries, per_relation, seed, known_facts(probes, lang))
    if not facts:
        raise ValueError(f"no fact is answered in {lang!r} (attribute.fact_policy: known); set attribute.fact_policy: any")
    return facts


def shard_name(fact_id: str) -> str:
    """A shard is named by its fact, so a run that attributes more (or other) facts keeps every
    finished shard of the facts it shares with an earlier run. Ids that are not file-name safe get
    a hash suffix so two of them cannot collide."""
    return f"shard-{safe_stem(fact_id)}.npz"


def plan_shards(queries: Sequence[Query], fact_ids: Sequence[str]) -> list[Shard]:
    by_fact: dict[str, list[str]] = defaultdict(list)
    for q in queries:
        by_fact[q.fact_id].append(q.query_id)
    return [Shard(shard_name(fact), fact, by_fact[fact]) for fact in fact_ids]


def fingerprint(settings: dict, encs: Sequence[Encoded]) -> str:
    payload = json.dumps({"settings": settings, "encoded": [asdict(e) for e in encs]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _stored(raw: np.ndarray, store_dtype: str) -> np.ndarray:
    """float16 keeps ~3 significant digits and range ±65504; maps beyond it would turn into inf."""
    if store_dtype == "float16" and np.abs(raw).max(initial=0.0) >= np.finfo(np.float16).max:
        raise ValueError("attribution values exceed the float16 range: set attribute.store_dtype: float32")
    return raw.astype(store_dtype)


def _shard_is_done(path: Path, print_: str, store_dtype: str = "float32") -> bool:
    """Kept when computed with the same settings and inputs (fingerprint) and stored as asked."""
    if not path.exists():
        return False
    try:
        with np.load(path) as data:
            return str(data["fingerprint"]) == print_ and data["raw"].dtype == np.dtype(store_dtype)
    except Exception:  # unreadable shard: recompute it
        return False


def _first_token_maps(path: Path, settings: dict, encs: Sequence[Encoded]) -> RawMaps | None:
    """Under ``answer_token: all``, the maps a first-token run left in this shard's file for the same
    queries and settings, stored as float32 (token 1 is that computation: identical on the same device
    and batch size, within float rounding otherwise, as for any shard kept across such a change)."""
    if settings.get("answer_token") != "all" or not path.exists():
        return None
    try:
        with np.load(path) as data:
            if str(data["fingerprint"]) != fingerprint({**settings, "answer_token": "first"}, encs) \
                    or data["raw"].dtype != np.float32 or len(data["raw"]) != len(encs):
                return None
            return RawMaps(data["raw"], data["n_baselines"])
    except Exception:  # unreadable: token 1 is computed
        return None


def run_attribution(
    adapter: ModelAdapter | None,
    queries: Sequence[Query],
    encs: Sequence[Encoded],
    shards: Sequence[Shard],
    cfg: AttributionConfig,
    settings: dict,
    out_dir: Path,
    executor: ShardExecutor | None = None,
    store_dtype: str = "float32",
) -> dict:
    """Compute (or resume) every shard; returns and writes the manifest. Shards are computed by
    ``executor`` (default: in this process on ``adapter``) and each is written the moment it arrives,
    its maps stored as ``store_dtype`` (float16 halves the disk; loading gives float32 either way)."""
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"attribute.store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if executor is None:
        if adapter is None:
            raise ValueError("run_attribution needs an adapter or an executor")
        executor = LocalExecutor(adapter)
    enc_by_id = {q.query_id: e for q, e in zip(queries, encs)}
    total = sum(len(s.query_ids) for s in shards)
    bar = tqdm(total=total, desc="attribute", unit="query")
    prints: dict[str, str] = {}
    jobs: list[ShardJob] = []
    for shard in shards:
        shard_encs = [enc_by_id[q] for q in shard.query_ids]
        prints[shard.name] = fingerprint(settings, shard_encs)
        if _shard_is_done(out_dir / shard.name, prints[shard.name], store_dtype):
            log.info("%s (%s) already done, kept", shard.name, shard.fact_id)
            bar.update(len(shard_encs))
        else:
            first = _first_token_maps(out_dir / shard.name, settings, shard_encs)
            if first is not None:
                log.info("%s (%s): token 1 of every answer read from the first-token run's shard", shard.name,
                         shard.fact_id)
            jobs.append(ShardJob(shard.name, shard.fact_id, shard_encs, first))
    by_name = {s.name: s for s in shards}
    started, computed = time.time(), 0

    def progress(n: int) -> None:
        nonlocal computed
        computed += n
        bar.update(n)
        bar.set_postfix(q_per_min=f"{60 * computed / max(time.time() - started, 1e-9):.1f}")

    for output in executor.map(jobs, cfg, progress):
        shard = by_name[output.name]
        atomic_save_npz(
            out_dir / shard.name, query_ids=np.array(shard.query_ids), raw=_stored(output.raw, store_dtype),
            n_baselines=output.n_baselines,
            fingerprint=np.array(prints[shard.name]), fact_id=np.array(shard.fact_id),
        )
    bar.close()
    keep = set(by_name)
    for stale in out_dir.glob("shard-*.npz"):
        if stale.name not in keep:
            stale.unlink()
    layers, neurons = _map_shape(adapter, out_dir, shards)
    manifest = {"settings": settings, "layers": layers, "neurons": neurons, "shards": [asdict(s) for s in shards]}
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def _map_shape(adapter: ModelAdapter | None, out_dir: Path, shards: Sequence[Shard]) -> tuple[int, int]:
    """(layers, neurons) of the maps: the adapter's, or read from a written shard."""
    if adapter is not None:
        return adapter.n_layers, adapter.n_neurons
    for shard in shards:
        with np.load(out_dir / shard.name) as data:
            return int(data["raw"].shape[1]), int(data["raw"].shape[2])
    return 0, 0


def load_attributions(out_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Manifest and raw [L, N] float32 attribution per query id, for the whole run in memory (tests,
    small runs); :func:`iter_fact_attributions` streams one fact at a time."""
    manifest = read_manifest(out_dir)
    raw: dict[str, np.ndarray] = {}
    for _, maps in iter_fact_attributions(out_dir, manifest):
        raw.update(maps)
    return manifest, raw


def read_manifest(out_dir: Path) -> dict:
    path = out_dir / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the attribute stage has not finished (dvc repro)")
    return json.loads(path.read_text(encoding="utf-8"))


def iter_fact_attributions(out_dir: Path, manifest: dict | None = None) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(fact id, {query id: raw [L, N] float32}) shard by shard: memory holds one fact at a time,
    whatever the run's size, and float16-stored shards come back as float32."""
    manifest = manifest if manifest is not None else read_manifest(out_dir)
    for shard in manifest["shards"]:
        yield shard["fact_id"], load_shard(out_dir / shard["name"])


def load_shard(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {str(qid): scores.astype(np.float32) for qid, scores in zip(data["query_ids"], data["raw"])}
