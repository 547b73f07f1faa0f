"""Data layer: the embedded dataset's content, mLAMA/mParaRel ingestion, filters, errors and files."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from matrice.data import (
    ALL_LANGUAGES,
    DatasetConfig,
    DatasetError,
    Fact,
    build_dataset,
    fill_template,
    load_facts,
    load_queries,
    make_query,
    query_from_dict,
    query_to_dict,
    write_dataset,
)
from matrice.data.build import sample_facts, to_simplified
from matrice.data.mlama import clean_pattern
from matrice.data.sources import embedded_dir
from matrice.data.stats import query_length
from matrice.io import read_jsonl

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MLAMA = SHARED / "mlama1.1"
MPARAREL = SHARED / "mpararel" / "patterns"
EMBEDDED_RELATIONS = ["P36", "P1376", "P37", "P30", "P17", "P463", "P19", "P138", "P20", "P27", "P103", "P140", "P131",
                      "P159", "P740", "P937", "P176", "P178", "P364", "P495", "P1303", "P106", "P127", "P108"]
TAIL_AFTER_Y = re.compile(r"^(\.|。|です。|입니다\.)?$")  # what may follow [Y] in an embedded template


def assert_empty(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), f"files were written: {list(out.iterdir())}"


def build_into(cfg: DatasetConfig, out: Path) -> None:
    write_dataset(build_dataset(cfg), out)


# ---------------------------------------------------------------- embedded dataset content


@pytest.fixture(scope="module")
def embedded():
    root = embedded_dir(DatasetConfig())
    return {name: read_jsonl(root / f"{name}.jsonl") for name in ("relations", "templates", "facts", "demos")}


def test_embedded_relations_and_fact_counts(embedded):
    assert [r["relation"] for r in embedded["relations"]] == EMBEDDED_RELATIONS
    counts = Counter(f["relation"] for f in embedded["facts"])
    assert set(counts) == set(EMBEDDED_RELATIONS)
    assert min(counts.values()) >= 15, counts


def test_embedded_labels_in_all_languages(embedded):
    for fact in embedded["facts"] + embedded["demos"]:
        for side in ("subject", "object"):
            assert sorted(fact[side]) == sorted(ALL_LANGUAGES), fact["fact_id"]
            assert all(label.strip() == label and label for label in fact[side].values()), fact["fact_id"]
            assert "[" not in "".join(fact[side].values())


def test_embedded_zh_labels_are_simplified(embedded):
    for fact in embedded["facts"] + embedded["demos"]:
        for side in ("subject", "object"):
            assert to_simplified(fact[side]["zh"]) == fact[side]["zh"], fact["fact_id"]


def test_embedded_templates_shape(embedded):
    by = Counter((t["relation"], t["lang"]) for t in embedded["templates"])
    for relation in EMBEDDED_RELATIONS:
        for lang in ALL_LANGUAGES:
            assert by[(relation, lang)] >= 3, (relation, lang)
    for t in embedded["templates"]:
        text = t["template"]
        assert text.count("[X]") == 1 and text.count("[Y]") == 1, text
        assert text.index("[X]") < text.index("[Y]"), text
        assert TAIL_AFTER_Y.match(text.split("[Y]", 1)[1]), text
    texts = [(t["relation"], t["lang"], t["template"]) for t in embedded["templates"]]
    assert len(texts) == len(set(texts)), "duplicate template"


def test_embedded_ids_unique_and_one_answer_per_subject(embedded):
    ids = [f["fact_id"] for f in embedded["facts"] + embedded["demos"]]
    assert len(ids) == len(set(ids))
    for lang in ALL_LANGUAGES:
        subjects = Counter((f["relation"], f["subject"][lang]) for f in embedded["facts"])
        assert max(subjects.values()) == 1, [k for k, n in subjects.items() if n > 1]


def test_embedded_demos_not_among_facts(embedded):
    assert sorted(d["relation"] for d in embedded["demos"]) == sorted(EMBEDDED_RELATIONS)
    facts = {(f["relation"], f["subject"]["en"]) for f in embedded["facts"]}
    for demo in embedded["demos"]:
        assert (demo["relation"], demo["subject"]["en"]) not in facts, demo


def test_embedded_build_causal_keeps_every_template(embedded):
    ds = build_dataset(DatasetConfig(relations=None, causal=True))  # every embedded relation
    assert "templates_x_after_y" not in ds.dropped
    assert ds.dropped == {} and ds.repaired == {}
    raw = Counter((t["relation"], t["lang"]) for t in embedded["templates"])
    for r in EMBEDDED_RELATIONS:
        for lang in ALL_LANGUAGES:
            assert len(ds.templates[r][lang]) == raw[(r, lang)]
    assert len(ds.facts) == len(embedded["facts"])
    assert len(ds.queries) == sum(raw[(f.relation, lang)] for f in ds.facts for lang in ALL_LANGUAGES)


def test_embedded_queries_are_consistent():
    ds = build_dataset(DatasetConfig(relations=None))
    ids = [q.query_id for q in ds.queries]
    assert len(ids) == len(set(ids))
    facts = {f.fact_id: f for f in ds.facts}
    for q in ds.queries:
        fact = facts[q.fact_id]
        full = fill_template(q.template, q.subject, q.answer)
        assert full.startswith(q.prompt + q.answer_sep + q.answer), q
        assert q.answer_sep == ("" if q.lang in ("zh", "ja") else " "), q
        assert q.cloze.count("[Y]") == 1 and q.subject in q.prompt
        assert q.answer == fact.object[q.lang] and q.subject == fact.subject[q.lang]
        demo = ds.demos[q.relation]
        assert q.prefix == fill_template(q.template, demo.subject[q.lang], demo.object[q.lang]) + "\n"
    assert {q.template_id for q in ds.queries} == {0, 1, 2, 3}


# ---------------------------------------------------------------- schema helpers


def test_fill_template_single_pass_and_query_fields():
    assert fill_template("[X] is in [Y].", "A [Y] b", "C") == "A [Y] b is in C."
    fact = Fact("P1-1", "P1", {"en": "Paris", "zh": "巴黎"}, {"en": "France", "zh": "法国"})
    demo = Fact("P1-2", "P1", {"en": "Rome", "zh": "罗马"}, {"en": "Italy", "zh": "意大利"})
    q = make_query(fact, "en", 0, "[X] is the capital of [Y] .", demo)
    assert (q.prompt, q.cloze, q.answer_sep, q.prefix) == (
        "Paris is the capital of", "Paris is the capital of [Y] .", " ", "Rome is the capital of Italy .\n")
    q = make_query(fact, "zh", 1, "[X]是[Y]的首都。", None)
    assert (q.prompt, q.answer_sep, q.prefix, q.query_id) == ("巴黎是", "", "", "P1-1|zh|1")
    assert query_from_dict(json.loads(json.dumps(query_to_dict(q)))) == q
    with pytest.raises(DatasetError, match="demonstration"):
        make_query(fact, "en", 0, "[X] in [Y]", fact)


def test_query_length_units():
    fact = Fact("P1-1", "P1", {"en": "Paris", "zh": "巴黎"}, {"en": "France", "zh": "法国"})
    assert query_length(make_query(fact, "en", 0, "[X] is the capital of [Y] .", None)) == 5
    assert query_length(make_query(fact, "zh", 0, "[X]是[Y]的首都。", None)) == 6


def test_clean_pattern():
    assert clean_pattern("[X]n] pääkaupunki on [Y]") == ("[X]n pääkaupunki on [Y]", True)
    assert clean_pattern("[Y], [X] n] pääkaupunki") == ("[Y], [X]n pääkaupunki", True)
    assert clean_pattern("[X] kuoli [Y] ssä]") == ("[X] kuoli [Y]ssä", True)
    assert clean_pattern("[ [X] ]는 [ [Y] ]에 있습니다") == ("[X]는 [Y]에 있습니다", True)
    assert clean_pattern("[Y]는 [ [X]의 전문화입니다") == ("[Y]는 [X]의 전문화입니다", True)
    assert clean_pattern("[X] is in [Y]") == ("[X] is in [Y]", False)
    assert clean_pattern("[X] and [X] in [Y]") == (None, False)
    assert clean_pattern("[X] [in] [Y]") == (None, False)


def test_sample_facts_is_seeded_and_ordered():
    facts = [Fact(f"P1-{i}", "P1", {"en": str(i)}, {"en": "o"}) for i in range(50)]
    a, b = sample_facts(facts, 10, 3, "P1"), sample_facts(facts, 10, 3, "P1")
    assert a == b and len(a) == 10
    assert [f.fact_id for f in a] == sorted((f.fact_id for f in a), key=lambda s: int(s.split("-")[1]))
    assert sample_facts(facts, 10, 4, "P1") != a
    assert sample_facts(facts, 100, 3, "P1") == facts


# ---------------------------------------------------------------- writing


def test_write_dataset_round_trip_and_determinism(tmp_path):
    cfg = DatasetConfig(relations=None, max_facts_per_relation=5, seed=1)
    write_dataset(build_dataset(cfg), tmp_path / "a")
    write_dataset(build_dataset(cfg), tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["dropped.json", "facts.jsonl", "queries.jsonl", "stats.json", "stats.md"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    ds = build_dataset(cfg)
    assert load_queries(tmp_path / "a" / "queries.jsonl") == ds.queries
    assert load_facts(tmp_path / "a" / "facts.jsonl") == ds.facts
    stats = json.loads((tmp_path / "a" / "stats.json").read_text(encoding="utf-8"))
    n_relations, n_facts = len(EMBEDDED_RELATIONS), len(ds.facts)
    assert n_facts == 5 * n_relations
    assert stats["per_language"]["en"]["facts"] == n_facts and stats["per_language"]["zh"]["length_unit"] == "characters"
    embedded_facts = len(read_jsonl(embedded_dir(DatasetConfig()) / "facts.jsonl"))
    assert json.loads((tmp_path / "a" / "dropped.json").read_text()) == {"facts_over_max_per_relation": embedded_facts - n_facts}
    md = (tmp_path / "a" / "stats.md").read_text(encoding="utf-8")
    assert "| Language | #Facts | #Queries | #Relations | Avg. query length |" in md
    assert "in characters" in md and "for zh, ja" in md


def test_load_queries_reports_file_and_line(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_text('{"query_id": "a"}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:1: missing field")):
        load_queries(path)


# ---------------------------------------------------------------- small mLAMA/mParaRel fixtures


def mlama_row(lineid: int, sub: str, obj: str) -> dict:
    return {"sub_uri": f"Q{lineid}", "obj_uri": f"Q{1000 + lineid}", "sub_label": sub, "obj_label": obj,
            "lineid": lineid, "uuid": f"u-{lineid}"}


def write_rows(path: Path, items: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                            for x in items), encoding="utf-8")
    return path


CAPITALS = [("France", "Paris", "法國", "巴黎"), ("Japan", "Tokyo", "日本", "東京"), ("Italy", "Rome", "意大利", "羅馬"),
            ("Spain", "Madrid", "西班牙", "馬德里"), ("Peru", "Lima", "秘魯", "利馬")]


@pytest.fixture
def mini(tmp_path):
    """en+zh mLAMA with P36 (5 complete facts + 1 en-only) and P37 (2 facts), plus mParaRel patterns."""
    m, p = tmp_path / "mlama", tmp_path / "mpararel"
    en36 = [mlama_row(i, s, o) for i, (s, o, _, _) in enumerate(CAPITALS)] + [mlama_row(9, "Chile", "Santiago")]
    zh36 = [mlama_row(i, zs, zo) for i, (_, _, zs, zo) in enumerate(CAPITALS)]
    write_rows(m / "en" / "P36.jsonl", en36)
    write_rows(m / "zh" / "P36.jsonl", zh36)
    write_rows(m / "en" / "P37.jsonl", [mlama_row(0, "France", "French"), mlama_row(1, "Japan", "Japanese")])
    write_rows(m / "zh" / "P37.jsonl", [mlama_row(0, "法國", "法語"), mlama_row(1, "日本", "日語")])
    write_rows(m / "en" / "templates.jsonl", [{"relation": "P36", "template": "The capital of [X] is [Y] ."},
                                              {"relation": "P37", "template": "The official language of [X] is [Y] ."}])
    write_rows(m / "zh" / "templates.jsonl", [{"relation": "P36", "template": "[X]的首都是[Y]。"},
                                              {"relation": "P37", "template": "[X]的官方语言是[Y]。"}])
    pat = lambda *ps: [{"pattern": x, "checked-by-human": False} for x in ps]  # noqa: E731
    write_rows(p / "en" / "P36.jsonl", pat("the capital of [X] is [Y]", "[Y] is the capital of [X]",
                                           "[X]'s capital is [Y]", "[X]n] capital is [Y]", "[X] [X] [Y]"))
    write_rows(p / "zh-hans" / "P36.jsonl", pat("[X] 的首都为 [Y]", "[Y]是[X]的首都"))
    write_rows(p / "en" / "P37.jsonl", pat("[X]'s official language is [Y]"))
    return m, p, tmp_path / "out"


def mini_cfg(mini, **kw) -> DatasetConfig:
    m, p, _ = mini
    base = dict(source="mlama", mlama_dir=str(m), mpararel_dir=str(p), languages=["en", "zh"], relations=None)
    return DatasetConfig(**{**base, **kw})


def test_mini_join_templates_and_counts(mini):
    ds = build_dataset(mini_cfg(mini))
    assert ds.available_facts == {"P36": 5, "P37": 2}
    assert ds.dropped["facts_missing_language"] == 1  # Chile has no zh row
    assert ds.dropped["facts_reserved_as_demo"] == 2  # first fact of each relation
    assert ds.demos["P36"].fact_id == "P36-0" and "P36-0" not in {f.fact_id for f in ds.facts}
    assert ds.templates["P36"]["en"] == ["The capital of [X] is [Y] .", "[X]'s capital is [Y]", "[X]n capital is [Y]"]
    assert ds.dropped["templates_duplicate"] == 1  # "the capital of [X] is [Y]" == mLAMA's modulo case/" ."
    assert ds.dropped["templates_malformed"] == 1  # "[X] [X] [Y]"
    assert ds.dropped["templates_x_after_y"] == 2  # one en, one zh
    assert ds.repaired["templates_stray_brackets"] == 1 and ds.repaired["templates_cjk_spaces"] == 1
    assert ds.templates["P36"]["zh"] == ["[X]的首都是[Y]。", "[X]的首都为[Y]"]
    q = next(q for q in ds.queries if q.fact_id == "P36-1" and q.lang == "en" and q.template_id == 0)
    assert (q.prompt, q.answer, q.prefix) == ("The capital of Japan is", "Tokyo", "The capital of France is Paris .\n")


def test_mini_zh_simplified(mini):
    on = build_dataset(mini_cfg(mini))
    off = build_dataset(mini_cfg(mini, zh_simplified=False))
    assert {f.object["zh"] for f in on.facts if f.relation == "P36"} == {"东京", "罗马", "马德里", "利马"}
    assert {f.object["zh"] for f in off.facts if f.relation == "P36"} == {"東京", "羅馬", "馬德里", "利馬"}
    assert on.repaired["zh_labels_to_simplified"] > 0 and "zh_labels_to_simplified" not in off.repaired


def test_mini_filters(mini):
    en_only = build_dataset(mini_cfg(mini, languages=["en"]))
    assert en_only.available_facts["P36"] == 6 and {q.lang for q in en_only.queries} == {"en"}
    p37 = build_dataset(mini_cfg(mini, relations=["P37"]))
    assert {f.relation for f in p37.facts} == {"P37"}
    capped = build_dataset(mini_cfg(mini, max_facts_per_relation=2, seed=5))
    assert Counter(f.relation for f in capped.facts) == {"P36": 2, "P37": 1}
    assert capped.dropped["facts_over_max_per_relation"] == 2
    assert [f.fact_id for f in capped.facts] == [f.fact_id for f in build_dataset(
        mini_cfg(mini, max_facts_per_relation=2, seed=5)).facts]
    one = build_dataset(mini_cfg(mini, max_templates_per_language=1))
    assert all(len(t) == 1 for per in one.templates.values() for t in per.values())
    assert {q.template_id for q in one.queries} == {0} and one.dropped["templates_over_max"] > 0
    masked = build_dataset(mini_cfg(mini, causal=False))
    assert "templates_x_after_y" not in masked.dropped
    assert "[Y] is the capital of [X]" in masked.templates["P36"]["en"]
    no_para = build_dataset(mini_cfg(mini, mpararel_dir=None))
    assert all(len(t) == 1 for per in no_para.templates.values() for t in per.values())


def test_mini_config_errors(mini):
    out = mini[2]
    with pytest.raises(DatasetError, match=r"DatasetConfig\.relations: unknown relation\(s\) \['P999'\]; available: \['P36', 'P37'\]"):
        build_into(mini_cfg(mini, relations=["P999"]), out)
    with pytest.raises(DatasetError, match=r"DatasetConfig\.languages: unknown language\(s\) \['de'\]; available: \['en', 'zh'\]"):
        build_into(mini_cfg(mini, languages=["en", "de"]), out)
    with pytest.raises(DatasetError, match=r"DatasetConfig\.max_facts_per_relation"):
        build_into(mini_cfg(mini, max_facts_per_relation=0), out)
    with pytest.raises(DatasetError, match=r"DatasetConfig\.mlama_dir"):
        build_into(mini_cfg(mini, mlama_dir=str(out / "nowhere")), out)
    with pytest.raises(DatasetError, match=r"unknown parameter\(s\) \['langs'\]"):
        DatasetConfig.from_dict({"langs": ["en"]})
    with pytest.raises(DatasetError, match=r"DatasetConfig\.languages: need a list of strings"):
        DatasetConfig.from_dict({"languages": "en"})
    assert DatasetConfig.from_dict({"languages": ["en"], "seed": 3}).seed == 3
    assert_empty(out)


@pytest.mark.parametrize("line, message", [
    ('{"sub_uri": "Q1", ', "malformed JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"sub_uri": "Q7", "obj_uri": "Q8", "sub_label": "X", "lineid": 7, "uuid": "u-7"}', "missing field 'obj_label'"),
    ('{"sub_uri": "Q7", "obj_uri": "Q8", "sub_label": "X", "obj_label": " ", "lineid": 7, "uuid": "u-7"}',
     "field 'obj_label' must be a non-empty string"),
    ('{"sub_uri": "Q7", "obj_uri": "Q8", "sub_label": "X", "obj_label": "Y", "lineid": 0, "uuid": "u-0"}',
     "duplicate uuid"),
])
def test_mini_bad_fact_lines(mini, line, message):
    m, _, out = mini
    path = m / "zh" / "P36.jsonl"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    lineno = len(path.read_text(encoding="utf-8").splitlines())
    with pytest.raises(DatasetError, match=re.escape(f"{path}:{lineno}: {message}")):
        build_into(mini_cfg(mini), out)
    assert_empty(out)


def test_mini_bad_templates(mini):
    m, p, out = mini
    path = write_rows(m / "zh" / "templates.jsonl", [{"relation": "P36", "template": "[X]的首都是[Y]。"},
                                                     {"relation": "P37", "template": "[X]的官方语言是。"}])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: template must contain exactly one [X] and one [Y]")):
        build_into(mini_cfg(mini), out)
    write_rows(path, [{"relation": "P36", "template": "[X]的首都是[Y]。"}, {"relation": "P37"}])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: missing field 'template'")):
        build_into(mini_cfg(mini), out)
    pattern_file = write_rows(p / "en" / "P37.jsonl", [{"checked-by-human": False}])
    write_rows(path, [{"relation": "P36", "template": "[X]的首都是[Y]。"}, {"relation": "P37", "template": "[X]是[Y]"}])
    with pytest.raises(DatasetError, match=re.escape(f"{pattern_file}:1: missing field 'pattern'")):
        build_into(mini_cfg(mini), out)
    assert_empty(out)


def test_mini_empty_results(mini):
    m, p, out = mini
    # no fact has labels in every chosen language
    write_rows(m / "zh" / "P36.jsonl", [mlama_row(50, "法國", "巴黎")])
    write_rows(m / "zh" / "P37.jsonl", [mlama_row(51, "法國", "法語")])
    with pytest.raises(DatasetError, match=r"no fact .* has labels in every language of DatasetConfig\.languages"):
        build_into(mini_cfg(mini), out)
    assert_empty(out)


def test_mini_causal_filter_empties(mini):
    m, p, out = mini
    for lang, tmpl in (("en", "[Y] is the capital of [X] ."), ("zh", "[Y]是[X]的首都。")):
        write_rows(m / lang / "templates.jsonl", [{"relation": "P36", "template": tmpl},
                                                  {"relation": "P37", "template": tmpl}])
    with pytest.raises(DatasetError, match=r"DatasetConfig\.causal: relation P36 has no template with \[X\] before \[Y\]"):
        build_into(mini_cfg(mini, mpararel_dir=None, relations=["P36"]), out)
    with pytest.raises(DatasetError, match=r"empty dataset: the causal template filter \(DatasetConfig\.causal\)"):
        build_into(mini_cfg(mini, mpararel_dir=None), out)
    assert_empty(out)
    assert build_dataset(mini_cfg(mini, mpararel_dir=None, causal=False)).queries


# ---------------------------------------------------------------- embedded files with errors


@pytest.fixture
def emb_copy(tmp_path):
    root = tmp_path / "embedded"
    shutil.copytree(embedded_dir(DatasetConfig()), root)
    return root, tmp_path / "out"


def test_embedded_bad_template(emb_copy):
    root, out = emb_copy
    path = root / "templates.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[4] = json.dumps({"relation": "P36", "lang": "fr", "template": "La capitale de [X] est."}, ensure_ascii=False)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:5: template must contain exactly one [X] and one [Y]")):
        build_into(DatasetConfig(embedded_dir=str(root)), out)
    assert_empty(out)


def test_embedded_bad_fact_and_missing_language(emb_copy):
    root, out = emb_copy
    path = root / "facts.jsonl"
    facts = read_jsonl(path)
    del facts[0]["subject"]["fi"]  # a fact without a Finnish label is dropped, not an error
    path.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in facts), encoding="utf-8")
    ds = build_dataset(DatasetConfig(embedded_dir=str(root)))
    assert ds.dropped == {"facts_missing_language": 1}
    every = build_dataset(DatasetConfig(embedded_dir=str(root), relations=None, languages=["en", "ja"]))
    assert len(every.facts) == len(facts)
    facts[1]["object"] = {"en": ""}
    path.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in facts), encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: object['en'] must be a non-empty string")):
        build_into(DatasetConfig(embedded_dir=str(root)), out)
    del facts[1]["object"]
    path.write_text("".join(json.dumps(f, ensure_ascii=False) + "\n" for f in facts), encoding="utf-8")
    with pytest.raises(DatasetError, match=re.escape(f"{path}:2: missing field 'object'")):
        build_into(DatasetConfig(embedded_dir=str(root)), out)
    assert_empty(out)


def test_embedded_unknown_relation_and_language(emb_copy):
    root, out = emb_copy
    with pytest.raises(DatasetError, match=r"DatasetConfig\.relations: unknown relation\(s\) \['P31'\]; available: \['P17'"):
        build_into(DatasetConfig(relations=["P31"]), out)
    with pytest.raises(DatasetError, match=r"DatasetConfig\.languages: unknown language\(s\) \['de'\]"):
        build_into(DatasetConfig(languages=["en", "de"]), out)
    with pytest.raises(DatasetError, match=r"DatasetConfig\.source"):
        build_into(DatasetConfig(source="lama"), out)
    assert_empty(out)


# ---------------------------------------------------------------- the real mLAMA 1.1 / mParaRel data


@pytest.fixture(scope="module")
def real():
    if not (MLAMA / "en" / "P36.jsonl").is_file() or not MPARAREL.is_dir():
        pytest.skip(f"reference data not found at {SHARED}")
    cfg = DatasetConfig(source="mlama", mlama_dir=str(MLAMA), mpararel_dir=str(MPARAREL),
                        relations=["P36", "P1376", "P37"], max_templates_per_language=None)  # every template
    return build_dataset(cfg)


def test_real_join_counts(real):
    # SOURCES.md: facts with labels in all 7 languages
    assert real.available_facts == {"P36": 411, "P1376": 217, "P37": 712}
    assert Counter(f.relation for f in real.facts) == {"P36": 410, "P1376": 216, "P37": 711}
    assert real.dropped["facts_reserved_as_demo"] == 3
    assert "facts_join_mismatch" not in real.dropped


def test_real_join_across_languages(real):
    facts = {f.fact_id: f for f in real.facts}
    france = facts["P36-319"]
    assert france.subject["en"] == "France" and france.object["en"] == "Paris"
    assert france.object == {"en": "Paris", "fr": "Paris", "zh": "巴黎", "fi": "Pariisi", "hu": "Párizs",
                             "ja": "パリ", "ko": "파리"}
    cook = facts["P36-2"]  # mLAMA zh has the Traditional 庫克縣
    assert cook.subject["zh"] == "库克县" and cook.subject["ko"] == "쿡군" and cook.object["en"] == "Chicago"
    assert all(to_simplified(f.subject["zh"]) == f.subject["zh"] for f in real.facts)
    assert real.repaired["zh_labels_to_simplified"] > 0


def stray(pattern: str) -> bool:
    rest = pattern.replace("[X]", "").replace("[Y]", "")
    return "[" in rest or "]" in rest


def test_real_template_cleanup_counts(real):
    expected = Counter()
    for lang_dir in MPARAREL.iterdir():
        for relation in ("P36", "P1376", "P37"):
            path = lang_dir / f"{relation}.jsonl"
            if path.is_file():
                expected[lang_dir.name] += sum(stray(r["pattern"]) for r in read_jsonl(path))
    assert +expected == {"fi": 17}  # ko's bracket noise is in other relations
    assert real.repaired["templates_stray_brackets"] == 17
    assert real.repaired_detail["templates_stray_brackets"] == {"P1376/fi": 6, "P36/fi": 7, "P37/fi": 4}
    assert "templates_malformed" not in real.dropped
    assert all(not stray(t) for per in real.templates.values() for ts in per.values() for t in ts)


def test_real_causal_drop_counts(real):
    detail = real.dropped_detail["templates_x_after_y"]
    # en P36: 6 of the 14 mParaRel patterns put [Y] first ("[Y] is the capital of [X]", ...)
    assert detail["P36/en"] == 6
    assert real.dropped["templates_x_after_y"] == sum(detail.values()) == 105
    # zh machine-translation spaces are removed first, which exposes 6 more zh duplicates
    assert real.repaired["templates_cjk_spaces"] == 21 and real.dropped["templates_duplicate"] == 33
    # mLAMA's template comes first; the rest are mParaRel's, deduplicated (the lower-case copy of it)
    assert real.templates["P36"]["en"][0] == "The capital of [X] is [Y] ."
    assert len(real.templates["P36"]["en"]) == 1 + 14 - 1 - 6
    for per in real.templates.values():
        for templates in per.values():
            assert all(t.index("[X]") < t.index("[Y]") for t in templates)
    for q in real.queries:
        assert q.prefix and q.prefix.endswith("\n") and q.subject in q.prompt


def test_real_all_relations_cover_sources_md():
    if not (MLAMA / "en" / "P36.jsonl").is_file():
        pytest.skip(f"reference data not found at {SHARED}")
    ds = build_dataset(DatasetConfig(source="mlama", mlama_dir=str(MLAMA), mpararel_dir=str(MPARAREL), relations=None,
                                     max_facts_per_relation=3, max_templates_per_language=2))
    sources_md = {"P17": 108, "P19": 97, "P20": 168, "P27": 121, "P30": 227, "P36": 411, "P37": 712, "P103": 266,
                  "P138": 228, "P140": 204, "P463": 78, "P1376": 217, "P1412": 230}
    assert {r: ds.available_facts[r] for r in sources_md} == sources_md
    assert all(n == 3 for n in Counter(f.relation for f in ds.facts).values())


# ---- the held-out split -----------------------------------------------------------------------

def _templates(fact: str, lang: str, ids) -> list:
    from matrice.data.schema import Fact, make_query

    f = Fact(fact, "P36", {lang: "France"}, {lang: "Paris"})
    return [make_query(f, lang, t, f"[X] capital {t} [Y].", None) for t in ids]


def test_the_held_out_split_attributes_the_first_templates_and_holds_out_the_rest():
    from matrice.data.split import HeldOutSplit

    queries = _templates("f1", "en", [0, 1, 2, 3, 4]) + _templates("f1", "fr", [0, 3]) + _templates("f2", "en", [0, 1])
    split = HeldOutSplit(3)
    assert [q.template_id for q in queries if split.localises(q)] == [0, 1, 2, 0, 0, 1]
    assert [q.template_id for q in queries if split.is_held_out(q)] == [3, 4, 3]
    first = split.first_held_out(reversed(queries))  # the lowest held-out template, whatever the order
    assert {k: q.template_id for k, q in first.items()} == {("f1", "en"): 3, ("f1", "fr"): 3}  # f2: none held out
    everything = HeldOutSplit(None)
    assert all(everything.localises(q) for q in queries) and not everything.first_held_out(queries)
    assert HeldOutSplit.from_params({"attribute": {"templates_per_language": 2}}) == HeldOutSplit(2)
    for bad in (0, -1, 2.5, "3"):
        with pytest.raises(ValueError, match="attribute.templates_per_language"):
            HeldOutSplit(bad)
