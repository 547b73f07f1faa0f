"""build_dataset: RML-LAMA-style facts and queries (+ Table I statistics) from the `dataset` params."""

from __future__ import annotations

from matrice.data.build import build_dataset, write_dataset
from matrice.data.sources import DatasetConfig
from stages.common import DATASET_DIR, load_params, setup_logging


def main() -> None:
    setup_logging()
    params = load_params()
    dataset = build_dataset(DatasetConfig.from_dict({**params["dataset"], "seed": params["seed"]}))
    write_dataset(dataset, DATASET_DIR)
    print(f"{len(dataset.facts)} facts, {len(dataset.queries)} queries -> {DATASET_DIR}")


if __name__ == "__main__":
    main()
