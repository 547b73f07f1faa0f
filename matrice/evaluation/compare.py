"""Two runs' verdict tables side by side, from each run's ``reports/verdicts.json``: which rows changed
verdict and how far their estimates moved. Made for comparisons a reader needs in one table, such
as the default run against ``dvc exp run -S answer_token=all`` (whole answers against first tokens).

    python -m matrice.evaluation.compare first/verdicts.json all/verdicts.json --labels first all

prints a Markdown section (counts per verdict, how many rows and primary rows change verdict, then
one row per claim, changed verdicts first, primary rows marked).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, get_args

from matrice.evaluation.stats import Estimate, Verdict


@dataclass(frozen=True)
class RowPair:
    """One claim row (its key) in both runs; None where a run has no such row."""

    model: str
    key: str
    source: str
    comparison: str
    a: Mapping[str, Any] | None
    b: Mapping[str, Any] | None

    @property
    def changed(self) -> bool:
        return verdict(self.a) != verdict(self.b)

    @property
    def primary(self) -> bool:
        """A row named in `verdicts.primary` in either run (testable or not)."""
        return any(bool(r.get("primary")) for r in (self.a, self.b) if r is not None)


def verdict(row: Mapping[str, Any] | None) -> str:
    return "–" if row is None else str(row["verdict"])


def estimate_text(row: Mapping[str, Any] | None) -> str:
    """The relation-level estimate as the report prints it, or – without a row."""
    return "–" if row is None else Estimate(**row["estimate"]).format()


def load_verdicts(path: str | Path) -> dict[str, list[Mapping[str, Any]]]:
    """model -> its claim rows, as the report stage wrote them."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(rows, list) for rows in data.values()):
        raise ValueError(f"{path}: not a verdicts.json (model -> list of claim rows)")
    return data


def pair_rows(a: Mapping[str, Sequence[Mapping[str, Any]]], b: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[RowPair]:
    """Rows matched by (model, key): the first run's order, then rows only the second run has."""
    pairs = []
    for model in list(a) + [m for m in b if m not in a]:
        mine = {r["key"]: r for r in a.get(model, [])}
        theirs = {r["key"]: r for r in b.get(model, [])}
        for key in list(mine) + [k for k in theirs if k not in mine]:
            row = mine.get(key) or theirs[key]
            pairs.append(RowPair(model, key, row["source"], row["comparison"], mine.get(key), theirs.get(key)))
    return pairs


def comparison_section(pairs: Sequence[RowPair], labels: tuple[str, str]) -> str:
    """Markdown: verdict counts per run, then every row (changed verdicts first)."""
    la, lb = labels
    counts = [Counter(verdict(p.a) for p in pairs), Counter(verdict(p.b) for p in pairs)]
    lines = [f"| verdict | {la} | {lb} |", "|---|---:|---:|"]
    lines += [f"| {v} | {counts[0][v]} | {counts[1][v]} |" for v in get_args(Verdict) if counts[0][v] or counts[1][v]]
    changed = [p for p in pairs if p.changed]
    primary = [p for p in pairs if p.primary]
    lines += ["", f"{len(changed)} of {len(pairs)} rows change verdict between {la} and {lb}; "
              f"{sum(p.changed for p in primary)} of the {len(primary)} primary rows do.", "",
              f"| model | source | we estimate | {la} | {lb} | verdict |", "|---|---|---|---|---|---|"]
    for p in changed + [p for p in pairs if not p.changed]:
        move = f"{verdict(p.a)} → **{verdict(p.b)}**" if p.changed else verdict(p.a)
        source = f"{p.source} (primary)" if p.primary else p.source
        lines.append(f"| {p.model} | {source} | {p.comparison} | {estimate_text(p.a)} | {estimate_text(p.b)} | {move} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="the first run's reports/verdicts.json")
    parser.add_argument("b", help="the second run's reports/verdicts.json")
    parser.add_argument("--labels", nargs=2, default=("A", "B"), metavar=("A", "B"), help="column names of the two runs")
    args = parser.parse_args(argv)
    try:
        pairs = pair_rows(load_verdicts(args.a), load_verdicts(args.b))
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(comparison_section(pairs, tuple(args.labels)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
