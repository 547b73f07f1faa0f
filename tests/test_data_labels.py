"""The embedded dataset's labels against mLAMA 1.1's labels for the same entities.

mLAMA is read at test time from ../shared/data (CC BY-NC: never embedded); the test skips without it.
An entity is matched by its English label across every mLAMA relation (subjects and objects). A label
agrees when it equals mLAMA's after NFKC case folding, Simplified script and dropping punctuation and
spaces, or is contained in it (a short form: 北京 in 北京市). Every other label must be listed, with
the reason, in the dataset's `label_review.jsonl`; entities mLAMA lacks are listed by the test.
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest

from matrice.data import ALL_LANGUAGES, DatasetConfig
from matrice.data.build import to_simplified
from matrice.data.sources import embedded_dir
from matrice.io import read_jsonl

MLAMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mlama1.1"
ROOT = embedded_dir(DatasetConfig())
REVIEW = ROOT / "label_review.jsonl"

Key = tuple[str, str, str]  # (English label, language, our label)


def comparable(lang: str, label: str) -> str:
    text = unicodedata.normalize("NFKC", label).casefold()
    if lang == "zh":
        text = to_simplified(text)
    return "".join(c for c in text if c.isalnum())


def agrees(lang: str, ours: str, theirs: set[str]) -> bool:
    mine = comparable(lang, ours)
    return any(mine and mine in comparable(lang, t) for t in theirs)


@cache
def mlama_labels() -> tuple[dict[str, dict[str, str]], dict[str, set[str]]]:
    """(language -> entity id -> label, case-folded English label -> entity ids)."""
    by_id: dict[str, dict[str, str]] = defaultdict(dict)
    english: dict[str, set[str]] = defaultdict(set)
    for lang in ALL_LANGUAGES:
        for path in sorted((MLAMA / lang).glob("P*.jsonl")):
            for row in read_jsonl(path):
                for side in ("sub", "obj"):
                    by_id[lang][row[f"{side}_uri"]] = row[f"{side}_label"]
                    if lang == "en":
                        english[row[f"{side}_label"].casefold()].add(row[f"{side}_uri"])
    return by_id, english


def disagreements() -> tuple[dict[Key, set[str]], list[str]]:
    """({(English label, language, our label): mLAMA's labels} where they disagree, English labels
    of the embedded entities mLAMA does not have)."""
    by_id, english = mlama_labels()
    differ: dict[Key, set[str]] = {}
    missing: set[str] = set()
    for fact in read_jsonl(ROOT / "facts.jsonl") + read_jsonl(ROOT / "demos.jsonl"):
        for side in ("subject", "object"):
            labels = fact[side]
            ids = english.get(labels["en"].casefold())
            if not ids:
                missing.add(labels["en"])
                continue
            for lang, ours in labels.items():
                theirs = {by_id[lang][i] for i in ids if i in by_id[lang]}
                if lang != "en" and theirs and not agrees(lang, ours, theirs):
                    differ[(labels["en"], lang, ours)] = theirs
    return differ, sorted(missing)


def reviewed() -> dict[Key, str]:
    return {(r["en"], r["lang"], r["label"]): r["why"] for r in read_jsonl(REVIEW)}


def test_every_label_mlama_disagrees_with_is_reviewed():
    if not MLAMA.is_dir():
        pytest.skip(f"mLAMA 1.1 not found at {MLAMA}")
    differ, missing = disagreements()
    review = reviewed()
    unreviewed = [f"{key}: mLAMA {sorted(differ[key])}" for key in sorted(set(differ) - set(review))]
    assert not unreviewed, "labels that disagree with mLAMA, not in label_review.jsonl:\n" + "\n".join(unreviewed)
    stale = sorted(set(review) - set(differ))
    assert not stale, f"label_review.jsonl entries that no longer disagree with mLAMA (remove them): {stale}"
    print(f"\n{len(missing)} embedded entities are not in mLAMA (unchecked): {', '.join(missing)}")


def test_review_entries_are_unique_and_give_a_reason():
    entries = read_jsonl(REVIEW)
    keys = [(r["en"], r["lang"], r["label"]) for r in entries]
    assert len(keys) == len(set(keys))
    assert all(r["lang"] in ALL_LANGUAGES and r["lang"] != "en" and r["why"].strip() for r in entries)


def test_the_comparison_accepts_short_forms_and_script_variants_only():
    assert agrees("zh", "北京", {"北京市"}) and agrees("zh", "东京", {"東京"})
    assert agrees("fr", "Viêt Nam", {"viet nam"}) is False  # accents are not dropped
    assert agrees("fi", "Pariisi", {"Pariisi"}) and not agrees("hu", "Rhodesia", {"Rodézia"})
    assert not agrees("ko", "호주", {"오스트레일리아"})


def test_an_entity_has_one_label_per_language_across_relations():
    labels: dict[tuple[str, str], set[str]] = defaultdict(set)
    for fact in read_jsonl(ROOT / "facts.jsonl") + read_jsonl(ROOT / "demos.jsonl"):
        for side in ("subject", "object"):
            for lang, label in fact[side].items():
                labels[(fact[side]["en"], lang)].add(label)
    assert {k: v for k, v in labels.items() if len(v) > 1} == {}
