"""Selective prediction: how well a per-sample signal tells wrong answers from right ones, and how
much a model would gain by answering only where the signal trusts it.

Pure functions on 1-D numpy arrays, validated at the boundary; rank-based throughout, so any
strictly increasing transform of a signal gives the same numbers.

Conventions:
- **Error rule** (`wrong`): a sample is wrong when its score is below `threshold` (0.5). For the
  VQAv2 soft accuracy (0, 0.3, 0.6, 0.9, 1 with ten human answers) that means at most one of the
  ten annotators gave the answer; for 0/1 scores (exact match, option match) it is the score itself.
- **Orientation** (`orient`): `auroc` wants a signal where higher means "more likely wrong". A
  signal where higher means right (a confidence, self-consistency, a truth margin) is oriented by
  negation. The orientation is the caller's statement of what the signal claims, fixed before
  looking at the data: an AUROC below 0.5 then says the signal points the other way.
- **AUROC**: the probability that a random wrong answer has a higher (oriented) signal than a
  random right one, ties counting one half: the Mann-Whitney U over n_wrong * n_right (Hanley &
  McNeil 1982, "The meaning and use of the area under a receiver operating characteristic (ROC)
  curve", Radiology 143:29-36). This is the trapezoidal area `sklearn.metrics.roc_auc_score`
  reports. NaN with an `UndefinedStatisticWarning` when every sample is right or every one wrong.
- **Risk-coverage curve** (El-Yaniv & Wiener 2010, "On the Foundations of Noise-free Selective
  Classification", JMLR 11; Geifman & El-Yaniv 2017, "Selective Classification for Deep Neural
  Networks", NeurIPS): rank the samples by confidence, most confident first; at coverage k/n the
  risk is the mean loss of the k most confident. The loss is 1 - score, so a VQA soft score of 0.6
  costs 0.4 (for 0/1 scores this is the usual 0/1 error). **Ties** in confidence are averaged: the
  curve is the expectation over a uniformly random order within each group of tied confidences,
  so each position in a tied group carries the group's mean loss. The curve, and every number
  below, therefore does not depend on the order of the input rows.
- **AURC** = the mean of the n risks at k = 1..n (Geifman, Uziel & El-Yaniv 2019, "Bias-Reduced
  Uncertainty Estimation for Deep Neural Classifiers", ICLR, arXiv:1805.08206). Lower is better.
- **Oracle AURC**: the AURC of the best ordering, lowest loss first (a confidence equal to the
  score itself). Geifman et al. give r + (1 - r) ln(1 - r) as its large-n value for 0/1 loss at
  error rate r; here it is computed exactly for the finite sample, by sorting.
- **E-AURC** (excess AURC) = AURC - oracle AURC >= 0 (Geifman et al. 2019): the part of AURC due
  to the ranking rather than to how many answers are wrong, so signals of one model on one set of
  samples compare fairly. 0 means the signal orders the samples as well as possible.
- **Bootstrap**: `vrp_eval.statistics.bootstrap_ci` (seeded percentile bootstrap over samples).
  Every interval of `selective_summary` uses the same seed and so the same resampled rows, for
  every statistic and every signal: differences between signals are paired.

Implementation: each statistic is computed from per-sample counts (how often each sample occurs
in a resample; all ones for the point estimate) over the tie groups of the sorted signal, so the
point estimate and every bootstrap resample go through the same code.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Literal

import numpy as np

from vrp_eval.statistics import (
    DEFAULT_N_BOOTSTRAP,
    ArrayLike,
    UndefinedStatisticWarning,
    as_float_array,
    as_unit_interval_array,
    bootstrap_ci,
    check_same_length,
)

__all__ = [
    "DEFAULT_WRONG_THRESHOLD",
    "aurc",
    "auroc",
    "excess_aurc",
    "oracle_aurc",
    "orient",
    "risk_coverage",
    "selective_summary",
    "wrong",
]

#: A score below this counts as a wrong answer (`wrong`).
DEFAULT_WRONG_THRESHOLD = 0.5

HigherMeans = Literal["wrong", "right"]


# --------------------------------------------------------------------------- validation


def _as_signal(name: str, values: ArrayLike) -> np.ndarray:
    """`values` as a 1-D float64 array of finite numbers, or a ValueError naming `name` (and, for
    NaN, how many: a signal that was not computed for some samples)."""
    try:
        missing = np.flatnonzero(np.isnan(np.asarray(values, dtype=np.float64)).ravel())
    except (TypeError, ValueError):
        missing = np.empty(0)  # not numbers at all: as_float_array says so
    if missing.size:
        raise ValueError(
            f"{name} has {missing.size} NaN value(s) of {np.size(values)} (first at position "
            f"{int(missing[0])}): a signal that was not computed for a sample cannot be ranked; "
            "drop those samples from the signal and the scores alike."
        )
    return as_float_array(name, values)


def _as_wrong(is_wrong: ArrayLike) -> np.ndarray:
    array = np.asarray(is_wrong)
    if array.dtype != np.bool_:
        numeric = _as_signal("is_wrong", array)
        if not np.all((numeric == 0.0) | (numeric == 1.0)):
            raise ValueError(
                "is_wrong must hold booleans or 0/1 (1 = wrong answer); got other values: "
                "pass wrong(scores) rather than the scores themselves."
            )
        array = numeric == 1.0
    elif array.ndim != 1:
        raise ValueError(f"is_wrong must be one-dimensional (one value per sample), got shape {array.shape}.")
    return array


def _check_threshold(threshold: float) -> float:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"threshold must lie in (0, 1] (a score below it counts as wrong; 0.5 is usual), got {threshold!r}."
        )
    return float(threshold)


# --------------------------------------------------------------------------- error rule, orientation


def wrong(scores: ArrayLike, threshold: float = DEFAULT_WRONG_THRESHOLD) -> np.ndarray:
    """Boolean array: True where the score is below `threshold` (a wrong answer).

    With the default 0.5, a VQAv2 soft score of 0 or 0.3 (at most one of ten annotators gave the
    answer) is wrong and 0.6, 0.9, 1 are right; 0/1 scores are wrong exactly where they are 0.

    >>> wrong([0.0, 0.3, 0.6, 0.9, 1.0]).tolist()
    [True, True, False, False, False]
    """
    threshold = _check_threshold(threshold)
    return as_unit_interval_array("scores", scores) < threshold


def orient(signal: ArrayLike, higher_means: HigherMeans) -> np.ndarray:
    """The signal oriented so that higher means "more likely wrong", as `auroc` expects.

    `higher_means="wrong"` keeps it; `"right"` (a confidence, self-consistency, a truth margin)
    negates it, which keeps every rank and tie.

    >>> orient([0.9, 0.2], "right").tolist()
    [-0.9, -0.2]
    """
    if higher_means not in ("wrong", "right"):
        raise ValueError(
            "higher_means must be 'wrong' or 'right' (what a higher value of the signal claims), "
            f"got {higher_means!r}."
        )
    array = _as_signal("signal", signal)
    return array if higher_means == "wrong" else -array


# --------------------------------------------------------------------------- counts over tie groups


def _tie_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending order of `values` and the start of each run of equal values within it."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    return order, starts


def _resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """(k, n) int counts: how often each sample occurs in each row of resampled `indices`."""
    k = indices.shape[0]
    flat = (indices + n * np.arange(k)[:, None]).ravel()
    return np.bincount(flat, minlength=k * n).reshape(k, n)


def _group_sums(weights: np.ndarray, order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.add.reduceat(weights[:, order], starts, axis=1)


def _auroc_rows(counts: np.ndarray, is_wrong: np.ndarray, order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """AUROC of each row of `counts`, the tie groups of the oriented signal in ascending order."""
    wrong_in_group = _group_sums(counts * is_wrong, order, starts)
    right_in_group = _group_sums(counts * ~is_wrong, order, starts)
    right_below = np.cumsum(right_in_group, axis=1) - right_in_group
    # U counts (wrong, right) pairs with the wrong one higher, ties one half: integers and halves,
    # exact in float64, so the one division below is the only rounding.
    u = (wrong_in_group * (right_below + 0.5 * right_in_group)).sum(axis=1)
    pairs = wrong_in_group.sum(axis=1) * right_in_group.sum(axis=1)
    return np.where(pairs > 0, u / np.maximum(pairs, 1), np.nan)


def _risk_rows(counts: np.ndarray, loss: np.ndarray, order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(k, n) selective risks of each row of `counts` (each summing to n), tie groups in order
    from most to least confident."""
    in_group = _group_sums(counts, order, starts)
    loss_in_group = _group_sums(counts * loss, order, starts)
    # A group a resample misses is empty: it gets no position, so its mean does not matter.
    mean_loss = loss_in_group / np.maximum(in_group, 1)
    # Under a random order within a tie group every position of the group expects its mean loss.
    expected = np.repeat(mean_loss.ravel(), in_group.ravel()).reshape(counts.shape)
    return np.cumsum(expected, axis=1) / np.arange(1, counts.shape[1] + 1)


# --------------------------------------------------------------------------- point estimates


def auroc(signal: ArrayLike, is_wrong: ArrayLike) -> float:
    """P(signal of a random wrong answer > that of a random right one), ties counting 1/2.

    `signal` is oriented so that higher means "more likely wrong" (see `orient`); `is_wrong` holds
    booleans or 0/1 (see `wrong`). 1 separates perfectly, 0.5 is chance, 0 is perfectly reversed.
    NaN with an `UndefinedStatisticWarning` when one class is empty.

    >>> auroc([0.1, 0.4, 0.5, 0.8], [False, True, False, True])
    0.75
    """
    s = _as_signal("signal", signal)
    w = _as_wrong(is_wrong)
    n = check_same_length(signal=s, is_wrong=w)
    n_wrong = int(w.sum())
    if n_wrong in (0, n):
        warnings.warn(
            f"auroc: {n_wrong} of {n} samples are wrong, so there is no (wrong, right) pair to rank and "
            "the AUROC is undefined; reporting NaN.",
            UndefinedStatisticWarning,
            stacklevel=2,
        )
        return math.nan
    return float(_auroc_rows(np.ones((1, n), dtype=np.int64), w, *_tie_groups(s))[0])


def _confidence_loss(confidence: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    c = _as_signal("confidence", confidence)
    a = as_unit_interval_array("scores", scores)
    check_same_length(confidence=c, scores=a)
    return c, 1.0 - a


def risk_coverage(confidence: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve: (coverage, risk), each of length n.

    coverage[k-1] = k/n; risk[k-1] = the mean loss (1 - score) of the k most confident samples,
    averaged over the orders of tied confidences. `confidence` is any real signal where higher
    means "trust this answer more"; `scores` lie in [0, 1].

    >>> coverage, risk = risk_coverage([0.9, 0.5, 0.5], [1.0, 1.0, 0.0])
    >>> coverage.tolist(), risk.tolist()
    ([0.3333333333333333, 0.6666666666666666, 1.0], [0.0, 0.25, 0.3333333333333333])
    """
    c, loss = _confidence_loss(confidence, scores)
    n = len(c)
    risk = _risk_rows(np.ones((1, n), dtype=np.int64), loss, *_tie_groups(-c))[0]
    return np.arange(1, n + 1) / n, risk


def aurc(confidence: ArrayLike, scores: ArrayLike) -> float:
    """Area under the risk-coverage curve: the mean of `risk_coverage`'s n risks. Lower is better.

    >>> round(aurc([0.9, 0.8, 0.7, 0.6], [1.0, 0.0, 1.0, 0.3]), 6)
    0.314583
    """
    return float(risk_coverage(confidence, scores)[1].mean())


def oracle_aurc(scores: ArrayLike) -> float:
    """The smallest AURC any ordering can reach on these scores: answer the highest scores first.

    >>> round(oracle_aurc([1.0, 0.0, 1.0, 0.3]), 6)
    0.164583
    """
    return aurc(scores, scores)


def excess_aurc(confidence: ArrayLike, scores: ArrayLike) -> float:
    """E-AURC = aurc - oracle_aurc: 0 for a perfect ordering. Lower is better.

    >>> round(excess_aurc([0.9, 0.8, 0.7, 0.6], [1.0, 0.0, 1.0, 0.3]), 6)
    0.15
    """
    return aurc(confidence, scores) - oracle_aurc(scores)


# --------------------------------------------------------------------------- summary


def _check_signals(
    signals: Mapping[str, ArrayLike], higher_means_wrong: Mapping[str, bool], n: int
) -> dict[str, np.ndarray]:
    if not signals:
        raise ValueError("signals is empty: pass at least one named per-sample signal.")
    missing = sorted(set(signals) - set(higher_means_wrong))
    extra = sorted(set(higher_means_wrong) - set(signals))
    if missing or extra:
        raise ValueError(
            "higher_means_wrong must state the orientation of every signal and of nothing else; "
            f"missing for {missing}, given for unknown {extra}."
        )
    oriented = {}
    for name, values in signals.items():
        flag = higher_means_wrong[name]
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(
                f"higher_means_wrong[{name!r}] must be True or False (does a higher {name} mean a "
                f"more likely wrong answer?), got {flag!r}."
            )
        try:
            wrongness = orient(values, "wrong" if flag else "right")
        except ValueError as error:
            raise ValueError(f"signal {name!r}: {error}") from None
        if len(wrongness) != n:
            raise ValueError(
                f"signal {name!r} has {len(wrongness)} values but scores has {n}: pass one value per "
                "sample, in the order of the scores."
            )
        oriented[name] = wrongness
    return oriented


def selective_summary(
    signals: Mapping[str, ArrayLike],
    scores: ArrayLike,
    higher_means_wrong: Mapping[str, bool],
    *,
    threshold: float = DEFAULT_WRONG_THRESHOLD,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    ci: float = 0.95,
) -> dict[str, dict[str, float | int]]:
    """AUROC, AURC and E-AURC of every signal, each with a paired percentile bootstrap CI.

    `signals` maps a name to one value per sample (same order as `scores`); `higher_means_wrong`
    says for each name whether a higher value claims a wrong answer (True: sharpness if it tracks
    overconfidence) or a right one (False: a confidence). The AUROC uses `orient(signal)` against
    `wrong(scores, threshold)`; the AURC ranks by the negation of that, the signal as a confidence,
    with the soft loss 1 - score.

    Returns, per name: `auroc`, `aurc` and `e_aurc`, each also with `_ci_low` and `_ci_high`;
    `oracle_aurc` (the same for every signal); `n` and `n_wrong`. Every interval draws the same resamples
    (same seed), so differences between signals are paired; resamples with no wrong or no right
    answer are left out of the AUROC interval with a warning. `n_bootstrap=0` skips the bootstrap
    (the intervals are NaN). Deterministic for a given seed.
    """
    threshold = _check_threshold(threshold)
    a = as_unit_interval_array("scores", scores)
    n = check_same_length(scores=a)
    oriented = _check_signals(signals, higher_means_wrong, n)
    is_wrong = a < threshold
    loss = 1.0 - a
    oracle = oracle_aurc(a)
    oracle_order = _tie_groups(loss)  # lowest loss first, the order `oracle_aurc` ranks by

    def interval(statistic, what: str) -> tuple[float, float]:
        return bootstrap_ci(statistic, n, n_bootstrap=n_bootstrap, seed=seed, ci=ci, what=what)

    summary: dict[str, dict[str, float | int]] = {}
    for name, wrongness in oriented.items():
        # Ascending wrongness is descending confidence (= -wrongness): one order serves the AUROC
        # and the risk-coverage curve.
        order = _tie_groups(wrongness)

        def resampled_auroc(indices, order=order):
            return _auroc_rows(_resample_counts(indices, n), is_wrong, *order)

        def resampled_aurc(indices, order=order):
            return _risk_rows(_resample_counts(indices, n), loss, *order).mean(axis=1)

        def resampled_e_aurc(indices, order=order):
            counts = _resample_counts(indices, n)
            signal_aurc = _risk_rows(counts, loss, *order).mean(axis=1)
            return signal_aurc - _risk_rows(counts, loss, *oracle_order).mean(axis=1)

        entry: dict[str, float | int] = {"auroc": auroc(wrongness, is_wrong)}
        if math.isnan(entry["auroc"]):
            entry["auroc_ci_low"] = entry["auroc_ci_high"] = math.nan
        else:
            entry["auroc_ci_low"], entry["auroc_ci_high"] = interval(resampled_auroc, f"auroc of {name}")
        entry["aurc"] = aurc(-wrongness, a)
        entry["aurc_ci_low"], entry["aurc_ci_high"] = interval(resampled_aurc, f"aurc of {name}")
        entry["oracle_aurc"] = oracle
        entry["e_aurc"] = entry["aurc"] - oracle
        entry["e_aurc_ci_low"], entry["e_aurc_ci_high"] = interval(resampled_e_aurc, f"e_aurc of {name}")
        entry["n"] = n
        entry["n_wrong"] = int(is_wrong.sum())
        summary[name] = entry
    return summary
