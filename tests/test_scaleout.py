"""Scale-out: the Ray executor on a local Ray instance with 2 CPU workers and a tiny model gives the
local executor's shards; a killed worker's shard is recomputed and nothing else; an interrupted
driver resumes without recomputing finished shards."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from matrice.method.attribution.common import AttributionConfig
from matrice.method.attribution.executors import RayExecutor
from matrice.method.attribution.runner import load_attributions, plan_shards, run_attribution, sample_facts_per_relation
from matrice.data.build import build_dataset
from matrice.data.sources import DatasetConfig
from matrice.models.loading import load_skeleton
from matrice.models.tiny import tiny_adapter
from matrice.probing import encode_all

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
CFG = AttributionConfig(steps=3, batch_size=64)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 2 CPUs, shared by the module (startup costs seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def run_inputs():
    queries = build_dataset(DatasetConfig(relations=["P36", "P30"], languages=["en", "fr"], max_facts_per_relation=3,
                                          max_templates_per_language=2)).queries
    adapter = tiny_adapter("llama")
    facts = sample_facts_per_relation(queries, None, 0)
    return adapter, queries, encode_all(adapter, queries, few_shot=True), plan_shards(queries, facts)


@pytest.fixture(scope="module")
def local_result(run_inputs, tmp_path_factory):
    """The local executor with one torch thread, as each CPU worker runs (cpus_per_worker=1): float
    sums are then done in the same order, so the shards must be equal bit for bit."""
    adapter, queries, encs, shards = run_inputs
    out = tmp_path_factory.mktemp("local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_attribution(adapter, queries, encs, shards, CFG, {"steps": 3}, out)
    finally:
        torch.set_num_threads(threads)
    return load_attributions(out)[1]


def _ray_executor(trace: Path | None = None, **kw) -> RayExecutor:
    return RayExecutor(functools.partial(tiny_adapter, "llama"), address="auto", workers=2,
                       trace_dir=str(trace) if trace else None, **kw)


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for qid in a:
        np.testing.assert_array_equal(a[qid], b[qid])


def test_ray_executor_gives_the_local_executors_shards(ray_local, run_inputs, local_result, tmp_path):
    """The driver holds no weights (a meta-device skeleton, as the stage loads it for Ray): it
    encodes the same queries and the workers compute the local executor's shards."""
    adapter, queries, encs, shards = run_inputs
    adapter.model.save_pretrained(tmp_path / "model")
    adapter.tokenizer.save_pretrained(tmp_path / "model")
    driver = load_skeleton(str(tmp_path / "model"))
    assert {p.device.type for p in driver.model.parameters()} == {"meta"}
    assert encode_all(driver, queries, few_shot=True) == encs
    trace = tmp_path / "trace"
    trace.mkdir()
    with _ray_executor(trace) as executor:
        manifest = run_attribution(driver, queries, encs, shards, CFG, {"steps": 3}, tmp_path / "out", executor=executor)
    assert (manifest["layers"], manifest["neurons"]) == (adapter.n_layers, adapter.n_neurons)
    _assert_same(load_attributions(tmp_path / "out")[1], local_result)
    assert len(list(trace.iterdir())) == len(shards)  # each shard computed once
    pids = {p.name.split(".")[-2] for p in trace.iterdir()}
    assert len(pids) == 2  # both workers took shards


def test_a_killed_worker_loses_only_its_shard(ray_local, run_inputs, local_result, tmp_path):
    adapter, queries, encs, shards = run_inputs
    trace = tmp_path / "trace"
    trace.mkdir()
    outputs, killed = {}, []
    with _ray_executor(trace) as executor:
        for output in executor.map([_job(s, encs, queries) for s in shards], CFG, lambda n: None):
            outputs[output.name] = output
            if not killed:  # after the first shard arrives, the other worker has one in flight: kill it
                victim = executor.actors[1]
                killed.append(ray.get(victim.pid.remote()))
                os.kill(killed[0], 9)
    assert set(outputs) == {s.name for s in shards}
    starts = [p.name for p in trace.iterdir()]
    assert len(shards) <= len(starts) <= len(shards) + 1  # at most the lost shard was computed twice
    for shard in shards:
        got = {qid: raw for qid, raw in zip(shard.query_ids, outputs[shard.name].raw)}
        _assert_same(got, {qid: local_result[qid] for qid in shard.query_ids})


def _job(shard, encs, queries):
    from matrice.method.attribution.executors import ShardJob

    by_id = {q.query_id: e for q, e in zip(queries, encs)}
    return ShardJob(shard.name, shard.fact_id, [by_id[q] for q in shard.query_ids])


def test_an_interrupted_driver_resumes_without_recomputing_finished_shards(ray_local, run_inputs, local_result,
                                                                          tmp_path, monkeypatch):
    import matrice.method.attribution.runner as runner

    adapter, queries, encs, shards = run_inputs
    out = tmp_path / "out"
    real_save, saved = runner.atomic_save_npz, []

    def dies_after_two(path, **arrays):
        if len(saved) == 2:
            raise KeyboardInterrupt("driver killed")
        real_save(path, **arrays)
        saved.append(Path(path).name)

    monkeypatch.setattr(runner, "atomic_save_npz", dies_after_two)
    with pytest.raises(KeyboardInterrupt), _ray_executor() as executor:
        run_attribution(adapter, queries, encs, shards, CFG, {"steps": 3}, out, executor=executor)
    assert sorted(p.name for p in out.glob("shard-*.npz")) == sorted(saved)  # only complete shards on disk
    monkeypatch.setattr(runner, "atomic_save_npz", real_save)
    trace = tmp_path / "trace"
    trace.mkdir()
    with _ray_executor(trace) as executor:
        run_attribution(adapter, queries, encs, shards, CFG, {"steps": 3}, out, executor=executor)
    recomputed = {p.name.split(".npz")[0] + ".npz" for p in trace.iterdir()}
    assert recomputed == {s.name for s in shards} - set(saved)
    _assert_same(load_attributions(out)[1], local_result)


def test_without_an_executor_the_runner_needs_an_adapter(run_inputs, tmp_path):
    _, queries, encs, shards = run_inputs
    with pytest.raises(ValueError, match="adapter or an executor"):
        run_attribution(None, queries, encs, shards, CFG, {}, tmp_path)
