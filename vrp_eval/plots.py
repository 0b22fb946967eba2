"""Pictures for reports (matplotlib, Agg: no display needed).

Each function draws on its own `matplotlib.figure.Figure` (no pyplot global state), writes one
PNG and returns its path.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ie_curves", "reliability_diagram", "risk_coverage_curves", "sharpness_scatter", "trace_heatmap"]


def reliability_diagram(
    bins: Sequence[dict[str, Any]], ece: float, path: str | Path, title: str | None = None
) -> Path:
    """Reliability diagram from the per-bin table of `vrp_eval.calibration.reliability_bins`.

    Top: bars of the mean score per bin, a marker at each bin's mean confidence and the diagonal
    (perfect calibration). Bottom: the number of samples per bin. ECE in the title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if len(bins) == 0:
        raise ValueError("bins is empty: pass the per-bin table from calibration_summary(...)['bins'].")
    missing = {"lo", "hi", "count", "mean_confidence", "mean_score"} - set(bins[0])
    if missing:
        raise ValueError(f"each bin needs lo, hi, count, mean_confidence, mean_score; missing {sorted(missing)}.")

    lows = [float(b["lo"]) for b in bins]
    widths = [float(b["hi"]) - float(b["lo"]) for b in bins]
    counts = [int(b["count"]) for b in bins]
    filled = [b for b in bins if b["count"]]

    figure = Figure(figsize=(5.0, 6.0), dpi=100)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})

    top.bar(
        [float(b["lo"]) for b in filled],
        [float(b["mean_score"]) for b in filled],
        width=[float(b["hi"]) - float(b["lo"]) for b in filled],
        align="edge",
        color="#4C72B0",
        edgecolor="white",
        label="mean score",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.plot(
        [float(b["mean_confidence"]) for b in filled],
        [float(b["mean_score"]) for b in filled],
        "o",
        color="#DD8452",
        markersize=4,
        label="(mean confidence, mean score)",
    )
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("mean score (accuracy)")
    top.legend(loc="upper left", fontsize=8)
    heading = f"ECE = {ece:.3f}"
    top.set_title(f"{title}\n{heading}" if title else f"Reliability diagram, {heading}")

    bottom.bar(lows, counts, width=widths, align="edge", color="#8C8C8C", edgecolor="white")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")
    for lo, width, count in zip(lows, widths, counts):
        if count:
            bottom.annotate(str(count), (lo + width / 2, count), ha="center", va="bottom", fontsize=7)
    bottom.set_ylim(0, max(counts) * 1.25 if max(counts) else 1)

    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


# --- causal tracing and attention (vrp_eval.tracing, vrp_eval.attention) ---------------------------
IE_GROUPS = ("image", "text", "last")
_GROUP_COLOURS = {"image": "#4C72B0", "text": "#55A868", "last": "#C44E52", "all": "#8172B2"}


def _new_figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _ie_rows(ie_mean: dict[str, Sequence[float]]) -> tuple[list[str], list[list[float]]]:
    if not ie_mean:
        raise ValueError("ie_mean is empty: pass {group: [mean IE per decoder layer]}, e.g. the run's ie_curves.")
    groups = [g for g in IE_GROUPS if g in ie_mean] + [g for g in ie_mean if g not in IE_GROUPS]
    rows = [[float("nan") if v is None else float(v) for v in ie_mean[g]] for g in groups]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"every group needs one IE value per layer; got lengths { {g: len(r) for g, r in zip(groups, rows)} }")
    return groups, rows


def trace_heatmap(ie_mean: dict[str, Sequence[float]], path: str | Path, title: str | None = None) -> Path:
    """Causal trace heatmap: mean indirect effect IE(l, G) = p_restored - p_corrupted, one row per
    position group, one column per decoder layer (from 0). Diverging colours centred on 0."""
    import numpy as np

    groups, rows = _ie_rows(ie_mean)
    values = np.asarray(rows, dtype=float)
    finite = np.abs(values[np.isfinite(values)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    layers = values.shape[1]
    figure = _new_figure((max(4.0, 0.35 * layers + 2.0), 0.6 * len(groups) + 1.6))
    axes = figure.subplots()
    image = axes.imshow(values, aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    axes.set_yticks(range(len(groups)), groups)
    step = max(1, layers // 16)
    axes.set_xticks(range(0, layers, step))
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("restored positions")
    figure.colorbar(image, ax=axes, label="mean IE (p_restored - p_corrupted)")
    axes.set_title(title or "Causal trace: mean indirect effect")
    return _save(figure, path)


def ie_curves(ie_mean: dict[str, Sequence[float]], path: str | Path, integration_layer: int | None = None,
              circuit: Sequence[int] | None = None, title: str | None = None) -> Path:
    """Mean IE per decoder layer, one curve per group; the integration layer (where `last` first
    exceeds `image`) as a dashed line and the causal circuit [first, last] (inclusive) shaded."""
    groups, rows = _ie_rows(ie_mean)
    figure = _new_figure((6.0, 3.8))
    axes = figure.subplots()
    if circuit is not None:
        first, last = int(circuit[0]), int(circuit[1])
        axes.axvspan(first - 0.5, last + 0.5, color="#F2C14E", alpha=0.3, label=f"circuit {first}-{last}")
    for group, row in zip(groups, rows):
        axes.plot(range(len(row)), row, marker="o", markersize=3, color=_GROUP_COLOURS.get(group), label=group)
    if integration_layer is not None:
        axes.axvline(int(integration_layer), color="black", linestyle="--", linewidth=1,
                     label=f"integration layer {int(integration_layer)}")
    axes.axhline(0.0, color="grey", linewidth=0.5)
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("mean IE")
    axes.legend(fontsize=8)
    axes.set_title(title or "Mean indirect effect of restoring each group")
    return _save(figure, path)


def sharpness_scatter(sharpness: Sequence[float], confidence: Sequence[float], correct: Sequence[float],
                      path: str | Path, title: str | None = None) -> Path:
    """Attention sharpness S (x) against confidence (y), one point per sample, coloured by
    correctness: two colours when `correct` is 0/1 (or bool), a colour scale for graded scores
    (VQA accuracy). Samples with a missing value are left out; Pearson r(S, c) in the title."""
    import numpy as np

    s = np.asarray([np.nan if v is None else v for v in sharpness], dtype=float)
    c = np.asarray([np.nan if v is None else v for v in confidence], dtype=float)
    a = np.asarray([np.nan if v is None else v for v in correct], dtype=float)
    if not len(s) == len(c) == len(a):
        raise ValueError(f"sharpness, confidence and correct need one value per sample; got {len(s)}, {len(c)}, {len(a)}")
    keep = np.isfinite(s) & np.isfinite(c) & np.isfinite(a)
    s, c, a = s[keep], c[keep], a[keep]
    figure = _new_figure((5.0, 4.2))
    axes = figure.subplots()
    if np.isin(a, (0.0, 1.0)).all():
        for value, colour, label in ((0.0, "#C44E52", "wrong"), (1.0, "#4C72B0", "correct")):
            chosen = a == value
            axes.scatter(s[chosen], c[chosen], s=14, alpha=0.75, color=colour, label=f"{label} ({int(chosen.sum())})")
        axes.legend(fontsize=8)
    else:
        points = axes.scatter(s, c, s=14, alpha=0.8, c=a, cmap="RdYlBu", vmin=0.0, vmax=1.0)
        figure.colorbar(points, ax=axes, label="score")
    axes.set_xlabel("attention sharpness S")
    axes.set_ylabel("confidence")
    axes.set_ylim(-0.02, 1.02)
    heading = "Sharpness against confidence"
    if len(s) > 2 and np.std(s) > 0 and np.std(c) > 0:
        heading += f" (r = {np.corrcoef(s, c)[0, 1]:+.2f}, n = {len(s)})"
    axes.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    return _save(figure, path)


def risk_coverage_curves(table: dict[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Risk-coverage curve of every signal of `details["signal_comparison"]` (held-out half) and of the
    oracle order (dotted) when the table has it; the legend gives each curve's AURC."""
    figure = _new_figure((6.4, 4.2))
    axes = figure.subplots()
    for row in table["signals"]:
        curve = row["curve"]
        aurc = row.get("aurc")
        label = row["label"] + (f" ({aurc:.3f})" if isinstance(aurc, (int, float)) else "")
        axes.plot(curve["coverage"], curve["risk"], linewidth=1.2, label=label)
    if table.get("oracle_curve"):
        oracle = table["oracle_curve"]
        aurc = table.get("oracle_aurc")
        axes.plot(oracle["coverage"], oracle["risk"], color="grey", linestyle=":", linewidth=1.2,
                  label="oracle order" + (f" ({aurc:.3f})" if isinstance(aurc, (int, float)) else ""))
    axes.set_xlabel("coverage (share answered, most trusted first)")
    axes.set_ylabel("risk (mean 1 - score of those answered)")
    axes.set_xlim(0.0, 1.0)
    axes.legend(fontsize=7, title="signal (AURC)", title_fontsize=7)
    heading = f"Selective answering by each signal (held-out, n = {table['n']})"
    axes.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    return _save(figure, path)
