"""Every stage of dvc.yaml, in its order, on a tiny random LLaMA saved as a local model directory:
the stages' wiring (file names, params, the report) is exercised, not only the library."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _run_every_stage(root: Path, **overrides) -> Path:
    from matrice.models.tiny import tiny_adapter
    from stages.sequence import project_copy, reduced_params, run_stages

    model_dir = root / "tiny_model"
    adapter = tiny_adapter("llama")
    adapter.model.save_pretrained(model_dir)
    adapter.tokenizer.save_pretrained(model_dir)
    params = reduced_params(yaml.safe_load((REPO / "params.yaml").read_text()), "tiny", str(model_dir), "cpu")
    runs = run_stages(project_copy(root, {**params, **overrides}), ["tiny"])
    failed = [r for r in runs if r.returncode]
    assert not failed, f"{failed[0].cmd} failed:\n{failed[0].stderr_tail}"
    return root


@contextmanager
def _warm_start(directory: Path, on: bool) -> Iterator[None]:
    """The model stages started warm (stages/warm.py) from a server in ``directory``, or cold; the
    server is stopped afterwards, so no test leaves a process behind."""
    from stages import warm

    saved = {k: os.environ.get(k) for k in (warm.DIR_ENV, warm.ENABLE_ENV)}
    os.environ.update({warm.DIR_ENV: str(directory), warm.ENABLE_ENV: "1" if on else "0"})
    try:
        yield
    finally:
        warm.stop_servers(directory)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def warm_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("warm")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, warm_dir):
    """Every stage as `dvc repro` runs them, the model stages after the first started warm."""
    with _warm_start(warm_dir, on=True):
        root = _run_every_stage(tmp_path_factory.mktemp("run"))
        (warm_dir / "servers-seen").write_text("\n".join(p.name for p in warm_dir.glob("*.sock")))
    return root


def _outputs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for top in ("results", "reports") for p in sorted((root / top).rglob("*")) if p.is_file()}


def test_warm_started_stages_write_what_cold_ones_write(tmp_path, tiny_run, warm_dir):
    """The warm-start server changes which process runs a stage, never a byte of what it writes."""
    assert (warm_dir / "servers-seen").read_text(), "no warm-start server was up during the run: it ran cold"
    with _warm_start(tmp_path / "unused", on=False):
        cold = _run_every_stage(tmp_path / "cold")
    warm, cold_out = _outputs(tiny_run), _outputs(cold)
    assert set(warm) == set(cold_out)
    differ = [name for name in warm if not _same_output(tiny_run / name, cold / name, cold, tiny_run)]
    assert not differ, f"warm and cold runs wrote different bytes: {differ[:5]}"


def _same_output(a: Path, b: Path, b_root: Path, a_root: Path) -> bool:
    """Byte-identical once the project's own path is the same; attribution shards (compressed, their
    fingerprint a hash of settings that name the model's path) by every array but the fingerprint."""
    import numpy as np

    if a.suffix != ".npz":
        return a.read_bytes() == b.read_bytes().replace(str(b_root).encode(), str(a_root).encode())
    with np.load(a) as x, np.load(b) as y:
        return set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files if k != "fingerprint")


def test_every_stage_runs_on_whole_answers(tmp_path, tiny_run, warm_dir):
    """`answer_token: all` through every stage: the shards record it, a query's map is the first-token
    run's exactly when its answer is one token and differs otherwise, the report says which policy."""
    import numpy as np

    from matrice.method.attribution.runner import load_attributions
    from matrice.models.encoding import encode_query
    from matrice.models.loading import load_adapter
    from matrice.data.schema import load_queries

    with _warm_start(warm_dir, on=True):  # a short folder: a socket's path has ~100 bytes at most
        root = _run_every_stage(tmp_path / "run", answer_token="all")
    report = (root / "reports" / "report.md").read_text()
    assert "Answers are whole (`answer_token: all`)" in report and "## Does the paper replicate here?" in report
    manifest, whole = load_attributions(root / "results/tiny/attributions")
    _, first = load_attributions(tiny_run / "results/tiny/attributions")
    assert manifest["settings"]["answer_token"] == "all" and set(whole) == set(first)
    adapter = load_adapter(str(root / "tiny_model"), "cpu", "float32")
    queries = {q.query_id: q for q in load_queries(root / "data/dataset/queries.jsonl")}
    lengths = {qid: len(encode_query(adapter, queries[qid], True).answer_ids) for qid in whole}
    assert any(n > 1 for n in lengths.values())  # multi-token answers were attributed (the tiny tokenizer splits most)
    for qid, n in lengths.items():
        scale = np.abs(first[qid]).max()
        differs = np.abs(whole[qid] - first[qid]).max() > 1e-3 * scale
        assert differs == (n > 1), (qid, n)


def test_every_stage_runs_and_the_report_judges(tiny_run):
    report = (tiny_run / "reports" / "report.md").read_text()
    assert "## Does the paper replicate here?" in report and "(`answer_token: first`)" in report
    for section in ("Controls: leave-one-language-out", "Table III — erasure", "Accuracy gained on Q_error",
                    "Update edit: reliability against locality over λ", "| MATRICE | 0.25 |",
                    "Query localisation: are facts localised consistently?", "Degenerate knowledge neurons (AMIG)",
                    "Fact checking with degenerate knowledge neurons (AMIG)", "AMIG (fact checking)"):
        assert section in report
    assert "| LOLO |" in report and "| Specificity |" in report
    verdicts = json.loads((tiny_run / "reports" / "verdicts.json").read_text())["tiny"]
    assert verdicts and {r["key"] for r in verdicts} >= {"fig4_top_layer_share", "amig_fact_check"}
    for row in verdicts:  # the machine-readable rows are the report's rows
        assert row["comparison"] in report and row["verdict"] in report


def test_held_out_queries_never_reach_attribution(tiny_run):
    from matrice.method.attribution.runner import load_attributions

    queries = [json.loads(l) for l in (tiny_run / "data/dataset/queries.jsonl").read_text().splitlines()]
    template_of = {q["query_id"]: q["template_id"] for q in queries}
    _, raw = load_attributions(tiny_run / "results/tiny/attributions")
    _, amig = load_attributions(tiny_run / "results/tiny/attributions_amig")
    assert raw and max(template_of[q] for q in raw) == 2  # templates 0-2 localise; 3 is held out
    assert {template_of[q] for q in amig} == {0}  # AMIG: the first query per language
    assert max(template_of.values()) == 3
    manip = json.loads((tiny_run / "results/tiny/manipulation.json").read_text())
    assert any(template_of[r["query_id"]] == 3 for r in manip["records"])  # and the experiments score it


def test_metrics_and_plot_data_are_the_tables_estimates(tiny_run, monkeypatch):
    """Every metrics/plot JSON value is the estimate of the table beside it: evaluation queries, each
    fact's mean, then each relation's — the verdicts' queries and unit."""
    from matrice.evaluation.claims import method_name
    from matrice.experiments.edit import editing_estimates
    from matrice.experiments.enhance import enhancement_estimates
    from matrice.experiments.inject import INJECT_NAMES
    from matrice.experiments.manipulate import manipulation_estimates
    from matrice.data.schema import load_queries
    from stages.common import evaluation_rule, load_params, relation_of

    monkeypatch.chdir(tiny_run)
    out = tiny_run / "results/tiny"
    read = lambda name: json.loads((out / name).read_text())  # noqa: E731
    rule, relations = evaluation_rule(load_params()), relation_of(load_queries("data/dataset/queries.jsonl"))

    manip = read("manipulation.json")
    langs = [row["lang"] for row in read("manipulation_suppress_plot.json")]
    estimates, have_eval = manipulation_estimates(manip, rule, [*langs, None], relations)
    assert have_eval
    metrics = read("manipulation_metrics.json")["manipulation"]
    for mode, per_method in estimates.items():
        plot = read(f"manipulation_{mode}_plot.json")
        for method, cells in per_method.items():
            assert metrics[method][mode] == cells[-1].mean
            assert [row[method] for row in plot] == [c.mean for c in cells[:-1]]
    table = (out / "manipulation_tables.md").read_text()
    assert "evaluation queries (never attributed)" in table and "(n=2)" in table  # two relations

    enhancement = read("enhancement.json")
    assert enhancement["records"]  # fr and zh stand in for the low-resource languages
    overall, _ = enhancement_estimates(enhancement, rule, "lang", [None], relations)
    assert {m: v["accuracy_gain"] for m, v in read("enhancement_metrics.json")["enhancement"].items()} == \
        {m: cells[0].mean for m, cells in overall.items()}
    assert "evaluation queries" in (out / "enhancement_tables.md").read_text()

    editing = editing_estimates(read("editing.json"), [None], relations)
    for name, values in read("editing_metrics.json")["editing"].items():
        method, operation = name.split(".")
        assert values == {metric: editing[(operation, method, metric)][0].mean for metric in values}

    report = (tiny_run / "reports/report.md").read_text()
    controls = read("controls_metrics.json")["controls"]
    lolo = _section_rows(report, "### Controls")
    for part in ("lolo", "baselines"):
        assert controls[part], part
        for key, value in controls[part].items():
            method, lang = key.split("/")
            assert lolo[method_name(method)][lolo["method"].index(lang)].startswith(f"{value:.2f} "), key
    table5 = _section_rows(report, "### New-knowledge injection")
    for variant, values in read("injection_metrics.json")["injection"].items():
        cells = dict(zip(table5["variant"], table5[INJECT_NAMES[variant]]))
        for split, value in values.items():
            assert cells["Avg" if split == "avg" else split].startswith(f"{value:.2f} "), (variant, split)


def _section_rows(report: str, heading: str) -> dict[str, list[str]]:
    """First cell → the other cells of every table row in the report's section under ``heading``
    (a first cell's first row only: a section's tables come before anything they repeat)."""
    section = report[report.index(heading):]
    section = section[: section.find("\n### ", 1)] if "\n### " in section[1:] else section
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_held_out_editing_never_reads_an_attributed_query(tiny_run):
    """The edit stage's held-out counts come from the stage's own rule; no attributed query passes it, and
    no (fact, language) counts more held-out queries than it has unattributed paraphrases."""
    from matrice.data.schema import load_queries
    from matrice.method.attribution.runner import load_attributions
    from stages.common import evaluation_rule

    queries = load_queries(tiny_run / "data/dataset/queries.jsonl")
    params = yaml.safe_load((tiny_run / "params.yaml").read_text())
    is_evaluation = evaluation_rule(params, queries)
    attributed = set(load_attributions(tiny_run / "results/tiny/attributions")[1])
    attributed |= set(load_attributions(tiny_run / "results/tiny/attributions_amig")[1])
    assert attributed and not any(is_evaluation(q) for q in attributed)
    unattributed: dict[tuple[str, str], int] = {}
    for q in queries:
        if q.query_id not in attributed:
            unattributed[q.fact_id, q.lang] = unattributed.get((q.fact_id, q.lang), 0) + 1
    records = json.loads((tiny_run / "results/tiny/editing.json").read_text())["records"]
    assert sum(r["held_n"] for r in records) > 0
    for r in records:
        assert r["held_n"] <= unattributed.get((r["fact_id"], r["lang"]), 0)


def test_the_api_locates_the_neurons_the_stages_selected(tiny_run):
    """`matrice.api.locate` on a fact's localisation queries, with the run's params, gives the MATRICE
    set the attribute, aggregate and select stages wrote for that fact."""
    import numpy as np

    import matrice.api as mx
    from matrice.data.schema import load_queries
    from matrice.data.split import HeldOutSplit
    from matrice.method.attribution.common import AttributionConfig
    from matrice.method.selection import SelectionConfig
    from matrice.method.uncertainty import AggregationConfig

    params = yaml.safe_load((tiny_run / "params.yaml").read_text())
    sets = json.loads((tiny_run / "results/tiny/neurons.json").read_text())["facts"]
    split = HeldOutSplit.from_params(params)
    queries = load_queries(tiny_run / "data/dataset/queries.jsonl")
    model = mx.load(params["models"]["tiny"]["source"], device="cpu")
    for fact in sorted(sets)[:2]:
        fqs = [q for q in queries if q.fact_id == fact and split.localises(q)]
        neurons = mx.locate(model, fqs, attribution=AttributionConfig.from_params(params),
                            aggregation=AggregationConfig(**{k: params[k] for k in ("layer_norm", "alpha1", "alpha2",
                                                                                     "lang_norm", "beta1", "beta2")}),
                            selection=SelectionConfig(tau=params["tau"], tau_amig=params["tau_amig"], seed=params["seed"]),
                            few_shot=params["few_shot"])
        stage = np.array(sets[fact]["matrice"], dtype=np.int64).reshape(-1, 2)
        assert {tuple(p) for p in neurons.pairs.tolist()} == {tuple(p) for p in stage.tolist()}, fact


def test_the_api_suppresses_and_enhances_as_the_manipulate_stage_did(tiny_run):
    """`matrice.api.suppress` / `enhance` on a fact's queries with the stage's MATRICE set give the
    P(answer) before and after that the manipulate stage wrote for the same queries."""
    import numpy as np

    import matrice.api as mx
    from matrice.data.schema import load_queries

    params = yaml.safe_load((tiny_run / "params.yaml").read_text())
    sets = json.loads((tiny_run / "results/tiny/neurons.json").read_text())["facts"]
    records = json.loads((tiny_run / "results/tiny/manipulation.json").read_text())["records"]
    by_id = {q.query_id: q for q in load_queries(tiny_run / "data/dataset/queries.jsonl")}
    model = mx.load(params["models"]["tiny"]["source"], device="cpu")
    fact = next(f for f in sorted(sets) if sets[f]["matrice"])
    for mode, call in (("suppress", mx.suppress), ("enhance", mx.enhance)):
        stage = {r["query_id"]: r for r in records if r["fact_id"] == fact and r["method"] == "matrice" and r["mode"] == mode}
        assert stage, (fact, mode)
        neurons = np.array(sets[fact]["matrice"], dtype=np.int64).reshape(-1, 2)
        api = call(model, neurons, [by_id[q] for q in sorted(stage)], few_shot=params["few_shot"],
                   answer_token=params["answer_token"])
        assert sorted(e.query_id for e in api) == sorted(stage)
        for e in api:
            want = stage[e.query_id]
            assert e.n_neurons == want["n_neurons"]
            assert np.isclose(e.p_before, want["p_before"], rtol=1e-5, atol=1e-9), (mode, e.query_id)
            assert np.isclose(e.p_after, want["p_after"], rtol=1e-5, atol=1e-9), (mode, e.query_id)
