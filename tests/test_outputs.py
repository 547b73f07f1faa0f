"""Outputs a killed or repeated stage can trust: atomic writes with the umask's mode, byte-identical
npz files for equal arrays, and figures that name what they do not draw."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from matrice.io import atomic_save_npz, atomic_write_text


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.npz"

    class Boom:
        def __array__(self, *a, **k):
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_save_npz(target, a=np.zeros(3), b=Boom())
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(tmp_path / "t.txt", "done")
    assert (tmp_path / "t.txt").read_text() == "done" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    """Shared filesystems: outputs get a plainly created file's mode, not mkstemp's private 0o600."""
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "t.txt", "x")
        atomic_save_npz(tmp_path / "a.npz", a=np.zeros(2))
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {mode}

def test_npz_outputs_are_byte_for_byte_deterministic(tmp_path, monkeypatch):
    """Equal arrays written at different times hash the same, so a rerun that changes no number
    does not make DVC rerun everything downstream."""
    import hashlib
    import time as time_mod

    arrays = {"x": np.arange(6.0).reshape(2, 3), "ids": np.array(["a", "bb"]), "fp": np.array("f")}
    atomic_save_npz(tmp_path / "a.npz", **arrays)
    later = time_mod.time() + 3600
    monkeypatch.setattr(time_mod, "time", lambda: later)
    atomic_save_npz(tmp_path / "b.npz", **arrays)
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.npz", "b.npz")]
    assert digest[0] == digest[1]
    with np.load(tmp_path / "b.npz") as data:
        np.testing.assert_array_equal(data["x"], arrays["x"])
        assert list(data["ids"]) == ["a", "bb"] and str(data["fp"]) == "f"

def test_figures_name_methods_with_no_neurons_instead_of_drawing_zeros():
    from matrice.method.selection import NeuronSets
    from matrice.evaluation.report import not_drawn_note, split_empty

    sets = NeuronSets(methods=["matrice", "amig"], facts={})
    sets.add("a", {"matrice": np.array([[1, 2]]), "amig": np.zeros((0, 2))})
    sets.add("b", {"matrice": np.zeros((0, 2)), "amig": np.zeros((0, 2))})
    assert split_empty(sets, ["matrice", "amig"]) == (["matrice"], ["amig"])
    assert "AMIG: no neurons for any fact" in not_drawn_note(["amig"], str.upper)
    assert not_drawn_note([], str.upper) == ""
