"""Markdown tables and matplotlib figures; `reports/report.md` is assembled from these, and from each
experiment's `section` over a :class:`RunResults`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from matrice.io import read_output

LANG_ORDER = ["en", "fr", "zh", "fi", "hu", "ja", "ko"]


def report_languages(records) -> list[str]:
    """The languages present in ``records`` that the report shows, in its order (its tables' columns)."""
    present = {r["lang"] for r in records}
    return [lang for lang in LANG_ORDER if lang in present]


def ordered_langs(langs) -> list[str]:
    return sorted(langs, key=lambda l: (LANG_ORDER.index(l) if l in LANG_ORDER else len(LANG_ORDER), l))


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; a cell's line breaks show as ↵ and its pipes are escaped (a decoded model output
    may hold either, and a raw one would break the table)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "–" if v is None else str(v).replace("|", "\\|").replace("\r\n", "↵").replace("\n", "↵")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def probe_table(by_lang: Mapping[str, Mapping[str, float]], model: str) -> str:
    rows = [
        [lang, by_lang[lang]["queries"], by_lang[lang]["accuracy"], by_lang[lang]["top1_first_token"], by_lang[lang]["mean_prob"]]
        for lang in ordered_langs(by_lang)
    ]
    return f"Probe accuracy of `{model}`\n\n" + markdown_table(
        ["lang", "queries", "accuracy", "top-1 first token", "mean P(gold)"], rows
    )


def _save_figure(fig, path) -> None:
    """PNG through an in-memory buffer so the file appears whole or not at all."""
    import io

    import matplotlib.pyplot as plt

    from matrice.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_layer_distribution(
    dist: Mapping[str, list[float]], totals: Mapping[str, int], path, title: str, min_neurons: int = 10
) -> None:
    """Fig. 4: share of each method's selected neurons per layer, as bars on integer layer ticks; the
    legend gives each method's neuron count n. A method with fewer than `min_neurons` neurons in all
    (an empty intersection, say) is named in the title, not drawn: a single neuron would draw a 100%
    bar that says nothing about layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {m: shares for m, shares in dist.items() if totals.get(m, 0) >= min_neurons}
    n_layers = max((len(v) for v in dist.values()), default=0)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * n_layers), 3.8))
    width = 0.8 / max(len(drawn), 1)
    for k, (method, shares) in enumerate(drawn.items()):
        xs = [layer + (k - (len(drawn) - 1) / 2) * width for layer in range(len(shares))]
        ax.bar(xs, [100 * s for s in shares], width, label=f"{method} (n={totals[method]})")
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the method's neurons (%)")
    few = [f"{m} (n={totals.get(m, 0)})" for m in dist if m not in drawn]
    ax.set_title(title + (f"\nnot drawn, fewer than {min_neurons} neurons: {', '.join(few)}" if few else ""), fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def wide_rows(index_name: str, series: Mapping[str, Sequence[Any]], labels: Sequence[Any] | None = None) -> list[dict]:
    """[{index: i, method1: v, method2: v, ...}] — the layout `dvc plots` draws one line per column of.
    With ``labels`` the index takes them (one row each); estimates enter as their means."""
    length = len(labels) if labels is not None else max((len(v) for v in series.values()), default=0)
    value = lambda v: v.mean if hasattr(v, "low") else v  # noqa: E731  (an Estimate: its mean)
    return [{index_name: i if labels is None else labels[i], **{name: value(values[i]) for name, values in series.items()}}
            for i in range(length)]


def _interval_bars(ax, groups: list[str], series: Mapping[str, list[Any]]) -> None:
    """Bars of Estimate means with their 95% intervals as error bars; a cell without data is not drawn
    (no zero-height bar pretending to be a result); each legend entry says over how many facts."""
    width = 0.8 / max(len(series), 1)
    for k, (name, estimates) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        drawn = [(x, e) for x, e in zip(xs, estimates) if e is not None and e.mean is not None]
        ns = sorted({e.n for _, e in drawn})
        n_text = "no data" if not ns else f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
        ax.bar([x for x, _ in drawn], [e.mean for _, e in drawn], width, label=f"{name} ({n_text} facts)")
        with_ci = [(x, e) for x, e in drawn if e.low is not None]
        if with_ci:
            ax.errorbar([x for x, _ in with_ci], [e.mean for _, e in with_ci],
                        yerr=[[e.mean - e.low for _, e in with_ci], [e.high - e.mean for _, e in with_ci]],
                        fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_manipulation(estimates: Mapping[str, Mapping[str, list[Any]]], langs: list[str], path, title: str) -> None:
    """Fig. 5: mean relative change of P(answer) per language over facts, with 95% intervals;
    ``estimates[mode][method]`` = one Estimate per language."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, mode in zip(axes, ("suppress", "enhance")):
        _interval_bars(ax, langs, estimates[mode])
        ax.set_title(f"{mode} (×{0 if mode == 'suppress' else 2})")
        ax.set_ylabel("mean ΔP / P (95% CI over facts)")
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_enhancement(estimates: Mapping[str, list[Any]], relations: list[str], path, title: str) -> None:
    """Fig. 6: accuracy gained on Q_error per relation, mean over facts with 95% intervals where a
    relation has two facts or more; ``estimates[method]`` = one Estimate per relation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    _interval_bars(ax, relations, estimates)
    ax.set_ylabel("accuracy gained on Q_error")
    ax.set_title(title)
    _save_figure(fig, path)


def plot_edit_sweep(curves: Mapping[str, list[tuple[float, Any, Any]]], path, title: str) -> None:
    """Reliability against locality of the update edit, one line per method through its λ values;
    ``curves[method]`` = [(λ, reliability Estimate, locality Estimate), ...]. Error bars are the 95%
    intervals over facts on both axes; points without data are not drawn; the legend gives n facts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for method, points in curves.items():
        drawn = [(lam, r, l) for lam, r, l in points if r.mean is not None and l.mean is not None]
        if not drawn:
            continue
        ns = sorted({r.n for _, r, _ in drawn})
        n_text = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}-{ns[-1]}"
        xs, ys = [l.mean for _, _, l in drawn], [r.mean for _, r, _ in drawn]
        line = ax.plot(xs, ys, marker="o", label=f"{method} ({n_text} facts)")[0]
        xerr = [[l.mean - (l.low if l.low is not None else l.mean) for _, _, l in drawn],
                [(l.high if l.high is not None else l.mean) - l.mean for _, _, l in drawn]]
        yerr = [[r.mean - (r.low if r.low is not None else r.mean) for _, r, _ in drawn],
                [(r.high if r.high is not None else r.mean) - r.mean for _, r, _ in drawn]]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="none", ecolor=line.get_color(), elinewidth=0.7, capsize=2, alpha=0.6)
        for (lam, _, _), x, y in zip(drawn, xs, ys):
            ax.annotate(f"λ={lam:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=line.get_color())
    ax.set_xlabel("locality (unrelated facts' top-1 unchanged)")
    ax.set_ylabel("reliability (new object top-1)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    _save_figure(fig, path)


def plot_consistency(points: Mapping[str, tuple[float, float | None, bool]], cut: float, effect: str, path,
                     title: str) -> None:
    """Query localisation: each fact's consistency (x) against an experiment's effect on it (y),
    coloured by the consistent / inconsistent split, the split's threshold as a dashed line;
    ``points[fact]`` = (consistency, effect or None, consistent). Facts without the effect are not drawn
    (the legend counts the drawn ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, flag, color in (("consistent", True, "tab:blue"), ("inconsistent", False, "tab:orange")):
        drawn = [(x, y) for x, y, c in points.values() if c == flag and y is not None]
        if drawn:
            ax.scatter([x for x, _ in drawn], [y for _, y in drawn], color=color, label=f"{label} (n={len(drawn)} facts)")
    ax.axvline(cut, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("consistency (mean pairwise Jaccard of per-query top-k)")
    ax.set_ylabel(effect)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    _save_figure(fig, path)


def plot_fact_check(f1: Mapping[str, list[Any]], langs: list[str], path, title: str) -> None:
    """Fact checking: F1 of flagging false statements per language and detector with 95% intervals
    over facts (``f1[detector]`` = [Estimate per language]); the dotted line is flagging everything."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(langs) + 2), 4.2))
    _interval_bars(ax, langs, f1)
    ax.axhline(2 / 3, color="gray", ls=":", lw=0.9, label="flag every statement (F1 = 2/3)")
    ax.legend(fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1 (false statement flagged)")
    ax.set_title(title, fontsize=9)
    _save_figure(fig, path)


def split_empty(sets, methods) -> tuple[list[str], list[str]]:
    """(methods with neurons for some fact, methods empty for every fact): a figure draws the first
    and names the second, so "no neurons" is never drawn as a measured zero."""
    empty = [m for m in methods if all(len(per[m]) == 0 for per in sets.facts.values())]
    return [m for m in methods if m not in empty], empty


def not_drawn_note(empty: list[str], name) -> str:
    return f" ({', '.join(name(m) for m in empty)}: no neurons for any fact, not drawn)" if empty else ""


def pivot(rows: list[dict], row_key: str, col_key: str, value: str, row_order: list[str], col_order: list[str]) -> list[list]:
    cell = {(r[row_key], r[col_key]): r.get(value) for r in rows}
    return [[rk] + [cell.get((rk, ck)) for ck in col_order] for rk in row_order]


@dataclass
class RunResults:
    """One model's finished run as the report reads it: its result files (each parsed once), its
    figures, the run's parameters, the held-out rule and the relation of each fact. Every
    experiment's ``section(run)`` reads from it; ``claims`` holds the judged verdict rows."""

    key: str
    results_dir: Path
    reports_dir: Path
    params: Mapping[str, Any]
    is_evaluation: Callable[[str], bool]
    relation_of: Callable[[str], str]
    claims: list = field(default_factory=list)
    _parsed: dict[str, Any] = field(default_factory=dict, repr=False)

    def text(self, name: str) -> str:
        return read_output(self.results_dir / name)

    def json(self, name: str) -> Any:
        """Parsed once: the verdicts and the sections read the same results (treat as read-only)."""
        if name not in self._parsed:
            self._parsed[name] = json.loads(self.text(name))
        return self._parsed[name]

    def figure(self, name: str, caption: str) -> str:
        path = Path("figures") / self.key / name
        if not (self.reports_dir / path).exists():
            raise FileNotFoundError(f"{self.reports_dir / path} is missing")
        return f"![{caption}]({path.as_posix()})\n\n*{caption}*\n"

    def figure_and_table(self, figure: str, caption: str, table: str) -> str:
        """A figure, then the stage's table of the same numbers with their intervals."""
        return self.figure(figure, caption) + "\n" + self.text(table)

    def claim(self, key: str):
        return next(c for c in self.claims if c.key == key)

    def languages(self, records) -> list[str]:
        """The languages present in ``records``, in the report's order."""
        return report_languages(records)
