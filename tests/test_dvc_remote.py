"""A team shares results through a DVC remote: the pipeline's outputs pushed from one clone are
pulled, exact, into another, and DVC there sees nothing to rerun (docs/scale.md "Sharing results")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_push_to_a_local_remote_then_pull_into_a_fresh_clone(tmp_path):
    pytest.importorskip("dvc", reason="dvc is not installed (a GPU machine's bare python)")
    from stages.sequence import project_copy

    origin = project_copy(tmp_path / "origin", yaml.safe_load((REPO / "params.yaml").read_text()))
    shutil.copy(REPO / "dvc.yaml", origin / "dvc.yaml")
    _run(origin, "git", "init", "-q")
    _run(origin, sys.executable, "-m", "dvc", "init", "-q")
    _run(origin, sys.executable, "-m", "dvc", "repro", "-q", "build_dataset")  # the dataset stage: real and fast
    _run(origin, sys.executable, "-m", "dvc", "remote", "add", "-d", "team", str(tmp_path / "remote"))
    _run(origin, sys.executable, "-m", "dvc", "push", "-q", "build_dataset")
    _run(origin, "git", "add", "-A")
    _run(origin, "git", "commit", "-qm", "dataset")
    assert not (tmp_path / "clone").exists()
    _run(tmp_path, "git", "clone", "-q", str(origin), "clone")
    clone = tmp_path / "clone"
    assert not (clone / "data" / "dataset").exists()  # only the pointer travels with git
    _run(clone, sys.executable, "-m", "dvc", "pull", "-q", "build_dataset")
    for path in sorted((origin / "data" / "dataset").rglob("*")):
        if path.is_file():
            assert (clone / path.relative_to(origin)).read_bytes() == path.read_bytes(), path
    assert "up to date" in _run(clone, sys.executable, "-m", "dvc", "status", "build_dataset")
