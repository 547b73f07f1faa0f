"""Two runs' verdict tables side by side (matrice.evaluation.compare)."""

from __future__ import annotations

import json
from pathlib import Path

from matrice.evaluation.compare import main, pair_rows

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def row(key: str, verdict: str, mean: float | None = 0.1, n: int = 8, primary: bool = False) -> dict:
    estimate = {"mean": mean, "low": None if mean is None else mean - 0.1, "high": None if mean is None else mean + 0.1,
                "n": n, "p": 0.5}
    return {"key": key, "source": "Fig. 5", "comparison": f"ΔP/P {key}", "verdict": verdict, "estimate": estimate,
            "primary": primary}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"m": rows}), encoding="utf-8")
    return path


def test_rows_pair_by_key_and_changed_verdicts_come_first(tmp_path, capsys):
    a = write(tmp_path / "a.json", [row("x", "inconclusive", primary=True), row("y", "replicates", primary=True),
                                    row("only_a", "equivalent")])
    b = write(tmp_path / "b.json", [row("y", "inconclusive", 0.02, primary=True), row("x", "inconclusive", primary=True),
                                    row("only_b", "contradicts")])
    pairs = pair_rows(json.loads(a.read_text()), json.loads(b.read_text()))
    assert [p.key for p in pairs] == ["x", "y", "only_a", "only_b"]
    assert [p.changed for p in pairs] == [False, True, True, True]
    assert main([str(a), str(b), "--labels", "first", "all"]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 rows change verdict between first and all; 1 of the 2 primary rows do." in out
    assert "| replicates | 1 | 0 |" in out and "| inconclusive | 1 | 2 |" in out
    table = out.split("| model |", 1)[1].splitlines()[2:]
    assert [line.split(" | ")[2] for line in table] == ["ΔP/P y", "ΔP/P only_a", "ΔP/P only_b", "ΔP/P x"]
    assert "replicates → **inconclusive**" in table[0] and "0.020 [-0.080, 0.120] (n=8)" in table[0]
    assert "Fig. 5 (primary)" in table[0] and "(primary)" not in table[1]
    assert "| – | contradicts" not in out and "– → **contradicts**" in table[2]


def test_the_committed_report_compared_with_itself_changes_nothing(capsys):
    path = str(REPORTS / "verdicts.json")
    assert main([path, path]) == 0
    rows = json.loads((REPORTS / "verdicts.json").read_text())
    assert f"0 of {sum(len(r) for r in rows.values())} rows change verdict" in capsys.readouterr().out


def test_a_file_that_is_not_a_verdict_table_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main([str(bad), str(bad)]) == 2
    assert "not a verdicts.json" in capsys.readouterr().err


def test_every_verdict_the_report_gives_is_counted(tmp_path, capsys):
    a = write(tmp_path / "a.json", [row("x", "no data", None, n=0), row("y", "not judged")])
    assert main([str(a), str(a)]) == 0
    out = capsys.readouterr().out
    assert "| no data | 1 | 1 |" in out and "| not judged | 1 | 1 |" in out and "– (n=0)" in out
    assert "| replicates |" not in out  # a verdict neither run gives is left out of the counts


def test_the_committed_policy_comparison_is_computed_from_the_committed_verdicts(capsys):
    """reports/answer_token/first-vs-all.md ends with what compare prints for the committed default run and
    the committed `all` run: regenerating either run without regenerating the comparison fails here."""
    committed = (REPORTS / "answer_token" / "first-vs-all.md").read_text(encoding="utf-8")
    assert main([str(REPORTS / "verdicts.json"), str(REPORTS / "answer_token" / "verdicts-all.json"),
                 "--labels", "first", "all"]) == 0
    table = capsys.readouterr().out
    assert table.count("\n") > 60 and committed.endswith(table)
