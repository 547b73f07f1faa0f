"""Atomic output writers: a crashed stage must never leave a file DVC would take as done."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def safe_stem(identifier: str) -> str:
    """A file-name-safe stem for an id (a fact id names its shard and its score file): the id itself
    when safe, else its safe characters plus a hash, so two unsafe ids cannot collide."""
    if _SAFE_NAME.fullmatch(identifier):
        return identifier
    digest = hashlib.sha1(identifier.encode()).hexdigest()[:10]
    return f"{_UNSAFE_CHARS.sub('_', identifier)[:80]}-{digest}"


def _file_mode() -> int:
    """The mode `open()` would give a new file under the current umask (0o644 under umask 022).
    mkstemp creates its file 0o600; on a cluster's shared filesystem that locks collaborators out."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_replace(path: Path, write: "callable") -> None:
    """Write through a temp file in the same directory, then rename over the target (with the
    permissions of a plainly created file, not mkstemp's private 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode())
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_replace(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows)
    atomic_write_text(path, text)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def atomic_save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """A compressed .npz (what np.savez_compressed writes, np.load reads it) through a temp file.

    Byte-for-byte deterministic: np.savez stamps every member with the current time, so equal arrays
    written twice would hash differently and DVC would rerun every stage downstream of a rerun whose
    numbers did not change. Members here carry a fixed timestamp."""

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, value in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_NPZ_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)

    _atomic_replace(Path(path), write)


_NPZ_TIME = (1980, 1, 1, 0, 0, 0)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_replace(Path(path), lambda tmp: tmp.write_bytes(data))


def read_output(path: str | Path) -> str:
    """The text of a file an earlier stage wrote; FileNotFoundError saying so when it is absent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it (dvc repro)")
    return path.read_text(encoding="utf-8")


class RunOutputs:
    """Where one model's experiment writes: its results folder (JSON, tables) and its figures folder.
    Every write is atomic; an experiment's ``write_outputs`` takes one of these, so the files it makes
    are named in one place and a stage only says which folders."""

    def __init__(self, results: str | Path, figures: str | Path, model: str) -> None:
        self.results, self.figures, self.model = Path(results), Path(figures), model

    def json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.results / name, obj)

    def text(self, name: str, text: str) -> None:
        atomic_write_text(self.results / name, text)

    def figure(self, name: str) -> Path:
        return self.figures / name

    def read_json(self, name: str) -> Any:
        """A result an earlier stage wrote (its absence named, with the stage to run)."""
        return json.loads(read_output(self.results / name))


# YAML 1.1 (PyYAML) reads a float written without a dot, such as 3e-05, as a string; DVC writes floats
# that way when `dvc exp run -S` sets them. Read such values as numbers, as YAML 1.2 does.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


@functools.cache
def _params_loader() -> type:
    import yaml

    class ParamsLoader(yaml.SafeLoader):
        pass

    ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return ParamsLoader


def read_yaml(text: str) -> Any:
    """``yaml.safe_load``, with exponent floats without a dot (3e-05) read as floats."""
    import yaml

    return yaml.load(text, Loader=_params_loader())  # noqa: S506 (a SafeLoader subclass)


def read_params(path: str | Path) -> dict[str, Any]:
    """A params file (params.yaml) as a dict; empty file -> {}."""
    return read_yaml(Path(path).read_text(encoding="utf-8")) or {}
