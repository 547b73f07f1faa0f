"""Results stored under a hash of everything that determines them, so a sweep recomputes only what
changed: `dvc exp run -S tau=0.3` changes MATRICE's neurons, not the fine-tuning of all parameters,
LoRA or AMIG's threshold sets, and those runs are read back instead of repeated.

A key covers the inputs the caller names, the model's weights (:func:`model_digest`) and the code
(:func:`code_fingerprint`: every source file of the package and the versions of the numerical
libraries), so an entry can only be reused by a run that would compute the same thing; a changed
file anywhere in the package invalidates every entry. Entries are JSON files written atomically; a
killed run leaves whole entries or none. Arrays are stored as ``.npy`` (exact, compact).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from matrice.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
_LIBRARIES = ("torch", "transformers", "peft", "numpy", "accelerate")


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of every ``.py`` file of the package (path and content) and the library versions."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for name in _LIBRARIES:
        try:
            h.update(f"{name}={version(name)}\0".encode())
        except PackageNotFoundError:
            h.update(f"{name}=absent\0".encode())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, bytes) and its device type: ~1 s per GB."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.device.type}\0".encode())
        if t.numel():
            data = t.to("cpu").contiguous()
            if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bytes as int16
                data = data.view(torch.int16)
            h.update(memoryview(data.numpy()).cast("B"))
    return h.hexdigest()


def _canonical(value: Any) -> Any:
    """JSON-able form of key parts (dataclasses and tuples included), so equal inputs hash equally."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _canonical(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"memo key part of type {type(value).__name__} has no canonical form")


@dataclass(frozen=True)
class Memo:
    """A directory of results keyed by :meth:`key`; ``salt`` (model digest, code fingerprint) enters
    every key."""

    directory: Path
    salt: str

    @classmethod
    def for_model(cls, directory: str | Path, model: nn.Module) -> "Memo":
        return cls(Path(directory), f"{code_fingerprint()}:{model_digest(model)}")

    def key(self, **parts: Any) -> str:
        text = json.dumps({"salt": self.salt, "parts": _canonical(parts)}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    @staticmethod
    def _read(path: Path, read: Callable[[Path], Any]) -> Any | None:
        """An entry, or None when absent or unreadable (an unreadable entry is recomputed, never trusted)."""
        if not path.exists():
            return None
        try:
            return read(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("memo entry %s unreadable (%s); recomputing", path, exc)
            return None

    def load(self, key: str) -> Any | None:
        return self._read(self._path(key), lambda path: json.loads(path.read_text(encoding="utf-8"))["value"])

    def store(self, key: str, value: Any) -> None:
        atomic_write_json(self._path(key), {"value": value})

    def get_or_compute(self, compute: Callable[[], Any], **parts: Any) -> Any:
        """The stored value for ``parts``, else ``compute()`` stored under them (JSON values)."""
        key = self.key(**parts)
        value = self.load(key)
        if value is None:
            value = compute()
            self.store(key, value)
        else:
            log.info("memo: %s read back from %s", {k: v for k, v in parts.items() if isinstance(v, (str, float, int))},
                     self.directory)
        return value

    def load_array(self, key: str) -> np.ndarray | None:
        return self._read(self.directory / f"{key}.npy", lambda path: np.load(path, allow_pickle=False))

    def store_array(self, key: str, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        atomic_write_bytes(self.directory / f"{key}.npy", buffer.getvalue())
