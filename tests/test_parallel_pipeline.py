"""stages.parallel: the stale stages run several at a time in the graph's order and end recorded in
dvc.lock exactly as `dvc repro` leaves them (`dvc status` clean); a failure stops what depends on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.parallel import main, stale_stages

# a → b@x, b@y (one second each: they overlap only when run together) → c; b's outputs persist
STAGE = """import json, sys, time
name, inputs, output = sys.argv[1], sys.argv[2:-1], sys.argv[-1]
start = time.time()
if name == "b@y" and open("fail").read().strip() == "yes":
    sys.exit(3)
time.sleep(float(open("pause").read()))
text = name + ":" + "+".join(open(i).read() for i in inputs)
open(output, "w").write(text)
open("times/" + name, "w").write(json.dumps([start, time.time()]))
"""


def _project(root: Path) -> Path:
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / "stage.py").write_text(STAGE)
    (root / "times").mkdir()
    (root / "pause").write_text("1.0")
    (root / "fail").write_text("no")
    (root / "params.yaml").write_text("factor: 1\n")
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
    assert (root / "c.txt").read_text() == "c:b@x:a:1.0+no+b@y:a:1.0+no"
    assert _status(root) == {}  # dvc.lock records every stage as `dvc repro` would
    assert stale_stages(root) == [] and main(["--jobs", "2"]) == 0

    (root / "pause").write_text("0.1")  # a's input: a, both b and c run again; one at a time with --jobs 1
    assert [s.address for s in stale_stages(root)] == ["a", "b@x", "b@y", "c"]
    assert main(["--jobs", "1"]) == 0 and _status(root) == {}
    t = _times(root)
    assert t["b@x"][1] <= t["b@y"][0] or t["b@y"][1] <= t["b@x"][0]
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
