"""vrp_eval.statistics against scipy and hand computations; undefined cases give NaN + a warning."""
import math
import warnings

import numpy as np
import pytest
import scipy.stats

from vrp_eval.statistics import (
    UndefinedStatisticWarning,
    attention_confidence_summary,
    bootstrap_ci,
    causal_drop,
    causal_drop_summary,
    overconfidence,
    pearson,
    reliability,
    spearman,
)

ATTN_KEYS = {
    f"{name}{suffix}"
    for name in ("attn_conf_r", "attn_acc_r", "attn_overconf_r")
    for suffix in ("", "_ci_low", "_ci_high", "_p", "_rho")
}


def _correlated(seed: int, n: int, strength: float = 0.6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return x, strength * x + rng.normal(size=n)


# ----------------------------------------------------------------- correlations vs scipy


@pytest.mark.parametrize(("n", "ci"), [(4, 0.95), (12, 0.95), (200, 0.95), (50, 0.9)])
def test_pearson_matches_scipy_r_p_and_fisher_ci(n, ci):
    x, y = _correlated(n, n)
    expected = scipy.stats.pearsonr(x, y)
    low, high = expected.confidence_interval(confidence_level=ci)
    result = pearson(x, y, ci=ci)
    # r and the Fisher-z CI: float64 round-off of sums over <= 200 terms (<= n eps = 4e-14), at most
    # tripled by atanh here; measured <= 5e-16. p: scipy takes a beta distribution of r, we the
    # Student t sf (same value, other special functions, ~1e-14 relative each), and r's round-off is
    # amplified by d log p / dr (~10^2 in the tails); measured <= 1e-14.
    assert result.r == pytest.approx(expected.statistic, rel=1e-10)
    assert result.p == pytest.approx(expected.pvalue, rel=1e-8)
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), rel=1e-10)
    assert result.n == n


def test_pearson_small_samples_follow_scipy():
    three = pearson([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert (three.ci_low, three.ci_high) == (-1.0, 1.0)
    assert three.p == pytest.approx(scipy.stats.pearsonr([1, 2, 3], [1, 3, 2]).pvalue, rel=1e-8)  # as above
    two = pearson([1.0, 2.0], [5.0, 3.0])
    assert (two.r, two.p) == (-1.0, 1.0)


def test_pearson_perfect_correlation():
    x = np.arange(10.0)
    result = pearson(x, 2 * x + 1)
    assert (result.r, result.ci_low, result.ci_high, result.p) == (1.0, 1.0, 1.0, 0.0)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, size=60).astype(float)
    y = x + rng.integers(0, 3, size=60)
    # Pearson r of the same average ranks: float64 round-off over 60 terms (measured 2.5e-16)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, rel=1e-12)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        ([0.3, 0.3, 0.3], [0.1, 0.5, 0.9], "x is constant"),
        ([0.1, 0.5, 0.9], [1.0, 1.0, 1.0], "y is constant"),
        ([0.5], [0.5], "at least 2 samples"),
    ],
)
def test_undefined_correlation_is_nan_with_a_warning(x, y, message):
    with pytest.warns(UndefinedStatisticWarning, match=message):
        result = pearson(x, y)
    assert all(math.isnan(v) for v in (result.r, result.ci_low, result.ci_high, result.p))
    with pytest.warns(UndefinedStatisticWarning, match=message):
        assert math.isnan(spearman(x, y))


def test_correlation_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        pearson([1, float("nan"), 3], [1, 2, 3])
    with pytest.raises(ValueError, match="ci must be"):
        pearson([1, 2, 3], [1, 2, 4], ci=95)


# ----------------------------------------------------------------- per-sample measures


def test_reliability_and_overconfidence_per_sample():
    conf, score = [0.9, 0.2, 0.6, 1.0], [0.0, 1.0, 0.6, 0.3]
    # float64 round-off of 1 - |c - s| and max(0, c - s) on short decimals: an ulp or so
    assert reliability(conf, score) == pytest.approx([0.1, 0.2, 1.0, 0.3], abs=1e-12)
    assert overconfidence(conf, score) == pytest.approx([0.9, 0.0, 0.0, 0.7], abs=1e-12)
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        overconfidence([1.5], [1.0])


# ----------------------------------------------------------------- attention summary


def test_attention_confidence_summary_matches_scipy_per_pair():
    rng = np.random.default_rng(8)
    sharpness = rng.uniform(size=80)
    conf = np.clip(0.3 + 0.6 * sharpness + rng.normal(0, 0.1, 80), 0, 1)
    score = (rng.uniform(size=80) < 0.5).astype(float)
    summary = attention_confidence_summary(sharpness, conf, score)
    assert set(summary) == ATTN_KEYS
    assert all(type(v) is float for v in summary.values())
    targets = {"attn_conf_r": conf, "attn_acc_r": score, "attn_overconf_r": np.maximum(0, conf - score)}
    for name, target in targets.items():
        expected = scipy.stats.pearsonr(sharpness, target)
        low, high = expected.confidence_interval()
        # As in test_pearson_matches_scipy_r_p_and_fisher_ci; measured r, CI, rho <= 1.3e-15 and
        # p <= 3e-14 (p = 2.6e-24 for attn_conf_r, where d log p / dr ~ 240).
        assert summary[name] == pytest.approx(expected.statistic, rel=1e-10), name
        assert summary[f"{name}_p"] == pytest.approx(expected.pvalue, rel=1e-8), name
        assert (summary[f"{name}_ci_low"], summary[f"{name}_ci_high"]) == pytest.approx((low, high), rel=1e-10)
        assert summary[f"{name}_rho"] == pytest.approx(scipy.stats.spearmanr(sharpness, target).statistic, rel=1e-10)
    assert summary["attn_conf_r"] > 0.8  # the planted relation is found


def test_attention_summary_never_overconfident_gives_one_nan_and_one_warning():
    sharpness, conf = [0.1, 0.5, 0.3, 0.9], [0.2, 0.4, 0.3, 0.8]
    score = [1.0, 1.0, 1.0, 1.0]  # overconfidence is 0 everywhere; accuracy constant too
    with pytest.warns(UndefinedStatisticWarning) as caught:
        summary = attention_confidence_summary(sharpness, conf, score)
    messages = [str(w.message) for w in caught if w.category is UndefinedStatisticWarning]
    assert len(messages) == 2
    assert "attn_acc_r" in messages[0] and "scores is constant" in messages[0]
    assert "attn_overconf_r" in messages[1] and "overconfidence is constant" in messages[1]
    expected = scipy.stats.pearsonr(sharpness, conf).statistic
    assert summary["attn_conf_r"] == pytest.approx(expected, rel=1e-10)  # float64 round-off, as above
    for name in ("attn_acc_r", "attn_overconf_r"):
        assert all(math.isnan(summary[name + s]) for s in ("", "_ci_low", "_ci_high", "_p", "_rho"))


def test_attention_summary_checks_lengths():
    with pytest.raises(ValueError, match="sharpness=3, confidences=2, scores=2"):
        attention_confidence_summary([0.1, 0.2, 0.3], [0.5, 0.6], [1, 0])


# ----------------------------------------------------------------- causal drop


def test_causal_drop_hand_value():
    assert causal_drop([1, 1, 1, 1, 0], [1, 0, 1, 0, 0]) == pytest.approx(0.4 / 0.8 - 1, abs=1e-12)  # float64 means
    assert causal_drop([0.6, 0.9], [0.6, 0.9]) == 0.0


def test_causal_drop_with_zero_clean_accuracy_is_nan_with_a_warning():
    with pytest.warns(UndefinedStatisticWarning, match="clean accuracy is 0"):
        summary = causal_drop_summary([0, 0, 0], [0, 1, 0])
    assert math.isnan(summary["causal_acc_drop"])
    assert math.isnan(summary["causal_acc_drop_ci_low"]) and math.isnan(summary["causal_acc_drop_ci_high"])
    assert summary["clean_accuracy"] == 0.0
    assert summary["corrupted_accuracy"] == pytest.approx(1 / 3, abs=1e-12)  # a float64 mean: an ulp or so


def test_causal_drop_summary_paired_bootstrap_matches_a_plain_loop():
    rng = np.random.default_rng(4)
    clean = (rng.uniform(size=120) < 0.8).astype(float)
    corrupted = clean * (rng.uniform(size=120) < 0.5)
    summary = causal_drop_summary(clean, corrupted, n_bootstrap=400, seed=9)
    draws = np.random.default_rng(9).integers(0, 120, size=(400, 120))
    resampled = [corrupted[rows].mean() / clean[rows].mean() - 1 for rows in draws]
    low, high = np.percentile(resampled, [2.5, 97.5])
    # The same resamples; vectorised means of 120 values against per-row ones may sum in another
    # order: float64 round-off, <= 120 eps relative (measured exact).
    assert summary["causal_acc_drop"] == pytest.approx(corrupted.mean() / clean.mean() - 1, abs=1e-12)
    ci = (summary["causal_acc_drop_ci_low"], summary["causal_acc_drop_ci_high"])
    assert ci == pytest.approx((low, high), abs=1e-12)
    assert summary["causal_acc_drop_ci_low"] < summary["causal_acc_drop"] < summary["causal_acc_drop_ci_high"] < 0
    assert summary["clean_accuracy"] == pytest.approx(clean.mean(), abs=1e-12)


def test_causal_drop_summary_name_prefix_for_the_control():
    summary = causal_drop_summary([1, 1, 0, 1], [1, 1, 0, 0], n_bootstrap=50, prefix="control_acc_drop")
    assert set(summary) == {
        "control_acc_drop", "control_acc_drop_ci_low", "control_acc_drop_ci_high",
        "clean_accuracy", "corrupted_accuracy",
    }
    assert summary["control_acc_drop"] == pytest.approx(2 / 3 - 1, abs=1e-12)  # float64 means


def test_causal_drop_requires_paired_scores():
    with pytest.raises(ValueError, match="clean_scores=3, corrupted_scores=2"):
        causal_drop_summary([1, 1, 0], [1, 0])
    with pytest.raises(ValueError, match=r"clean_scores must lie in \[0, 1\]"):
        causal_drop_summary([100, 50], [50, 50])


def test_bootstrap_warns_when_some_resamples_are_undefined():
    clean = np.array([1.0] + [0.0] * 9)  # many resamples miss the one correct sample

    def drop(rows):
        with np.errstate(divide="ignore", invalid="ignore"):
            return clean[rows].mean(axis=1) / clean[rows].mean(axis=1) - 1

    with pytest.warns(UndefinedStatisticWarning, match="undefined in [0-9]+ of 200"):
        low, high = bootstrap_ci(drop, 10, n_bootstrap=200, seed=0)
    assert (low, high) == (0.0, 0.0)


def test_bootstrap_is_seeded_and_silent_when_defined():
    values = np.random.default_rng(0).normal(size=50)

    def mean(rows):
        return values[rows].mean(axis=1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = bootstrap_ci(mean, 50, n_bootstrap=300, seed=3)
    assert bootstrap_ci(mean, 50, n_bootstrap=300, seed=3) == first
    assert first[0] < values.mean() < first[1]
    # the normal-theory interval of a mean is a sanity bound for the percentile interval: they differ
    # by Monte Carlo error of 300 resamples and the percentile method's own small-sample bias. Over
    # 200 seeds the endpoints differ by 0.022 on average and <= 0.053 (seed 3: 0.040); 0.1 is 40% of
    # the half-width 0.255.
    half = 1.96 * values.std(ddof=1) / math.sqrt(50)
    assert first == pytest.approx((values.mean() - half, values.mean() + half), abs=0.1)


def test_attention_summary_takes_the_shared_bootstrap_options_without_effect():
    sharpness, conf, score = [0.1, 0.5, 0.3, 0.9, 0.7], [0.2, 0.4, 0.3, 0.8, 0.9], [1, 0, 1, 0, 1]
    plain = attention_confidence_summary(sharpness, conf, score)
    assert attention_confidence_summary(sharpness, conf, score, n_bootstrap=10, seed=3) == plain
