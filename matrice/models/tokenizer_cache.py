"""A local model's tokenizer, built by transformers once and then unpickled, keyed by its files.

Why: every stage is a fresh process, and `AutoTokenizer` rebuilds a large vocabulary in Python each
time (Gemma 3's 262,144 entries: it parses tokenizer.json, converts it and rebuilds the Rust
tokenizer, about 4 s). Unpickling the object it built gives the same object in less than half that.
The key is every file of the directory that is not a weight file, with the transformers and
tokenizers versions, so any change to the tokenizer or the libraries builds it again. A hub id (not
a local directory) is left to transformers' own cache. The cache lives in `$MATRICE_CACHE`
(default `~/.cache/matrice`); a cache that cannot be read or written is ignored. A stage forked by
the warm-start server (`stages/warm.py`) finds the server's already unpickled copy of the same file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys
from pathlib import Path
from typing import Any

from matrice.io import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_ENV = "MATRICE_CACHE"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
WARM_REGISTRY = "_matrice_warm"  # stages/warm.py's server module, present only in a process it forked
LOADED_PICKLES: set[str] = set()  # cache files this process read: the warm server preloads them


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "matrice"
    return Path(root) / "tokenizers"


def tokenizer_key(directory: Path) -> str:
    """A digest of every non-weight file in `directory` (names and bytes) and the library versions."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(f"transformers {transformers.__version__} tokenizers {tokenizers.__version__}".encode())
    for file in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def load_tokenizer(path_or_id: str) -> Any:
    """`AutoTokenizer.from_pretrained(path_or_id)`, from the pickle cache when it is a local directory."""
    from transformers import AutoTokenizer

    directory = Path(path_or_id)
    if not directory.is_dir():
        return AutoTokenizer.from_pretrained(path_or_id)
    cached = cache_dir() / f"{tokenizer_key(directory)}.pkl"
    warm = getattr(sys.modules.get(WARM_REGISTRY), "TOKENIZERS", {}).pop(str(cached), None)
    if warm is not None:  # the key names the file's content: the server's copy is this very tokenizer (taken
        # out of the registry, so a second load in this process gets its own object, as it would cold)
        LOADED_PICKLES.add(str(cached))
        return warm
    try:
        tokenizer = pickle.loads(cached.read_bytes())
        LOADED_PICKLES.add(str(cached))
        return tokenizer
    except FileNotFoundError:
        pass
    except Exception as exc:  # a damaged or foreign file: build again and replace it
        log.warning("ignoring the cached tokenizer %s (%s)", cached, exc)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    _write_atomically(cached, pickle.dumps(tokenizer, protocol=pickle.HIGHEST_PROTOCOL))
    return tokenizer


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        log.warning("could not cache the tokenizer in %s (%s); it is built each time", path.parent, exc)
