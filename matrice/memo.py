"""Results stored under a hash of everything that determines them, so a sweep recomputes only what
changed: `dvc exp run -S tau=0.3` changes MATRICE's neurons, not the fine-tuning of all parameters,
LoRA or AMIG's threshold sets, and those runs are read back instead of repeated.

A key covers the inputs the caller names, the model's weights (:func:`model_digest`), its tokenizer
(:func:`tokenizer_digest`) and the code (:func:`code_fingerprint`: the module that computes the
stored values, every project module it imports, transitively, the whole model package, and the
versions of the numerical libraries), so an entry can only be reused by a run that would compute the
same thing. A change to code the values do not run (the verdicts' statistics, the report,
attribution for an editing pass) keeps the entries: such a change reruns a stage in DVC, and the
stage reads its passes and trainings back instead of recomputing hours of them. Entries are JSON
files written atomically; a killed run leaves whole entries or none. Arrays are stored as ``.npy``
(exact, compact).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from matrice.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
_LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "numpy", "accelerate")


PACKAGE = PACKAGE_DIR.name
ALWAYS_FINGERPRINTED = ("models",)  # subpackages in every fingerprint: how the model is loaded and run


def _in_package(name: str, package: str = PACKAGE) -> bool:
    return name == package or name.startswith(package + ".")


def module_file(name: str, root: Path) -> Path | None:
    """The source file of module ``name`` under ``root`` (the directory holding the package), if any."""
    base = root.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """What each import statement of the file loads, function-level imports included: (a module, the
    module to take instead when the first is not one). ``from a import b`` takes the submodule a.b
    where there is one (a is then only its container), else the name b from a's own code."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found += [(f"{base}.{alias.name}", base) for alias in node.names]
    return found


def module_sources(modules: Iterable[str], root: Path = PACKAGE_DIR.parent, package: str = PACKAGE) -> list[Path]:
    """The source files of ``modules`` and of every module of ``package`` they import, transitively,
    read statically (no import runs). A package's ``__init__`` counts where names are taken from it,
    not for being a parent or a container: a value depends on the functions its code calls, and
    those are the names it imports."""
    seen: dict[str, Path] = {}
    todo: list[tuple[str, str | None]] = [(m, None) for m in modules]
    while todo:
        wanted, instead = todo.pop()
        path = module_file(wanted, root)
        name = wanted if path is not None or instead is None else instead
        path = path or module_file(name, root)
        if path is None or name in seen or not _in_package(name, package):
            continue
        seen[name] = path
        todo.extend(_imports(name, path))
    return sorted(set(seen.values()))


@lru_cache(maxsize=None)
def code_fingerprint(*modules: str) -> str:
    """sha256 of the code behind a stored value: the source (path and content) of ``modules``, what
    they import from the package (:func:`module_sources`) and every file of the model package; every
    ``.py`` file of the package when no module is named. Then the numerical libraries' versions."""
    from importlib.metadata import PackageNotFoundError, version

    if modules:
        unknown = [name for name in modules if not _in_package(name) or module_file(name, PACKAGE_DIR.parent) is None]
        if unknown:
            raise ValueError(f"memo code {unknown}: no such module in the {PACKAGE} package")
        always = [path for sub in ALWAYS_FINGERPRINTED for path in (PACKAGE_DIR / sub).rglob("*.py")]
        paths = sorted(set(module_sources(modules)) | set(always))
    else:
        paths = sorted(PACKAGE_DIR.rglob("*.py"))
    h = hashlib.sha256()
    for path in paths:
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for name in _LIBRARIES:
        try:
            h.update(f"{name}={version(name)}\0".encode())
        except PackageNotFoundError:
            h.update(f"{name}=absent\0".encode())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes, bytes), its device type and its config
    (the attention implementation included): ~1 s per GB."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        h.update(_config_text(config).encode() + b"\0")
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|{t.device.type}\0".encode())
        if t.numel():
            data = t.to("cpu").contiguous()
            if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the same bytes as int16
                data = data.view(torch.int16)
            h.update(memoryview(data.numpy()).cast("B"))
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of how the tokenizer turns text into ids and back: its class, its whole definition (a
    fast tokenizer's JSON: vocabulary, merges, normalisation, pre- and post-processing, added
    tokens; a slow one's vocabulary), its special tokens and padding side; not where it was loaded
    from. Keys hold encodings, but a stored value can decode (injection's exact-match check)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    settings = {"class": type(tokenizer).__name__, "special": getattr(tokenizer, "special_tokens_map", {}),
                "padding_side": getattr(tokenizer, "padding_side", None)}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode() + b"\0")
    h.update(definition.encode())
    return h.hexdigest()


def _config_text(config: Any) -> str:
    """The model's config as it shapes computation: not where it was loaded from (a memo folder moves
    with its project) nor the transformers version (a key part of its own); the attention
    implementation included."""
    settings = config.to_dict()
    for where in ("_name_or_path", "transformers_version"):
        settings.pop(where, None)
    settings["_attn_implementation"] = getattr(config, "_attn_implementation", None)
    return json.dumps(settings, sort_keys=True, default=str)


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
    def for_model(cls, directory: str | Path, model: nn.Module, code: Iterable[str] = (),
                  tokenizer: Any | None = None) -> "Memo":
        """Entries for ``model`` (and ``tokenizer``, where the values depend on it) whose values are
        computed by the modules named in ``code`` (every module of the package when none is named:
        any change then invalidates every entry)."""
        salt = f"{code_fingerprint(*code)}:{model_digest(model)}"
        return cls(Path(directory), salt if tokenizer is None else f"{salt}:{tokenizer_digest(tokenizer)}")

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
