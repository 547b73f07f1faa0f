"""stages.parallel: the stale stages run several at a time in the graph's order and end recorded in
dvc.lock exactly as `dvc repro` leaves them (`dvc status` clean); a failure stops what depends on it;
the stage with the longest remaining path starts first; with -S and --exp it is `dvc exp run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.parallel import main, read_durations, remaining_path, set_params, stale_stages, yaml_float

# a → b@x, b@y (one second each: they overlap only when run together) → c; b's outputs persist
STAGE = """import json, os, sys, time
name, inputs, output = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
start = time.time()
if name == "b@y" and open("fail").read().strip() == "yes":
    sys.exit(3)
time.sleep(float(open("pause").read()))
text = name + ":" + "+".join(open(i).read() for i in inputs)
open(output, "w").write(text)
open("times/" + name, "w").write(json.dumps([start, time.time(), int(os.environ["OMP_NUM_THREADS"])]))
"""


def _project(root: Path, git: bool = False) -> Path:
    if git:
        for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"]):
            subprocess.run(command, cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", *([] if git else ["--no-scm"])], cwd=root, check=True)
    (root / "stage.py").write_text(STAGE)
    (root / "times").mkdir()
    (root / "pause").write_text("1.0")
    (root / "fail").write_text("no")
    (root / "params.yaml").write_text("factor: 1         # a's parameter\nother: [1, 2]     # untouched\n")
    run = f"{sys.executable} stage.py"
    stages = {
        "a": {"cmd": f"{run} a pause a.txt", "deps": ["stage.py", "pause"], "params": ["factor"],
              "outs": ["a.txt"]},
        "b": {"foreach": ["x", "y"],
              "do": {"cmd": f"{run} b@${{item}} a.txt fail b_${{item}}.txt", "deps": ["a.txt", "fail"],
                     "outs": [{"b_${item}.txt": {"persist": True}}]}},
        "c": {"cmd": f"{run} c b_x.txt b_y.txt c.txt", "deps": ["b_x.txt", "b_y.txt"], "outs": ["c.txt"]},
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return root


def _status(root: Path) -> dict:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status()


def _times(root: Path) -> dict[str, list[float]]:
    return {p.name: json.loads(p.read_text()) for p in (root / "times").iterdir()}


def test_stale_stages_run_together_in_the_graph_order_and_end_recorded(tmp_path, monkeypatch):
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    assert [s.address for s in stale_stages(root)] == ["a", "b@x", "b@y", "c"]
    assert main(["--jobs", "2", "--threads", "1"]) == 0
    t = _times(root)
    assert t["a"][1] <= min(t["b@x"][0], t["b@y"][0]) and max(t["b@x"][1], t["b@y"][1]) <= t["c"][0]
    assert t["b@x"][0] < t["b@y"][1] and t["b@y"][0] < t["b@x"][1]  # the two b stages overlapped
    # a and c run alone (all that waits reads from them): they get both lanes' threads
    assert {name: times[2] for name, times in t.items()} == {"a": 2, "b@x": 1, "b@y": 1, "c": 2}
    assert (root / "c.txt").read_text() == "c:b@x:a:1.0+no+b@y:a:1.0+no"
    assert _status(root) == {}  # dvc.lock records every stage as `dvc repro` would
    assert stale_stages(root) == [] and main(["--jobs", "2"]) == 0

    (root / "pause").write_text("0.1")  # a's input: a, both b and c run again; one at a time with --jobs 1
    assert [s.address for s in stale_stages(root)] == ["a", "b@x", "b@y", "c"]
    assert main(["--jobs", "1"]) == 0 and _status(root) == {}
    t = _times(root)
    assert t["b@x"][1] <= t["b@y"][0] or t["b@y"][1] <= t["b@x"][0]
    assert {times[2] for times in t.values()} == {os.cpu_count() or 1}  # --jobs 1: every stage has the machine
    assert [s.address for s in stale_stages(root, ["b@x"])] == []


def test_a_failed_stage_stops_what_depends_on_it_and_keeps_what_finished(tmp_path, monkeypatch, capsys):
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    (root / "fail").write_text("yes")
    assert main(["--jobs", "2", "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED   b@y (exit 3" in out and "not started: c" in out
    assert not (root / "c.txt").exists()
    assert set(_status(root)) == {"b@y", "c"}  # a and b@x were recorded
    (root / "fail").write_text("no")
    assert main(["--jobs", "2"]) == 0 and _status(root) == {}


def test_a_target_brings_only_its_upstream_up_to_date(tmp_path, monkeypatch):
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    assert [s.address for s in stale_stages(root, ["b@x"])] == ["a", "b@x"]
    assert main(["b@x"]) == 0 and set(_status(root)) == {"b@y", "c"}
    with pytest.raises(SystemExit, match="no stage 'nope'"):
        stale_stages(root, ["nope"])


def test_the_ready_stage_with_the_longest_remaining_path_starts_first(tmp_path, monkeypatch):
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    stages = stale_stages(root)
    assert remaining_path(stages, {"a": 1, "b@x": 2, "b@y": 5, "c": 1}) == {"a": 7, "b@x": 3, "b@y": 6, "c": 1}
    assert remaining_path(stages, {}) == {"a": 0, "b@x": 0, "b@y": 0, "c": 0}
    log_dir = root / ".dvc" / "tmp" / "parallel"
    log_dir.mkdir(parents=True)
    (log_dir / "durations.json").write_text(json.dumps({"b@x": 0.5, "b@y": 9.0}))  # b@y took longer last time
    assert main(["--jobs", "1"]) == 0
    t = _times(root)
    assert t["b@y"][1] <= t["b@x"][0]  # so it ran first, though dvc.yaml lists b@x first
    durations = read_durations(log_dir)
    assert set(durations) == {"a", "b@x", "b@y", "c"} and all(0.9 < durations[s] < 30 for s in durations)

    (log_dir / "durations.json").write_text("not json")  # a damaged record: dvc.yaml's order again
    (root / "pause").write_text("0.2")
    assert main(["--jobs", "1"]) == 0
    t = _times(root)
    assert t["b@x"][1] <= t["b@y"][0]


def test_set_params_and_exp_are_dvc_exp_run_with_stages_at_a_time(tmp_path, monkeypatch):
    root = _project(tmp_path, git=True)
    monkeypatch.chdir(root)
    assert main(["--jobs", "2"]) == 0
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "baseline"], cwd=root, check=True)

    with pytest.raises(SystemExit, match="Could not override 'nope'"):
        main(["-S", "nope=2", "--exp"])
    with pytest.raises(SystemExit, match="no parameter file missing.yaml"):
        main(["-S", "missing.yaml:factor=2"])
    assert (root / "params.yaml").read_text().startswith("factor: 1 ")  # nothing written

    before = _times(root)
    assert main(["--jobs", "2", "-S", "factor=2", "--exp", "--name", "f2"]) == 0
    assert (root / "params.yaml").read_text() == "factor: 2         # a's parameter\nother: [1, 2]     # untouched\n"
    assert _status(root) == {}  # every stage downstream of the parameter ran and is recorded
    assert all(_times(root)[s][0] > before[s][1] for s in ("a", "b@x", "b@y", "c"))  # a's parameter: all reran
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, check=True,
                           capture_output=True, text=True).stdout
    assert '"f2"' in shown  # saved as an experiment, as `dvc exp run -S factor=2 -n f2` would be
    diff = subprocess.run([sys.executable, "-m", "dvc", "params", "diff", "--json"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    assert json.loads(diff) == {"params.yaml": {"factor": {"old": 1, "new": 2, "diff": 1}}}


@pytest.mark.parametrize("listed", [
    "langs:\n- en\n- fr\n",          # PyYAML's block lists (dash at the key's indent)
    "langs:  # kept\n- en\n- fr\n",
    "langs:\n  - en\n  - fr\n",      # params.yaml's (dash two columns in)
])
def test_set_params_rewrites_only_the_changed_values_and_writes_floats_every_reader_takes(tmp_path, listed):
    text = f"train:\n  lrs: [0.001, 0.003]        # grid\n  epochs: 5\n{listed}"
    (tmp_path / "params.yaml").write_text(text)
    from ruamel.yaml.representer import RoundTripRepresenter
    ruamels = {t: RoundTripRepresenter.yaml_representers.get(t) for t in (float, type(None))}
    set_params(tmp_path, ["train.lrs=[3e-5,1.0e-4]"])
    assert {t: RoundTripRepresenter.yaml_representers.get(t) for t in ruamels} == ruamels  # DVC's writer untouched
    written = (tmp_path / "params.yaml").read_text()
    assert written == text.replace("[0.001, 0.003]   ", "[3.0e-05, 0.0001]")  # comments and list style kept
    assert yaml.safe_load(written)["train"]["lrs"] == [3e-05, 1e-04]  # floats to YAML 1.1 readers too


def test_yaml_float_keeps_a_dot_before_the_exponent():
    assert [yaml_float(v) for v in (3e-05, 1e20, -2.5e-07, 0.001, 16.0)] == ["3.0e-05", "1.0e+20", "-2.5e-07", "0.001", "16.0"]
    assert all(yaml.safe_load(yaml_float(v)) == v for v in (3e-05, 1e20, -2.5e-07, 0.001, 16.0))
