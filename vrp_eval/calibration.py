"""Confidence calibration: ECE, MCE, adaptive ECE, Brier score, the per-bin table and a seeded
bootstrap CI. The one implementation of ECE in vrp-eval: the `evaluate` modules, the lmms-eval
aggregations, the probe and the report all call these functions.

Inputs are per-sample confidences c_i in [0, 1] and scores a_i in [0, 1]; scores may be
fractional (VQA soft accuracy), so "accuracy" in a bin is the mean score.

Bin convention (Guo et al. 2017, "On Calibration of Modern Neural Networks"): with n equal-width
bins, bin b covers (b/n, (b+1)/n], and a confidence of exactly 0 goes into the first bin. The
edges are the floats b/n, so a confidence written as a short decimal that is an edge (0.2 with
n=15 or n=10) lands in the bin it closes. Other libraries differ on edges: torchmetrics and
netcal use [lo, hi) (torchmetrics puts 1.0 into a hidden extra bin, netcal clips to
[eps, 1 - eps]); results agree with them whenever no confidence lies on an edge.

- ECE = sum_b |B_b|/N * |mean_conf(B_b) - mean_score(B_b)|  (L1, weighted by bin count).
- MCE = max over non-empty bins of |mean_conf - mean_score|.
- ACE (adaptive / equal-mass ECE): stable sort by confidence, `numpy.array_split` into n groups,
  then the same weighted gap.
- Brier = mean (c_i - a_i)^2.
- CI: percentile bootstrap of ECE over resampled samples (seeded). Binned ECE is biased upward
  for small N, so the interval need not contain the point estimate.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vrp_eval.statistics import (
    DEFAULT_N_BOOTSTRAP,
    ArrayLike,
    as_unit_interval_array,
    bootstrap_ci,
    check_same_length,
)

__all__ = [
    "DEFAULT_N_BINS",
    "DEFAULT_N_BOOTSTRAP",
    "ace",
    "bin_edges",
    "bin_indices",
    "brier",
    "calibration_summary",
    "ece",
    "ece_bootstrap_ci",
    "mce",
    "reliability_bins",
    "validate_inputs",
]

DEFAULT_N_BINS = 15


def validate_inputs(confidences: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Confidences and scores as equal-length 1-D float arrays in [0, 1], or a ValueError."""
    c = as_unit_interval_array("confidences", confidences)
    a = as_unit_interval_array("scores", scores)
    check_same_length(confidences=c, scores=a)
    return c, a


def _check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer (15 is the usual choice), got {n_bins!r}.")
    return int(n_bins)


def bin_edges(n_bins: int = DEFAULT_N_BINS) -> np.ndarray:
    """The n_bins + 1 edges b / n_bins."""
    n_bins = _check_n_bins(n_bins)
    return np.arange(n_bins + 1, dtype=np.float64) / n_bins


def bin_indices(confidences: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> np.ndarray:
    """Bin b of each confidence under the (b/n, (b+1)/n] convention, 0 holding confidence 0."""
    c = as_unit_interval_array("confidences", confidences)
    return _bin_indices(c, bin_edges(n_bins))


def _bin_indices(c: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # side="left" finds the first edge >= c, i.e. c lies in (edges[i-1], edges[i]].
    return np.clip(np.searchsorted(edges, c, side="left") - 1, 0, len(edges) - 2)


def _bin_sums(bins: np.ndarray, c: np.ndarray, a: np.ndarray, n_bins: int):
    counts = np.bincount(bins, minlength=n_bins)
    conf_sums = np.bincount(bins, weights=c, minlength=n_bins)
    score_sums = np.bincount(bins, weights=a, minlength=n_bins)
    return counts, conf_sums, score_sums


def ece(confidences: ArrayLike, scores: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Expected calibration error: equal-width bins, L1 gap, weighted by bin count."""
    c, a = validate_inputs(confidences, scores)
    n_bins = _check_n_bins(n_bins)
    _, conf_sums, score_sums = _bin_sums(_bin_indices(c, bin_edges(n_bins)), c, a, n_bins)
    # |B|/N * |sum_c/|B| - sum_a/|B|| = |sum_c - sum_a| / N; empty bins contribute 0.
    return float(np.abs(conf_sums - score_sums).sum() / len(c))


def mce(confidences: ArrayLike, scores: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Maximum calibration error: the largest |mean confidence - mean score| over non-empty bins."""
    c, a = validate_inputs(confidences, scores)
    n_bins = _check_n_bins(n_bins)
    counts, conf_sums, score_sums = _bin_sums(_bin_indices(c, bin_edges(n_bins)), c, a, n_bins)
    filled = counts > 0
    return float(np.max(np.abs(conf_sums[filled] - score_sums[filled]) / counts[filled]))


def ace(confidences: ArrayLike, scores: ArrayLike, n_bins: int = DEFAULT_N_BINS) -> float:
    """Adaptive (equal-mass) ECE: stable sort by confidence, `numpy.array_split` into n_bins
    contiguous groups, weighted L1 gap. With fewer samples than bins the empty groups are skipped."""
    c, a = validate_inputs(confidences, scores)
    n_bins = _check_n_bins(n_bins)
    order = np.argsort(c, kind="stable")
    gap = 0.0
    for group in np.array_split(order, n_bins):
        if group.size:
            gap += abs(float(c[group].sum()) - float(a[group].sum()))
    return gap / len(c)


def brier(confidences: ArrayLike, scores: ArrayLike) -> float:
    """Brier score: mean (c_i - a_i)^2."""
    c, a = validate_inputs(confidences, scores)
    return float(np.mean((c - a) ** 2))


def reliability_bins(
    confidences: ArrayLike, scores: ArrayLike, n_bins: int = DEFAULT_N_BINS
) -> list[dict[str, Any]]:
    """The per-bin table for the reliability diagram: one dict per bin (all n_bins of them, in
    order) with `lo`, `hi`, `count`, `mean_confidence`, `mean_score`; the means are None for an
    empty bin. Plain Python floats / ints, JSON-serialisable."""
    c, a = validate_inputs(confidences, scores)
    n_bins = _check_n_bins(n_bins)
    edges = bin_edges(n_bins)
    counts, conf_sums, score_sums = _bin_sums(_bin_indices(c, edges), c, a, n_bins)
    table = []
    for b in range(n_bins):
        count = int(counts[b])
        table.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": count,
                "mean_confidence": float(conf_sums[b] / count) if count else None,
                "mean_score": float(score_sums[b] / count) if count else None,
            }
        )
    return table


def ece_bootstrap_ci(
    confidences: ArrayLike,
    scores: ArrayLike,
    n_bins: int = DEFAULT_N_BINS,
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, float]:
    """Seeded percentile bootstrap interval of ECE (samples resampled with replacement)."""
    c, a = validate_inputs(confidences, scores)
    n_bins = _check_n_bins(n_bins)
    bins = _bin_indices(c, bin_edges(n_bins))
    n = len(c)

    def resampled_ece(indices: np.ndarray) -> np.ndarray:
        # All resamples of a chunk at once: offset each row's bins so one bincount covers them.
        k = indices.shape[0]
        flat = (bins[indices] + n_bins * np.arange(k)[:, None]).ravel()
        conf_sums = np.bincount(flat, weights=c[indices].ravel(), minlength=k * n_bins)
        score_sums = np.bincount(flat, weights=a[indices].ravel(), minlength=k * n_bins)
        return np.abs(conf_sums - score_sums).reshape(k, n_bins).sum(axis=1) / n

    return bootstrap_ci(resampled_ece, n, n_bootstrap=n_bootstrap, seed=seed, ci=ci, what="ece")


def calibration_summary(
    confidences: ArrayLike,
    scores: ArrayLike,
    n_bins: int = DEFAULT_N_BINS,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, Any]:
    """Everything calibration in one call: `ece`, `mce`, `ace`, `brier`, `ece_ci_low`,
    `ece_ci_high`, `bins` (see `reliability_bins`) and `n_samples`, as plain JSON-serialisable
    Python values. `n_bootstrap=0` skips the bootstrap (the CI is then NaN)."""
    c, a = validate_inputs(confidences, scores)
    ci_low, ci_high = ece_bootstrap_ci(c, a, n_bins, n_bootstrap=n_bootstrap, seed=seed, ci=ci)
    return {
        "ece": ece(c, a, n_bins),
        "mce": mce(c, a, n_bins),
        "ace": ace(c, a, n_bins),
        "brier": brier(c, a),
        "ece_ci_low": ci_low,
        "ece_ci_high": ci_high,
        "bins": reliability_bins(c, a, n_bins),
        "n_samples": len(c),
    }
