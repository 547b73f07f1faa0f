"""The result memo: keys cover what determines a result, and a memoized injection equals a fresh one."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest
import torch

import matrice.experiments.inject.training as inject_module
from matrice.experiments.inject import InjectConfig, inject_knowledge
from matrice.memo import PACKAGE_DIR, Memo, code_fingerprint, model_digest, module_sources, tokenizer_digest
from conftest import tiny_on_device as tiny_adapter  # on MATRICE_TEST_DEVICE
from implant import FACTS, QUERIES, pairs, probe

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only spin-wait


def test_keys_change_with_every_input(tmp_path):
    memo = Memo(tmp_path, "salt")
    base = memo.key(variant="matrice", lr=1e-3, neurons=pairs((2, 1)))
    assert base == memo.key(lr=1e-3, neurons=np.array([[2, 1]]), variant="matrice")  # order and array type
    assert base != memo.key(variant="matrice", lr=1e-3, neurons=pairs((2, 2)))
    assert base != memo.key(variant="matrice", lr=3e-3, neurons=pairs((2, 1)))
    assert base != Memo(tmp_path, "other salt").key(variant="matrice", lr=1e-3, neurons=pairs((2, 1)))
    with pytest.raises(TypeError):
        memo.key(bad=object())


def test_model_digest_sees_one_changed_weight_and_code_fingerprint_is_stable():
    a = tiny_adapter("gpt2")
    before = model_digest(a.model)
    assert before == model_digest(a.model)
    with torch.no_grad():
        a.layers[1].mlp.c_proj.weight[3, 2] += 1e-6
    assert model_digest(a.model) != before
    assert code_fingerprint() == code_fingerprint() and len(code_fingerprint()) == 64


def _package(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_module_sources_follow_imports_transitively_and_nothing_else(tmp_path):
    _package(tmp_path, {
        "pkg/__init__.py": "from pkg import unrelated\n",
        "pkg/a.py": "import os\n\ndef f():\n    from . import b  # a function-level, relative import\n    return b\n",
        "pkg/b.py": "from pkg.sub.c import g\nimport numpy\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..sub import d\n\ndef g():\n    return d\n",
        "pkg/sub/d.py": "X = 1\n",
        "pkg/unrelated.py": "import pkg.a\n",
    })
    found = [p.relative_to(tmp_path).as_posix() for p in module_sources(["pkg.a"], root=tmp_path, package="pkg")]
    assert found == ["pkg/a.py", "pkg/b.py", "pkg/sub/c.py", "pkg/sub/d.py"]  # no parent or container __init__
    assert [p.name for p in module_sources(["pkg.unrelated"], root=tmp_path, package="pkg")] == \
        ["a.py", "b.py", "c.py", "d.py", "unrelated.py"]
    _package(tmp_path, {"pkg/sub/c.py": "from pkg.sub import h\n", "pkg/sub/__init__.py": "h = 1\n"})
    assert "pkg/sub/__init__.py" in [p.relative_to(tmp_path).as_posix()  # a name taken from a package's own code
                                     for p in module_sources(["pkg.a"], root=tmp_path, package="pkg")]


def test_an_editing_pass_is_fingerprinted_by_the_code_it_runs_not_by_the_verdicts():
    """A change to the statistics or the report reruns the editing stages in DVC; their passes must
    be read back, and a change to the edit or the model code must not be."""
    sources = {p.relative_to(PACKAGE_DIR).as_posix() for p in module_sources(["matrice.experiments.edit.passes"])}
    assert {"experiments/edit/passes.py", "interventions.py", "models/predict.py", "models/replay.py"} <= sources
    assert not sources & {"evaluation/claims.py", "evaluation/stats.py", "evaluation/report.py",
                          "method/attribution/runner.py", "experiments/edit/evaluation.py"}
    named = code_fingerprint("matrice.experiments.edit.passes")
    assert named == code_fingerprint("matrice.experiments.edit.passes") != code_fingerprint()
    assert named != code_fingerprint("matrice.experiments.inject.training")


def test_a_stage_hashes_its_memo_code_at_start_before_any_model_loads(tmp_path, monkeypatch):
    """The memo's code hash is the code this process imported: a file edited while the model loads
    must not name entries computed by the code in memory."""
    import sys

    from stages.common import ModelStage

    (tmp_path / "params.yaml").write_text("models:\n  m: {source: x}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["edit", "m"])
    code_fingerprint.cache_clear()
    stage = ModelStage.start("doc", memo_code=["matrice.experiments.edit.passes"])
    assert code_fingerprint.cache_info().currsize == 1 and "adapter" not in stage.__dict__  # hashed; nothing loaded
    hashed = code_fingerprint("matrice.experiments.edit.passes")
    stage.__dict__["adapter"] = adapter = tiny_adapter("gpt2")
    memo = stage.memo("edit_runs")
    assert memo.directory.as_posix() == "results/m/edit_runs"
    assert memo.salt == f"{hashed}:{model_digest(adapter.model)}:{tokenizer_digest(adapter.tokenizer)}"
    assert code_fingerprint.cache_info().misses == 1  # the memo reused the hash taken at start


def test_a_stage_without_memo_code_gets_no_memo_and_no_stage_builds_its_own():
    from pathlib import Path

    from stages.common import ModelStage

    with pytest.raises(RuntimeError, match="memo_code"):
        ModelStage("m", {}).memo("edit_runs")
    stages = Path(__file__).resolve().parents[1] / "stages"
    users = [p.name for p in sorted(stages.glob("*.py")) if "stage.memo(" in p.read_text()]
    assert users == ["edit.py", "edit_sweep.py", "fact_check.py", "inject.py"]
    builders = [p.name for p in stages.glob("*.py") if "Memo.for_model(" in p.read_text() or "Memo(" in p.read_text()]
    assert builders == ["common.py"]  # ModelStage.memo, the one way a stage gets a memo


def test_the_tokenizer_digest_sees_the_vocabulary_and_special_tokens_not_the_folder(tmp_path):
    from transformers import AutoTokenizer

    from matrice.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    before = tokenizer_digest(tok)
    for folder in ("a", "b"):
        tok.save_pretrained(tmp_path / folder)
    assert tokenizer_digest(AutoTokenizer.from_pretrained(tmp_path / "a")) == \
        tokenizer_digest(AutoTokenizer.from_pretrained(tmp_path / "b")) == before
    assert tokenizer_digest(tiny_tokenizer(corpus=["another corpus, another vocabulary"])) != before
    tok.pad_token = tok.eos_token
    assert tokenizer_digest(tok) != before
    salted = Memo.for_model(tmp_path, torch.nn.Linear(2, 2), tokenizer=tiny_tokenizer())
    assert salted.salt != Memo.for_model(tmp_path, torch.nn.Linear(2, 2)).salt


def test_a_memo_code_module_outside_the_package_is_an_error():
    with pytest.raises(ValueError, match="no such module"):
        code_fingerprint("matrice.experiments.edit.pases")
    with pytest.raises(ValueError, match="no such module"):
        code_fingerprint("stages.edit")


def _mutates_at_import(node) -> bool:
    import ast

    if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return False
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return not all(isinstance(t, (ast.Name, ast.Tuple)) for t in targets)
    if isinstance(node, ast.Expr):
        return not (isinstance(node.value, ast.Constant) and isinstance(node.value.value, str))
    if isinstance(node, ast.If):
        return ast.unparse(node.test) not in ("TYPE_CHECKING", "__name__ == '__main__'")
    return True


def test_no_module_of_the_package_changes_state_when_imported():
    """A memo's code is what its module imports by name (a parent package's __init__ is not followed):
    sound only while importing a module changes nothing (no torch flags set, nothing patched)."""
    import ast

    found = [f"{path.relative_to(PACKAGE_DIR)}:{node.lineno}" for path in sorted(PACKAGE_DIR.rglob("*.py"))
             if path.name != "__main__.py" for node in ast.parse(path.read_text()).body if _mutates_at_import(node)]
    assert not found, f"top-level statements that run at import: {found}"
    assert _mutates_at_import(ast.parse("import torch\ntorch.backends.cuda.matmul.allow_tf32 = True").body[1])
    assert _mutates_at_import(ast.parse("torch.manual_seed(0)").body[0])


def test_the_model_digest_sees_the_attention_implementation_not_where_the_model_was_loaded_from():
    a = tiny_adapter("llama")
    before = model_digest(a.model)
    a.model.config._name_or_path = "/elsewhere/models/m"  # a project moved or cloned: its memo still holds
    assert model_digest(a.model) == before
    a.model.config._attn_implementation = "eager" if a.model.config._attn_implementation != "eager" else "sdpa"
    assert model_digest(a.model) != before


def test_unreadable_entry_is_recomputed(tmp_path):
    memo = Memo(tmp_path, "s")
    key = memo.key(x=1)
    (tmp_path / f"{key}.json").write_text("{truncated")
    assert memo.load(key) is None
    memo.store(key, {"v": [1.5, True]})
    assert memo.load(key) == {"v": [1.5, True]}


SETS = {f.fact_id: {"matrice": pairs((2, 1), (2, 2)), "random": pairs((0, 4)), "amig": pairs((1, 3))} for f in FACTS}
CFG = InjectConfig(lrs={"default": [5e-2], "direct_ft": [1e-3]}, epochs=2, batch_size=8, lora_r=2, seeds=(0,),
                   lr_extend=0)


def _inject(adapter, probes, sets, variants, memo=None):
    return inject_knowledge(adapter, QUERIES, probes, sets, variants=variants, cfg=CFG,
                            is_evaluation=lambda q: q.template_id >= 1, progress=False, memo=memo)


def _counting_training(monkeypatch) -> list[str]:
    trained: list[str] = []
    real = inject_module.train_variant

    def counted(adapter, variant, *args, **kwargs):
        trained.append(variant)
        return real(adapter, variant, *args, **kwargs)

    monkeypatch.setattr(inject_module, "train_variant", counted)
    return trained


def test_memoized_injection_equals_a_fresh_one_and_retrains_only_what_changed(tmp_path, monkeypatch):
    a = tiny_adapter("gpt2")
    probes = probe(a, QUERIES)
    variants = ("direct_ft", "matrice", "random", "amig", "lora")
    fresh = json.dumps(_inject(a, probes, SETS, variants).to_dict(), sort_keys=True)
    memo = Memo.for_model(tmp_path, a.model)
    trained = _counting_training(monkeypatch)
    assert json.dumps(_inject(a, probes, SETS, variants, memo).to_dict(), sort_keys=True) == fresh
    assert sorted(trained) == sorted(variants)
    trained.clear()
    assert json.dumps(_inject(a, probes, SETS, variants, memo).to_dict(), sort_keys=True) == fresh  # all read back
    assert trained == []
    changed = {fid: {**per, "matrice": pairs((2, 1))} for fid, per in SETS.items()}  # a sweep moved MATRICE's set
    again = _inject(a, probes, changed, variants, memo)
    assert sorted(trained) == ["matrice", "random"]  # Random_FT is drawn layer by layer to MATRICE_FT's size: it follows
    assert again.runs["matrice"]["0.05"]["n_neurons"] == 1 == again.runs["random"]["0.05"]["n_neurons"]
    assert again.runs["lora"] == json.loads(fresh)["runs"]["lora"]


def test_a_lora_run_does_not_depend_on_the_runs_before_it():
    a = tiny_adapter("llama")
    probes = probe(a, QUERIES)
    alone = _inject(a, probes, SETS, ("lora",))
    after = _inject(a, probes, SETS, ("direct_ft", "matrice", "lora"))
    assert alone.runs["lora"] == after.runs["lora"]
    assert [r for r in alone.records if r.variant == "lora"] == [r for r in after.records if r.variant == "lora"]


EDIT_SETS = {f.fact_id: {"matrice": pairs((2, 1), (2, 2)), "amig": pairs((1, 3)), "random": pairs((0, 4))} for f in FACTS}


def _counting_passes(monkeypatch) -> list[int]:
    """How many scored passes (unedited or edited) the editing experiments run."""
    import matrice.experiments.edit.passes as passes_module

    runs: list[int] = []
    real = passes_module.target_hidden  # one body run per pass (the head then serves them all at once)

    def counted(adapter, encodings, *args, **kwargs):
        runs.append(len(encodings))
        return real(adapter, encodings, *args, **kwargs)

    monkeypatch.setattr(passes_module, "target_hidden", counted)
    return runs


def _edit(adapter, sets, memo=None):
    from matrice.experiments.edit import EditConfig, edit_facts

    return edit_facts(adapter, QUERIES, sets, methods=("matrice", "amig", "random"), cfg=EditConfig(locality_k=2),
                      facts=sorted(sets), progress=False, is_evaluation=lambda qid: qid.endswith("-1"), memo=memo)


def _sweep(adapter, sets, memo=None):
    from matrice.experiments.edit import EditConfig
    from matrice.experiments.edit_sweep import sweep_update

    return sweep_update(adapter, QUERIES, sets, ("matrice", "amig", "random"), [0.5, 2.0], EditConfig(locality_k=2),
                        facts=sorted(sets), progress=False, memo=memo)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_memoized_editing_equals_a_fresh_run_and_recomputes_only_moved_edits(tmp_path, monkeypatch, family):
    a = tiny_adapter(family)
    fresh = json.dumps(_edit(a, EDIT_SETS).to_dict(), sort_keys=True)
    memo = Memo.for_model(tmp_path, a.model)
    passes = _counting_passes(monkeypatch)
    assert json.dumps(_edit(a, EDIT_SETS, memo).to_dict(), sort_keys=True) == fresh
    operations = len(EDIT_SETS) + len(json.loads(fresh)["new_objects"])  # erasure of every fact, update where o' exists
    assert len(passes) == operations * (1 + 3)  # per operation: the unedited pass and three edits
    passes.clear()
    assert json.dumps(_edit(a, EDIT_SETS, memo).to_dict(), sort_keys=True) == fresh  # every pass read back
    assert passes == []
    moved = {fid: {**per, "matrice": pairs((2, 1))} for fid, per in EDIT_SETS.items()}  # a τ sweep moved MATRICE
    again = _edit(a, moved, memo)
    assert len(passes) == operations * (1 + 1)  # per operation: the unedited pass (recorded) and MATRICE's edit
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(_edit(a, moved).to_dict(), sort_keys=True)


def test_memoized_lambda_sweep_equals_a_fresh_one_and_recomputes_only_moved_edits(tmp_path, monkeypatch):
    a = tiny_adapter("gpt2")
    fresh = json.dumps(_sweep(a, EDIT_SETS).to_dict(), sort_keys=True)
    memo = Memo.for_model(tmp_path, a.model)
    passes = _counting_passes(monkeypatch)
    assert json.dumps(_sweep(a, EDIT_SETS, memo).to_dict(), sort_keys=True) == fresh
    swept = len(passes)
    assert swept > 0
    passes.clear()
    assert json.dumps(_sweep(a, EDIT_SETS, memo).to_dict(), sort_keys=True) == fresh
    assert passes == []
    moved = {fid: {**per, "random": pairs((1, 4))} for fid, per in EDIT_SETS.items()}
    again = _sweep(a, moved, memo)
    assert len(passes) == swept * (1 + 2) // (1 + 3 * 2)  # the unedited pass and Random's two λ, per fact
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(_sweep(a, moved).to_dict(), sort_keys=True)
