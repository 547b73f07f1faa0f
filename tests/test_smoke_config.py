"""The pipeline benchmark's configs and report check (benchmarks/pipeline.py), without running a stage:
`make smoke` runs the pipeline itself; here its params must stay params.yaml's shape with only the
declared leaves changed, its stage list must be dvc.yaml's, and the verdict check must catch a claim."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from pipeline import (CONFIGS, Benchmark, auto_threads, changed_leaves, check_report, claims_possible,  # noqa: E402
                      judge, leaves, verdict_tables, with_overrides)
from stages.sequence import DEFAULT_KEY, EMBEDDED_SOURCE, StageRun, stage_commands  # noqa: E402

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

HEADER = ("| source | the paper's claim | we estimate | on | paper's sign | unit (relations; Table V: runs): mean [95% CI] (n) "
          "| facts: mean [95% CI] (n) | p | Holm p | family | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|\n")


def row(source: str, verdict: str, note: str = "") -> str:
    return (f"| {source} | claim | MATRICE − AMIG_k | evaluation | > 0 | 0.1 [−0.2, 0.4] (2) | 0.1 [0.0, 0.2] (4) "
            f"| 0.500 | 1.000 | primary | **{verdict}**{f' ({note})' if note else ''} |\n")


def report(*rows: str) -> str:
    return "# MATRICE report\n\n## Does the paper replicate here?\n\n" + HEADER + "".join(rows) + "\n#### Power\n"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_config_keeps_params_yaml_shape_and_changes_only_what_it_declares(name):
    params = CONFIGS[name].build(PARAMS)
    assert set(leaves(params)) == set(leaves(PARAMS))  # no key added or dropped: every stage reads what it expects
    changed = changed_leaves(PARAMS, params)
    assert changed <= CONFIGS[name].changes, changed - CONFIGS[name].changes
    assert params["models"] == {DEFAULT_KEY: {"source": EMBEDDED_SOURCE, "device": "cpu", "dtype": "float32"}}
    assert PARAMS == yaml.safe_load((REPO / "params.yaml").read_text())  # the builder copied, never mutated


def test_set_changes_one_params_leaf_as_dvc_exp_run_would_and_refuses_unknown_keys():
    params = with_overrides(CONFIGS["smoke"].build(PARAMS), ["answer_token=all", "edit.lambda1=2"])
    assert changed_leaves(CONFIGS["smoke"].build(PARAMS), params) == {"answer_token", "edit.lambda1"}
    assert params["answer_token"] == "all" and params["edit"]["lambda1"] == 2
    for bad in ("answer_tokens=all", "edit.nothing=1", "answer_token"):
        with pytest.raises(SystemExit, match="--set"):
            with_overrides(PARAMS, [bad])


def test_the_configs_are_the_documented_ones():
    smoke, reduced = CONFIGS["smoke"].build(PARAMS), CONFIGS["reduced"].build(PARAMS)
    assert smoke["dataset"]["relations"] == ["P36", "P30"] and smoke["dataset"]["languages"] == ["en", "fr", "zh"]
    assert smoke["attribute"]["facts_per_relation"] == 2 and smoke["attribute"]["fact_policy"] == "any"
    assert smoke["steps"] == 2 and smoke["inject"]["epochs"] == 1
    # two paraphrases localise, one is held out: UaQ has a spread and every experiment an evaluation query
    assert smoke["dataset"]["max_templates_per_language"] == 3 and smoke["attribute"]["templates_per_language"] == 2
    assert reduced["dataset"]["relations"] == ["P36"] and reduced["dataset"]["max_facts_per_relation"] == 10
    assert reduced["attribute"]["facts_per_relation"] == 2
    assert reduced["dataset"]["languages"] == PARAMS["dataset"]["languages"] and reduced["steps"] == PARAMS["steps"]


def test_the_stage_list_covers_every_dvc_yaml_stage_in_order():
    dvc = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    names = [name for name, _ in stage_commands([DEFAULT_KEY])]
    assert [n.split("@")[0] for n in names] == dvc
    assert all(cmd.startswith("python -m stages.") for _, cmd in stage_commands([DEFAULT_KEY]))


def test_the_check_passes_a_report_that_claims_nothing():
    text = report(row("Fig. 4", "inconclusive"), row("Table III", "not testable", "AMIG_k selected nothing"),
                  row("Fig. 6", "equivalent"), row("Table V", "no data"))
    assert [r.verdict for r in verdict_tables(text)[0]] == ["inconclusive", "not testable", "equivalent", "no data"]
    assert check_report(text, n_relations=2) == []


def test_the_check_fails_a_claim_two_relations_cannot_support():
    text = report(row("Fig. 4", "inconclusive"), row("Fig. 5", "replicates"))
    problems = check_report(text, n_relations=2)
    assert len(problems) == 1 and "Fig. 5" in problems[0] and "replicates" in problems[0]
    assert check_report(text.replace("replicates", "contradicts"), n_relations=2)
    assert check_report(text, n_relations=None) == []  # every relation: a claim can be earned


def test_the_check_fails_a_report_without_a_verdict_table():
    assert check_report("# MATRICE report\n\n| a | b |\n|---|---|\n| 1 | 2 |\n", n_relations=2)
    assert check_report(report(), n_relations=2)  # the header but no row


def test_a_claim_needs_enough_relations_for_the_sign_flip_test():
    assert not claims_possible(2, 0.05) and not claims_possible(5, 0.05)  # p >= 1/16
    assert claims_possible(6, 0.05) and claims_possible(None, 0.05)  # p can reach 1/32


def test_a_failed_stage_fails_the_run_with_its_stderr(tmp_path, capsys):
    record = Benchmark("smoke", [], False, 2, 1, [0.0, 0.0, 0.0], "now")
    runs = [StageRun("build_dataset", "python -m stages.build_dataset", 1.0, 0),
            StageRun("probe@gemma3_270m", "python -m stages.probe gemma3_270m", 2.0, 1, "ValueError: boom")]
    judge(runs, tmp_path, record)
    assert not record.ok and record.failed_stage == "probe@gemma3_270m"
    assert "ValueError: boom" in capsys.readouterr().err


def test_threads_follow_the_free_cores():
    assert auto_threads(2, 0.2) == 2 and auto_threads(2, 1.0) == 1 and auto_threads(2, 4.7) == 1
    assert auto_threads(16, 3.2) == 13


# ---- --work: the FLOP counter and the floor -------------------------------------------------------

STAGE_MODULE = '''
import sys
import torch

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16, bias=False)
    def forward(self, x):
        return self.up(x)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])
    def forward(self, x):
        return [layer(x) for layer in self.layers]

if __name__ == "__main__":
    x = torch.randn(4, 8)
    Net()(x)                                  # blocks: 2 x (2*4*8*16)
    x @ torch.randn(8, 3)                     # outside: 2*4*8*3
    if sys.argv[1:] == ["fail"]:
        raise SystemExit("a stage's clear error")
'''


def test_the_counter_splits_a_stage_flops_into_its_blocks_and_the_rest(tmp_path, monkeypatch):
    from count_flops import run_counted

    (tmp_path / "fake_stage.py").write_text(STAGE_MODULE)
    monkeypatch.chdir(tmp_path)
    record = run_counted("fake_stage", [])
    assert record["returncode"] == 0
    assert record["flops"] == {"blocks": 2 * 2 * 4 * 8 * 16, "outside": 2 * 4 * 8 * 3, "total": 2 * 4 * 8 * (32 + 3)}
    assert sum(record["by_operator"].values()) == record["flops"]["total"]
    assert run_counted("fake_stage", ["fail"])["returncode"] == 1  # the stage's error is kept, not swallowed


def test_block_names_of_every_family_layout_count_as_blocks():
    from count_flops import BLOCK

    for name in ("Gemma3TextModel.layers.0", "Gemma3ForCausalLM.model.layers.17", "GPT2LMHeadModel.transformer.h.3",
                 "BertForMaskedLM.bert.encoder.layer.11"):
        assert BLOCK.match(name), name
    for name in ("Global", "Gemma3TextModel", "Gemma3TextModel.layers.0.mlp", "Gemma3ForCausalLM.lm_head"):
        assert not BLOCK.match(name), name


def test_the_floor_is_the_counted_work_at_the_measured_rate():
    from pipeline import counted_stages, stage_work

    runs = [StageRun("attribute@m", "python -m stages.attribute m", 100.0, 0),
            StageRun("edit@m", "python -m stages.edit m", 20.0, 0),
            StageRun("report", "python -m stages.report", 2.0, 0),
            StageRun("inject@m", "python -m stages.inject m", 5.0, 1)]
    assert [r.stage for r in counted_stages(runs)] == ["edit@m"]  # attribute resumes; report has no model; failed
    counted = {"flops": {"blocks": 6e9, "outside": 4e9, "total": 10e9}, "returncode": 0}
    work = stage_work(runs[1], counted, rate=1e9, startup=10.0)
    assert (work.floor_seconds, work.floor_share, work.floor_share_after_startup) == (10.0, 0.5, 1.0)
    assert (work.gflop_blocks, work.gflop_outside) == (6.0, 4.0)


MEMO_STAGE = '''
import sys
import torch
from matrice.memo import Memo

memo = Memo.for_model("results/m/edit_runs", torch.nn.Linear(2, 2), code=["matrice.experiments.edit.passes"])
value = memo.get_or_compute(lambda: float((torch.randn(8, 8) @ torch.randn(8, 8)).sum()), kind="pass")
print("stored" if memo.directory.name == "edit_runs" else "elsewhere")
'''


def test_the_counted_rerun_computes_what_the_timed_run_stored(tmp_path, monkeypatch):
    import torch
    from count_flops import run_counted
    from matrice.memo import Memo

    (tmp_path / "memo_stage.py").write_text(MEMO_STAGE)
    monkeypatch.chdir(tmp_path)
    # the timed run stored its result: a plain rerun would read it back and multiply nothing
    Memo.for_model(tmp_path / "results/m/edit_runs", torch.nn.Linear(2, 2),
                   code=["matrice.experiments.edit.passes"]).get_or_compute(lambda: 1.0, kind="pass")
    assert run_counted("memo_stage", [])["flops"]["total"] == 2 * 8 * 8 * 8
    assert Memo.for_model(tmp_path / "x", torch.nn.Linear(2, 2)).directory == tmp_path / "x"  # restored afterwards
    assert len(list((tmp_path / "results/m/edit_runs").iterdir())) == 1  # the timed run's entry, untouched


def test_a_warm_run_takes_no_start_up_off_its_stages():
    from pipeline import stage_work, work_table

    run = StageRun("edit@m", "python -m stages.edit m", 8.0, 0)
    work = stage_work(run, {"flops": {"blocks": 2e9, "outside": 2e9, "total": 4e9}, "returncode": 0}, rate=1e9, startup=0.0)
    assert (work.floor_share, work.floor_share_after_startup) == (0.5, None)
    assert "warm-started" in work_table([work], 1e9, 0.0)


TRAINING_STAGE = '''
import copy, gc, weakref
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

base, copies = Net(), []
for _ in range(3):  # a fresh copy trained per run, as injection does
    net = copy.deepcopy(base)
    net(torch.randn(4, 8)).sum().backward()
    copies.append(weakref.ref(net.layers[0].weight))
    del net
gc.collect()
print("alive", sum(ref() is not None for ref in copies))
'''


def test_the_counter_lets_go_of_each_trained_copy(tmp_path, monkeypatch, capsys):
    from count_flops import run_counted

    (tmp_path / "training_stage.py").write_text(TRAINING_STAGE)
    monkeypatch.chdir(tmp_path)
    record = run_counted("training_stage", [])
    assert "alive 0" in capsys.readouterr().out  # torch's tracker alone keeps every copy's graph until it exits
    # forward 2*4*8*8 per layer; backward twice that for the second layer (input and weight grads), once
    # for the first (its input needs none), all inside the blocks
    assert record["flops"] == {"blocks": 3 * (2 * 512 + 2 * 512 + 512), "outside": 0, "total": 3 * 2560}


def test_a_counter_without_torchs_tracker_internals_is_used_as_it_is():
    from types import SimpleNamespace

    from count_flops import released_backward_hooks

    counter = SimpleNamespace(mod_tracker=SimpleNamespace())
    with released_backward_hooks(counter):
        pass
    assert vars(counter.mod_tracker) == {}  # nothing patched, nothing left behind
