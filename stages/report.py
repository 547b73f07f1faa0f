"""report: reports/report.md — every figure and table of the run with a sentence on what it shows —
and reports/verdicts.json, the judged claim rows (matrice.evaluation.document)."""

from __future__ import annotations

from matrice.data.schema import load_queries
from matrice.evaluation.document import judge, write_report
from matrice.evaluation.report import RunResults
from matrice.io import read_output
from stages.common import (DATASET_DIR, REPORTS_DIR, evaluation_rule, load_params, relation_of, results_dir,
                           setup_logging)


def main() -> None:
    setup_logging()
    params = load_params()
    queries = load_queries(DATASET_DIR / "queries.jsonl")
    rule, relations = evaluation_rule(params, queries), relation_of(queries)
    try:
        stats = read_output(DATASET_DIR / "stats.md")
        runs = {key: judge(RunResults(key, results_dir(key), REPORTS_DIR, params, rule, relations)) for key in params["models"]}
        write_report(params, runs, stats, REPORTS_DIR / "report.md", REPORTS_DIR / "verdicts.json")
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from exc


if __name__ == "__main__":
    main()
