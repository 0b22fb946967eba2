"""Statistics across samples: correlations with confidence intervals, the causal accuracy drop,
per-sample reliability / overconfidence, and the seeded percentile bootstrap.

Pure functions on 1-D numpy arrays, validated at the boundary. Where a statistic is undefined
(a correlation of a constant series or of fewer than 2 samples, a drop relative to a clean
accuracy of 0) the result is an explicit NaN and an `UndefinedStatisticWarning`, never a number
that merely looks plausible.

Conventions (SPEC section 4, DESIGN "Records and results"):
- Pearson r with a Fisher-z confidence interval tanh(atanh(r) +- z_crit / sqrt(n - 3)) and the
  two-sided t-test p-value (both as `scipy.stats.pearsonr`); with n <= 3 the interval is
  uninformative, (-1, 1), as scipy reports it.
- Spearman rho: Pearson r of the average ranks.
- causal drop = mean(corrupted) / mean(clean) - 1 (a negative fraction when accuracy falls).
- Bootstrap: percentile interval over `n_bootstrap` resamples of the sample rows (paired: the
  same rows are drawn from every array), from `numpy.random.default_rng(seed)`.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

__all__ = [
    "PearsonResult",
    "UndefinedStatisticWarning",
    "as_float_array",
    "as_unit_interval_array",
    "attention_confidence_summary",
    "bootstrap_ci",
    "causal_drop",
    "causal_drop_summary",
    "check_same_length",
    "overconfidence",
    "pearson",
    "reliability",
    "spearman",
]

# Keep the (n_resamples x n_samples) index matrix of one bootstrap chunk around 16 MB.
_BOOTSTRAP_CHUNK_ELEMENTS = 2_000_000

#: Bootstrap resamples of every confidence interval unless told otherwise (the probe option `n_bootstrap`).
DEFAULT_N_BOOTSTRAP = 1000


class UndefinedStatisticWarning(RuntimeWarning):
    """A statistic is undefined for the given data and is reported as NaN."""


@dataclass(frozen=True)
class PearsonResult:
    r: float
    ci_low: float
    ci_high: float
    p: float
    n: int


# --------------------------------------------------------------------------- validation


def as_float_array(name: str, values: ArrayLike) -> np.ndarray:
    """`values` as a 1-D float64 array of finite numbers, or a ValueError naming `name`."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a 1-D sequence of numbers ({error}).") from None
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be one-dimensional (one value per sample), got shape {array.shape}: "
            "flatten it or pass one value per sample."
        )
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name} contains NaN or infinite values at positions {bad[:10].tolist()}"
            f"{' ...' if bad.size > 10 else ''}: drop those samples or fix how {name} are computed."
        )
    return array


def as_unit_interval_array(name: str, values: ArrayLike) -> np.ndarray:
    """Like `as_float_array`, and every value must lie in [0, 1]."""
    array = as_float_array(name, values)
    bad = np.flatnonzero((array < 0.0) | (array > 1.0))
    if bad.size:
        raise ValueError(
            f"{name} must lie in [0, 1]; found {array[bad[0]]!r} at position {int(bad[0])} "
            f"({bad.size} value(s) outside): pass probabilities / per-sample scores, "
            "not logits, log-probabilities or percentages."
        )
    return array


def check_same_length(**arrays: np.ndarray) -> int:
    """The common length of `arrays`, or a ValueError listing each length."""
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"inputs must have one value per sample and the same length; got {listed}.")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"inputs are empty ({', '.join(lengths)}): pass at least one sample.")
    return n


def _check_ci(ci: float) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be a confidence level strictly between 0 and 1 (e.g. 0.95), got {ci!r}.")


def _undefined(message: str) -> float:
    warnings.warn(message, UndefinedStatisticWarning, stacklevel=3)
    return math.nan


# --------------------------------------------------------------------------- correlations


def _pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    dx = x - x.mean()
    dy = y - y.mean()
    r = float(np.dot(dx, dy) / math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy))))
    return min(1.0, max(-1.0, r))


def _correlation_defined(x: np.ndarray, y: np.ndarray, what: str, names: tuple[str, str]) -> bool:
    if len(x) < 2:
        _undefined(f"{what}: a correlation needs at least 2 samples, got {len(x)}; reporting NaN.")
        return False
    for name, values in zip(names, (x, y)):
        if np.ptp(values) == 0.0:
            _undefined(
                f"{what}: {name} is constant (every value is {float(values[0])!r}), so the correlation "
                "is undefined; reporting NaN."
            )
            return False
    return True


def pearson(x: ArrayLike, y: ArrayLike, *, ci: float = 0.95, what: str = "pearson") -> PearsonResult:
    """Pearson r of paired samples with its Fisher-z `ci` interval and two-sided p-value.

    `what` names the correlation in warnings. Constant input or n < 2 gives NaN fields and an
    `UndefinedStatisticWarning`.
    """
    _check_ci(ci)
    x = as_float_array("x", x)
    y = as_float_array("y", y)
    n = check_same_length(x=x, y=y)
    if not _correlation_defined(x, y, what, ("x", "y")):
        return PearsonResult(math.nan, math.nan, math.nan, math.nan, n)
    r = _pearson_r(x, y)
    return PearsonResult(r, *_fisher_interval(r, n, ci), _pearson_p(r, n), n)


def _fisher_interval(r: float, n: int, ci: float) -> tuple[float, float]:
    if n <= 3:
        return -1.0, 1.0
    from scipy.stats import norm

    z_crit = float(norm.ppf(0.5 + ci / 2.0))
    half_width = z_crit / math.sqrt(n - 3)
    if abs(r) == 1.0:
        return r, r
    z = math.atanh(r)
    return math.tanh(z - half_width), math.tanh(z + half_width)


def _pearson_p(r: float, n: int) -> float:
    if n == 2:
        return 1.0
    if abs(r) == 1.0:
        return 0.0
    from scipy.stats import t as student_t

    t_stat = r * math.sqrt((n - 2) / (1.0 - r * r))
    return float(2.0 * student_t.sf(abs(t_stat), n - 2))


def spearman(x: ArrayLike, y: ArrayLike, *, what: str = "spearman") -> float:
    """Spearman rho (Pearson r of average ranks). NaN with a warning when undefined."""
    from scipy.stats import rankdata

    x = as_float_array("x", x)
    y = as_float_array("y", y)
    check_same_length(x=x, y=y)
    if not _correlation_defined(x, y, what, ("x", "y")):
        return math.nan
    return _pearson_r(rankdata(x), rankdata(y))


# --------------------------------------------------------------------------- per-sample measures


def reliability(confidences: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Per-sample reliability r_i = 1 - |c_i - a_i|."""
    c, a = _confidences_scores(confidences, scores)
    return 1.0 - np.abs(c - a)


def overconfidence(confidences: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Per-sample overconfidence o_i = max(0, c_i - a_i)."""
    c, a = _confidences_scores(confidences, scores)
    return np.maximum(0.0, c - a)


def _confidences_scores(confidences: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    c = as_unit_interval_array("confidences", confidences)
    a = as_unit_interval_array("scores", scores)
    check_same_length(confidences=c, scores=a)
    return c, a


# --------------------------------------------------------------------------- bootstrap


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n_samples: int,
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    ci: float = 0.95,
    what: str = "bootstrap",
) -> tuple[float, float]:
    """Seeded percentile bootstrap interval of a statistic of `n_samples` paired rows.

    `statistic(indices)` receives an int array of shape (k, n_samples), each row one resample of
    row indices (with replacement), and returns the k statistic values: vectorise over rows.
    Resamples whose statistic is not finite are left out with a warning; `n_bootstrap=0` or no
    finite resample gives (NaN, NaN).
    """
    _check_ci(ci)
    if int(n_bootstrap) != n_bootstrap or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be a non-negative integer (e.g. 1000), got {n_bootstrap!r}.")
    if n_bootstrap == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n_samples)
    values = []
    for start in range(0, n_bootstrap, chunk):
        k = min(chunk, n_bootstrap - start)
        values.append(np.asarray(statistic(rng.integers(0, n_samples, size=(k, n_samples))), dtype=np.float64))
    values = np.concatenate(values)
    finite = values[np.isfinite(values)]
    if finite.size < values.size:
        if finite.size == 0:
            _undefined(f"{what}: the statistic is undefined in every bootstrap resample; CI is NaN.")
            return math.nan, math.nan
        warnings.warn(
            f"{what}: the statistic is undefined in {values.size - finite.size} of {values.size} "
            "bootstrap resamples; the interval uses the others.",
            UndefinedStatisticWarning,
            stacklevel=2,
        )
    tail = 100.0 * (1.0 - ci) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high)


# --------------------------------------------------------------------------- causal drop


def causal_drop(clean_scores: ArrayLike, corrupted_scores: ArrayLike) -> float:
    """mean(corrupted) / mean(clean) - 1; NaN with a warning when the clean accuracy is 0."""
    clean, corrupted = _paired_scores(clean_scores, corrupted_scores)
    clean_accuracy = float(clean.mean())
    if clean_accuracy == 0.0:
        return _undefined(
            "causal drop: the clean accuracy is 0, so a relative drop is undefined; reporting NaN."
        )
    return float(corrupted.mean()) / clean_accuracy - 1.0


def _paired_scores(clean_scores: ArrayLike, corrupted_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    clean = as_unit_interval_array("clean_scores", clean_scores)
    corrupted = as_unit_interval_array("corrupted_scores", corrupted_scores)
    check_same_length(clean_scores=clean, corrupted_scores=corrupted)
    return clean, corrupted


# --------------------------------------------------------------------------- summaries


def attention_confidence_summary(
    sharpness: ArrayLike,
    confidences: ArrayLike,
    scores: ArrayLike,
    *,
    ci: float = 0.95,
    n_bootstrap: int | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """Correlations of attention sharpness S with confidence c, score a and overconfidence o.

    Returns `attn_conf_r`, `attn_acc_r`, `attn_overconf_r`, each also with `_ci_low`,
    `_ci_high` (Fisher-z), `_p` (Pearson) and `_rho` (Spearman): plain floats, NaN where
    undefined (with a warning). `n_bootstrap` and `seed` are accepted so that every summary
    takes the same options; the intervals here are analytic, so they change nothing.
    """
    del n_bootstrap, seed
    s = as_float_array("sharpness", sharpness)
    c, a = _confidences_scores(confidences, scores)
    check_same_length(sharpness=s, confidences=c, scores=a)
    targets = {
        "attn_conf_r": ("confidences", c),
        "attn_acc_r": ("scores", a),
        "attn_overconf_r": ("overconfidence", np.maximum(0.0, c - a)),
    }
    summary: dict[str, float] = {}
    for name, (target_name, target) in targets.items():
        what = f"{name} (sharpness vs {target_name})"
        with warnings.catch_warnings():
            # One warning per undefined correlation, not one from Pearson and one from Spearman.
            warnings.simplefilter("ignore", UndefinedStatisticWarning)
            result = pearson(s, target, ci=ci, what=what)
            rho = spearman(s, target, what=what)
        if math.isnan(result.r):
            _correlation_defined(s, target, what, ("sharpness", target_name))
        summary[name] = result.r
        summary[f"{name}_ci_low"] = result.ci_low
        summary[f"{name}_ci_high"] = result.ci_high
        summary[f"{name}_p"] = result.p
        summary[f"{name}_rho"] = rho
    return summary


def causal_drop_summary(
    clean_scores: ArrayLike,
    corrupted_scores: ArrayLike,
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = 0,
    ci: float = 0.95,
    prefix: str = "causal_acc_drop",
) -> dict[str, float]:
    """The causal accuracy drop with a paired percentile bootstrap CI.

    Returns `<prefix>`, `<prefix>_ci_low`, `<prefix>_ci_high`, `clean_accuracy`,
    `corrupted_accuracy` (pass `prefix="control_acc_drop"` for the control window). Paired:
    clean_scores[i] and corrupted_scores[i] are the same sample.
    """
    clean, corrupted = _paired_scores(clean_scores, corrupted_scores)
    drop = causal_drop(clean, corrupted)

    def resampled_drop(indices: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return corrupted[indices].mean(axis=1) / clean[indices].mean(axis=1) - 1.0

    if math.isnan(drop):
        low = high = math.nan
    else:
        low, high = bootstrap_ci(
            resampled_drop, len(clean), n_bootstrap=n_bootstrap, seed=seed, ci=ci, what=prefix
        )
    return {
        prefix: drop,
        f"{prefix}_ci_low": low,
        f"{prefix}_ci_high": high,
        "clean_accuracy": float(clean.mean()),
        "corrupted_accuracy": float(corrupted.mean()),
    }
