"""The tokenizer cache gives the tokenizer transformers builds, and builds again when anything changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from matrice.models.tiny import TINY_FAMILIES, tiny_adapter
from matrice.models.tokenizer_cache import load_tokenizer, tokenizer_key

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["The capital of France is Paris.", "フランスの首都はパリです。", " Helsinki", "한국의 수도는 서울",
         "Budapest  főváros\n", "中国的首都是北京", "[MASK] <unk> ça va"]


def same_tokenizer(a, b) -> None:
    assert type(a) is type(b)
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
        assert a(text, add_special_tokens=False)["input_ids"] == b(text, add_special_tokens=False)["input_ids"], text
        ids = a(text)["input_ids"]
        assert a.decode(ids) == b.decode(ids)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id", "padding_side",
                 "vocab_size"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.all_special_ids == b.all_special_ids


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_cached_tokenizer_is_the_one_transformers_builds(family, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("MATRICE_CACHE", str(tmp_path / "cache"))
    source = tiny_adapter(family)
    source.model.config.save_pretrained(tmp_path / "model")
    source.tokenizer.save_pretrained(tmp_path / "model")
    built = load_tokenizer(str(tmp_path / "model"))  # builds and caches
    assert len(list((tmp_path / "cache").rglob("*.pkl"))) == 1
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("the cache was not used"))
    cached = load_tokenizer(str(tmp_path / "model"))
    same_tokenizer(cached, built)
    monkeypatch.undo()
    same_tokenizer(cached, AutoTokenizer.from_pretrained(str(tmp_path / "model")))


def test_a_changed_file_or_a_damaged_cache_builds_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRICE_CACHE", str(tmp_path / "cache"))
    source = tiny_adapter("llama")
    source.tokenizer.save_pretrained(tmp_path / "model")
    before = tokenizer_key(tmp_path / "model")
    load_tokenizer(str(tmp_path / "model"))
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights do not count")
    assert tokenizer_key(tmp_path / "model") == before
    config = tmp_path / "model" / "tokenizer_config.json"
    original = config.read_text()
    config.write_text(original + " ")
    assert tokenizer_key(tmp_path / "model") != before
    [pickled] = (tmp_path / "cache").rglob("*.pkl")
    pickled.write_bytes(b"not a pickle")
    config.write_text(original)  # back to the first key, whose cache is now damaged
    assert tokenizer_key(tmp_path / "model") == before
    same_tokenizer(load_tokenizer(str(tmp_path / "model")), source.tokenizer.__class__.from_pretrained(tmp_path / "model"))
    assert pickled.read_bytes() != b"not a pickle"  # rebuilt and replaced


@pytest.mark.skipif(not (REPO / "models" / "gemma3_270m" / "tokenizer.json").exists(),
                    reason="the prepared Gemma 3 270M (make setup / prepare_model) is absent")
def test_the_packaged_gemma_tokenizer_survives_the_cache(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("MATRICE_CACHE", str(tmp_path / "cache"))
    path = str(REPO / "models" / "gemma3_270m")
    load_tokenizer(path)
    same_tokenizer(load_tokenizer(path), AutoTokenizer.from_pretrained(path))
