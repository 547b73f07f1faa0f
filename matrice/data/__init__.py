"""Facts, queries and their sources (embedded dataset, mLAMA 1.1 + mParaRel)."""

from matrice.data.build import BuiltDataset, build_dataset, write_dataset
from matrice.data.schema import (
    DatasetError,
    Fact,
    Query,
    fill_template,
    load_facts,
    load_queries,
    make_query,
    query_from_dict,
    query_to_dict,
)
from matrice.data.sources import ALL_LANGUAGES, DatasetConfig
from matrice.data.stats import compute_stats, stats_markdown

__all__ = [
    "ALL_LANGUAGES",
    "BuiltDataset",
    "DatasetConfig",
    "DatasetError",
    "Fact",
    "Query",
    "build_dataset",
    "compute_stats",
    "fill_template",
    "load_facts",
    "load_queries",
    "make_query",
    "query_from_dict",
    "query_to_dict",
    "stats_markdown",
    "write_dataset",
]
