"""Markdown tables and matplotlib figures; `reports/report.md` is assembled from these."""

from __future__ import annotations

from typing import Mapping

LANG_ORDER = ["en", "fr", "zh", "fi", "hu", "ja", "ko"]


def ordered_langs(langs) -> list[str]:
    return sorted(langs, key=lambda l: (LANG_ORDER.index(l) if l in LANG_ORDER else len(LANG_ORDER), l))


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}"
        return "–" if v is None else str(v)

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


def plot_layer_distribution(dist: Mapping[str, list[float]], path, title: str) -> None:
    """Fig. 4: share of selected neurons per layer, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for method, shares in dist.items():
        ax.plot(range(len(shares)), [100 * s for s in shares], marker="o", ms=3, label=method)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of selected neurons (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def wide_rows(index_name: str, series: Mapping[str, list[float]]) -> list[dict]:
    """[{index: i, method1: v, method2: v, ...}] — the layout `dvc plots` draws one line per column of."""
    length = max((len(v) for v in series.values()), default=0)
    return [{index_name: i, **{name: values[i] for name, values in series.items()}} for i in range(length)]
