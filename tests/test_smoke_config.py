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
                      judge, leaves, verdict_tables)
from stages.sequence import DEFAULT_KEY, EMBEDDED_SOURCE, StageRun, stage_commands  # noqa: E402

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

HEADER = ("| source | the paper's claim | we estimate | on | paper's sign | relations: mean [95% CI] (n) "
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
