"""The GPU check's CPU dry run (`make gpu-check DEVICE=cpu`): every part runs on tiny shapes and
writes the files a GPU run writes, so the one command a GPU machine runs cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check import PARTS, final_counts, goal_lines, summary_markdown  # noqa: E402

FILES = ("environment.json", "engine.json", "edit_rows.json", "tests.json", "ray.json", "pipeline.json", "summary.md",
         "gpu_check.log", "pipeline_logs")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-check")
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_dry_run_writes_every_file_and_every_part_succeeds(dry_run):
    assert sorted(p.name for p in dry_run.iterdir()) == sorted(FILES)
    checks = {}
    for name in ("environment", "edit_rows", "tests", "ray", "pipeline"):
        checks[name] = json.loads((dry_run / f"{name}.json").read_text())["check"]
    engine = json.loads((dry_run / "engine.json").read_text())
    checks.update({f"engine_{k}": v["check"] for k, v in engine.items()})
    assert set(checks) == set(PARTS)
    ray_ok = {"ok"} if json.loads((dry_run / "environment.json").read_text())["packages"].get("ray") else {"skipped"}
    for part, check in checks.items():
        assert check["status"] in (ray_ok if part == "ray" else {"ok"}), (part, check)


def test_the_dry_run_measures_what_it_reports(dry_run):
    engine = json.loads((dry_run / "engine.json").read_text())
    for run in engine.values():
        assert run["shapes"] and all(r["rows_per_s"] > 0 for s in run["shapes"] for r in s["fast"])
    reference = engine["reference"]["shapes"][0]["reference"]
    assert reference["max_relative_difference"] < 1e-4  # the fast engine agrees with the reference
    tests = json.loads((dry_run / "tests.json").read_text())
    assert tests["finished"] and tests["counts"].get("passed", 0) >= 1 and not tests["failures"]
    pipeline = json.loads((dry_run / "pipeline.json").read_text())
    assert pipeline["all_stages_ran"] and pipeline["stages"][-1]["stage"] == "report"
    assert "running" not in pipeline  # every stage finished
    logs = {p.stem for p in (dry_run / "pipeline_logs").iterdir()}
    assert logs == {s["stage"] for s in pipeline["stages"]}
    rows = json.loads((dry_run / "edit_rows.json").read_text())
    assert rows["speedup_over_one"]["1"] == 1.0 and set(rows["best_seconds_per_fact"]) == {"1", "3", "6", "18"}
    assert all(v["same_rank_and_top"] == 1.0 and v["max_relative_prob_difference"] < 1e-4
               for v in rows["scores_against_one_per_pass"].values())  # stacked edits score as applied ones
    summary = (dry_run / "summary.md").read_text()
    for section in ("## Attribution engine", "## Editing passes", "## Tests on the device", "## Ray executor", "## Pipeline end to end", "## Goals"):
        assert section in summary


def test_a_part_cut_by_its_time_box_is_reported_and_the_rest_still_runs(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(tmp_path),
                           "--parts", "environment", "engine_fp32", "--budget", "engine_fp32=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "environment.json").read_text())["check"]["status"] == "ok"
    assert json.loads((tmp_path / "engine.json").read_text())["fp32"]["check"]["status"] == "timed_out"
    assert "| engine_fp32 | timed_out |" in (tmp_path / "summary.md").read_text()


def test_a_pipeline_cut_by_its_time_box_names_the_stage_it_was_in_and_its_log(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(tmp_path),
                           "--parts", "pipeline", "--budget", "pipeline=45"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline = json.loads((tmp_path / "pipeline.json").read_text())
    assert pipeline["check"]["status"] == "timed_out" and not pipeline.get("all_stages_ran")
    running = pipeline["running"]
    assert running["stage"] not in {s["stage"] for s in pipeline["stages"]}
    assert (tmp_path / running["log"]).exists()
    assert f"inside `{running['stage']}`" in (tmp_path / "summary.md").read_text()


def test_pytest_closing_line_gives_the_counts():
    assert final_counts("==== 661 passed, 19 skipped in 68.84s (0:01:08) ====") == {"passed": 661, "skipped": 19}
    assert final_counts("== 2 failed, 3 passed, 1 error in 4.2s ==") == {"failed": 2, "passed": 3, "error": 1}
    assert final_counts("tests/test_x.py::test_y PASSED [ 99%]") == {}  # a cut run keeps the verbose counts


def test_goals_are_judged_only_on_what_was_measured():
    results = {"engine": {"bf16": {"shapes": [{"shape": "llama-2-7b", "fast": [
        {"fraction_of_peak": 0.3}, {"batch_size": 2048, "error": "out of memory"}, {"fraction_of_peak": 0.45}]}]}},
        "pipeline": {"all_stages_ran": False, "total_seconds": 100.0}}
    lines = goal_lines(results)
    assert lines[0].endswith("0.45 — met")
    assert lines[1].endswith("not measured")  # no Gemma shape ran
    assert lines[2].endswith("not measured")  # a pipeline that did not finish has no total
    assert "## Goals" in summary_markdown({"environment": {}, "pipeline": results["pipeline"]}, "cuda")
    reduced = {"pipeline": {"all_stages_ran": True, "total_seconds": 100.0, "config": "reduced"}}
    assert goal_lines(reduced)[2].endswith("not measured")  # the goal is the default's
    whole = {"pipeline": {"all_stages_ran": True, "total_seconds": 700.0, "config": "default"}}
    assert goal_lines(whole)[2].endswith("700.0 — not met")
