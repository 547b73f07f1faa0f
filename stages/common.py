"""What every stage shares: params, logging, where a model's prepared files and results live."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from matrice.models.adapter import ModelAdapter

PARAMS = Path("params.yaml")
DATASET_DIR = Path("data/dataset")
MODELS_DIR = Path("models")
RESULTS_DIR = Path("results")
REPORTS_DIR = Path("reports")


def load_params(path: Path = PARAMS) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def model_arg(description: str) -> str:
    """Parse the single positional argument every per-model stage takes: the key under `models`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model", help="key of the model under `models:` in params.yaml")
    return parser.parse_args().model


def model_params(params: dict[str, Any], key: str) -> dict[str, Any]:
    models = params.get("models") or {}
    if key not in models:
        raise SystemExit(f"params.yaml: models.{key} is not defined; defined models: {sorted(models)}")
    return models[key]


def prepared_dir(key: str) -> Path:
    return MODELS_DIR / key


def results_dir(key: str) -> Path:
    return RESULTS_DIR / key


def load_prepared(key: str, params: dict[str, Any], dtype: str | None = None) -> ModelAdapter:
    """Load the model `prepare_model` made ready: converted safetensors, or the id/path it points to."""
    from matrice.models.loading import load_adapter

    info_path = prepared_dir(key) / "source.json"
    if not info_path.exists():
        raise SystemExit(f"{info_path} is missing: run the prepare_model stage first (dvc repro)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    cfg = model_params(params, key)
    return load_adapter(info["load_from"], cfg.get("device", "auto"), dtype or cfg.get("dtype", "float32"))
