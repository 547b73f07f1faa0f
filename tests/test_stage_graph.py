"""The DVC wiring: what each stage depends on (code and params), its command, and the message a
missing input gives."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _params_of(stage: dict) -> set[str]:
    body = stage.get("do", stage)
    names = set()
    for p in body.get("params", []):
        names.add(p if isinstance(p, str) else next(iter(p)))
    return {n.split(".")[0] for n in names}


def test_sweeping_method_hyperparameters_never_reruns_attribution_or_aggregation():
    stages = _stages()
    cheap = {"tau", "tau_amig"}
    assert not (_params_of(stages["attribute"]) & (cheap | {"alpha1", "alpha2", "beta1", "beta2", "layer_norm", "lang_norm"}))
    assert not (_params_of(stages["aggregate"]) & cheap)
    assert cheap <= _params_of(stages["select"])
    upstream = ["prepare_model", "build_dataset", "probe", "attribute", "aggregate"]
    for name in upstream:
        assert not (_params_of(stages[name]) & cheap), name


def test_params_use_the_paper_names_at_top_level():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in ("tau", "alpha1", "alpha2", "beta1", "beta2", "steps"):
        assert isinstance(params[name], (int, float)), name


def test_every_stage_command_has_its_module():
    import importlib

    for name, stage in _stages().items():
        cmd = stage.get("do", stage)["cmd"]
        module = cmd.split()[2]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), (name, module)
        assert callable(importlib.import_module(module).main), (name, module)  # imports: no syntax error

def test_experiment_inputs_missing_give_clear_messages(tmp_path, monkeypatch):
    from stages import common

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="has not been probed yet"):
        common.load_probes("mgpt")
    with pytest.raises(SystemExit, match="run the select stage"):
        common.load_neuron_sets("mgpt")
    with pytest.raises(SystemExit, match="run the prepare_model stage"):
        common.load_prepared("mgpt", {"models": {"mgpt": {"source": "x"}}})
    with pytest.raises(SystemExit, match="models.nope is not defined"):
        common.model_params({"models": {"mgpt": {}}}, "nope")

def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def _local_imports(path: Path) -> set[str]:
    """Project modules (matrice.*, stages.*) a file imports, with the packages whose __init__ runs."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in found:
            parts = name.split(".")
            if parts[0] in ("matrice", "stages"):
                names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def _files_run_by(module: str) -> set[Path]:
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in _LOADERS:
            continue
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo.extend(_local_imports(path))
    return seen


# file loading and writing only: they move bytes, never change a number (the dataset's own code is a
# dep of build_dataset, whose output every later stage depends on); stages.warm decides which process
# runs a stage, not what it computes (tests/test_end_to_end.py: warm outputs equal a cold run's)
_LOADERS = {"stages.common", "matrice.io", "matrice.data", "matrice.data.schema", "stages.warm"}


def _docstring_only(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def test_every_stage_depends_on_the_code_it_runs():
    """A stage whose code (or a module it imports) changes must rerun: its deps cover every project
    file its entry point imports, transitively (loaders excepted, see _LOADERS)."""
    for name, stage in _stages().items():
        body = stage.get("do", stage)
        module = body["cmd"].split()[2]
        deps = [d.replace("${key}", "x") for d in body.get("deps", [])]
        for path in sorted(_files_run_by(module)):
            rel = path.relative_to(ROOT).as_posix()
            if rel in ("matrice/__init__.py", "stages/__init__.py") or _docstring_only(path):  # a version string, a package's doc
                continue
            covered = any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)
            assert covered, f"dvc.yaml stage {name!r} runs {rel} but does not list it in deps"

