"""Shared fixtures: tiny random models of every family (built once per session) and encoded queries.

`MATRICE_TEST_DEVICE=cuda make test` puts every tiny model on that device (default: cpu); tensors
the tests build by hand go to `adapter.device`, so the library's own device handling is what is
tested (no global default device hides a CPU tensor in library code)."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import pytest
import torch

from matrice.models.adapter import Encoded, ModelAdapter
from matrice.models.tiny import tiny_adapter

TEST_DEVICE = torch.device(os.environ.get("MATRICE_TEST_DEVICE", "cpu"))
# tokenizers the tests load from directories are cached here, not in the user's ~/.cache/matrice
os.environ.setdefault("MATRICE_CACHE", tempfile.mkdtemp(prefix="matrice-test-cache-"))
# GPU GEMMs pick their kernel (tile, split-K, reduction order) by shape, so float32 results of one
# computation batched differently agree to ~1e-5 relative there against ~1e-6 on the CPU.
SHAPE_TOLERANCE = 10.0 if TEST_DEVICE.type == "cuda" else 1.0


def across_shapes(atol: float, rtol: float) -> dict[str, float]:
    """assert_close tolerances for one float32 computation run in two batch shapes (or devices)."""
    return {"atol": atol * SHAPE_TOLERANCE, "rtol": rtol * SHAPE_TOLERANCE}


def tiny_on_device(family: str, **kwargs) -> ModelAdapter:
    """A fresh tiny adapter on the test device (for tests that mutate or convert a model)."""
    adapter = tiny_adapter(family, **kwargs)
    adapter.model.to(TEST_DEVICE)
    return adapter


def encode_text(adapter: ModelAdapter, text: str, answer: str = " Paris") -> Encoded:
    """An Encoded query built by hand (no dataset code involved).

    Causal: `text` is the context, the target is its last token. Masked: `text` must contain "[Y]",
    which becomes one mask per answer token; the target is the first mask. Baseline positions are all
    non-special tokens (masks are special)."""
    tok = adapter.tokenizer
    answer_ids = list(tok(answer, add_special_tokens=False)["input_ids"])
    if adapter.causal:
        ids = list(tok(text)["input_ids"])
        target = len(ids) - 1
    else:
        ids = list(tok(text.replace("[Y]", tok.mask_token * len(answer_ids)))["input_ids"])
        target = ids.index(tok.mask_token_id)
    special = set(tok.all_special_ids)
    positions = [p for p, i in enumerate(ids) if i not in special]
    return Encoded(ids, target, answer_ids, positions)


def default_text(adapter: ModelAdapter) -> str:
    """The default query of a family: a causal prompt, or a masked cloze with [Y]."""
    return "The capital of France is" if adapter.causal else "The capital of France is[Y]."


@pytest.fixture(scope="session")
def tiny() -> Callable[[str], ModelAdapter]:
    """tiny(family) -> a cached tiny adapter shared by the session.

    Tests must leave its weights as they found them (build a fresh `tiny_adapter` to mutate one)."""
    cache: dict[str, ModelAdapter] = {}

    def get(family: str) -> ModelAdapter:
        if family not in cache:
            cache[family] = tiny_on_device(family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def encode() -> Callable[..., Encoded]:
    """encode(adapter, text=None, answer=" Paris") -> Encoded; text defaults to `default_text`."""

    def make(adapter: ModelAdapter, text: str | None = None, answer: str = " Paris") -> Encoded:
        return encode_text(adapter, default_text(adapter) if text is None else text, answer)

    return make


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting on a busy 2-core CI
    machine makes each op ~1000x slower; modules opt in with `pytestmark = usefixtures(...)`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt2_implant():
    """A tiny GPT-2 with one hand-implanted knowledge neuron (tests/implant.py), and its gold token."""
    from implant import implanted_gpt2

    return implanted_gpt2()


@pytest.fixture(scope="module")
def llama() -> ModelAdapter:
    return tiny_on_device("llama")
