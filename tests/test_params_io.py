"""params.yaml as `dvc exp run -S` leaves it: floats that DVC writes without a dot are numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from matrice.experiments.inject import InjectConfig
from matrice.io import read_params, read_yaml

REPO = Path(__file__).resolve().parents[1]


def test_exponent_floats_without_a_dot_are_numbers_and_nothing_else_moves():
    text = "lrs: [3e-05, 1.0e-4, 1e3, -2E-2]\nn: 12\nname: saig\nquoted: '3e-05'\nflag: true\nnothing: null\nv: 0.5\n"
    values = read_yaml(text)
    assert values["lrs"] == [3e-05, 1e-4, 1000.0, -0.02] and all(isinstance(x, float) for x in values["lrs"])
    assert yaml.safe_load(text)["lrs"][0] == "3e-05"  # what plain PyYAML (YAML 1.1) gives
    assert values["quoted"] == "3e-05" and values["n"] == 12 and values["name"] == "saig"
    assert values["flag"] is True and values["nothing"] is None and values["v"] == 0.5


def test_params_that_dvc_exp_run_set_are_read_as_numbers(tmp_path):
    """The learning rates a `-S` sweep writes reach the injection config as floats."""
    pytest.importorskip("dvc", reason="dvc is not installed (a GPU machine's bare python)")
    from dvc.repo import Repo  # noqa: F401  (the writer DVC uses for -S)
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    with modify_yaml(path) as data:
        data["inject"]["lrs"]["direct_ft"] = [3.0e-5, 1.0e-4]
    assert "3e-05" in path.read_text()
    cfg = InjectConfig.from_params(read_params(path))
    assert cfg.sweep("direct_ft") == [3e-05, 1e-4]
