"""vrp_eval.calibration against hand computations, torchmetrics, netcal and sklearn, plus properties."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrp_eval.calibration import (
    ace,
    bin_indices,
    brier,
    calibration_summary,
    ece,
    ece_bootstrap_ci,
    mce,
    reliability_bins,
)

# ----------------------------------------------------------------- hand computations on bin edges

# n_bins=10. Guo (lo, hi]: {0.0, 0.05, 0.1} | {0.15} | {0.95, 1.0}. Under [lo, hi) the 0.1 would
# join 0.15 and the 1.0 would sit alone, giving ECE 0.375 instead: the convention matters here.
# The hand values below are float64 sums and means of a few short decimals: they agree up to a few
# ulp (measured <= 2e-16), so 1e-12 is float64 round-off with room, far below any binning mistake.
EDGE_CONF = [0.05, 0.1, 0.15, 0.0, 1.0, 0.95]
EDGE_SCORE = [1, 0, 0, 0, 0, 1]


def test_ece_on_bin_edges_matches_hand_computation():
    # gaps of the sums: |0.15 - 1| + |0.15 - 0| + |1.95 - 1| = 1.95 over 6 samples
    assert ece(EDGE_CONF, EDGE_SCORE, n_bins=10) == pytest.approx(1.95 / 6, abs=1e-12)


def test_mce_on_bin_edges_matches_hand_computation():
    # per-bin gaps 0.85/3, 0.15, 0.95/2
    assert mce(EDGE_CONF, EDGE_SCORE, n_bins=10) == pytest.approx(0.475, abs=1e-12)


def test_ace_sorts_and_splits_into_equal_mass_groups():
    # sorted: (0.0,0) (0.05,1) | (0.1,0) (0.15,0) | (0.95,1) (1.0,0) -> (0.95 + 0.25 + 0.95) / 6
    assert ace(EDGE_CONF, EDGE_SCORE, n_bins=3) == pytest.approx(2.15 / 6, abs=1e-12)


def test_ace_sort_is_stable_for_tied_confidences():
    # stable order keeps (1, 1) together and (0, 0) together: two gaps of 1 -> 0.5 (an unstable
    # sort could pair them as (1, 0) (1, 0) and report 0)
    assert ace([0.5, 0.5, 0.5, 0.5], [1, 1, 0, 0], n_bins=2) == pytest.approx(0.5, abs=1e-12)


def test_ace_with_fewer_samples_than_bins_skips_empty_groups():
    assert ace([0.2, 0.9], [0, 1], n_bins=15) == pytest.approx((0.2 + 0.1) / 2, abs=1e-12)


def test_bin_indices_follow_guo_convention_for_15_bins():
    assert bin_indices([0.0, 1 / 15, 1e-12, 2 / 15, 0.2, 0.2 + 1e-12, 14 / 15, 1.0]).tolist() == [
        0, 0, 0, 1, 2, 3, 13, 14,
    ]


def test_reliability_bins_table_on_bin_edges():
    bins = reliability_bins(EDGE_CONF, EDGE_SCORE, n_bins=10)
    assert [b["count"] for b in bins] == [3, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[0]["mean_confidence"] == pytest.approx(0.05, abs=1e-12)  # (0.05 + 0.1 + 0) / 3 in float64
    assert bins[0]["mean_score"] == pytest.approx(1 / 3, abs=1e-12)
    assert bins[9] == {"lo": 0.9, "hi": 1.0, "count": 2, "mean_confidence": 0.975, "mean_score": 0.5}
    assert bins[2]["mean_confidence"] is None and bins[2]["mean_score"] is None
    assert [b["lo"] for b in bins] == [i / 10 for i in range(10)]  # exact: the edges are the same divisions b / 10


def test_fractional_scores_hand_computation():
    # VQA soft scores. Bin (0.6, 0.6667]: confidences sum 1.92, scores sum 1.9; bin
    # (0.6667, 0.7333]: 0.68 against 0. ECE = (0.02 + 0.68) / 4.
    conf, score = [0.62, 0.66, 0.64, 0.68], [0.3, 0.6, 1.0, 0.0]
    assert ece(conf, score, n_bins=15) == pytest.approx(0.175, abs=1e-12)
    assert brier(conf, score) == np.mean((np.array(conf) - np.array(score)) ** 2)  # exact: the same float64 ops


# ----------------------------------------------------------------- oracle libraries


def _off_edge_inputs(seed: int, n: int, n_bins: int = 15):
    """Binary outcomes with confidences well away from every bin edge (and from 0 and 1)."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.0, 1.0, size=4 * n)
    distance = np.abs(conf * n_bins - np.round(conf * n_bins))
    conf = conf[distance > 1e-6][:n]
    correct = (rng.uniform(size=n) < conf**1.5).astype(np.int64)  # overconfident on purpose
    return conf, correct


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_and_mce_match_torchmetrics_off_edges(seed):
    import torch
    from torchmetrics.functional.classification import binary_calibration_error

    conf, correct = _off_edge_inputs(seed, 1500)
    preds, target = torch.tensor(conf, dtype=torch.float64), torch.tensor(correct)
    expected_ece = binary_calibration_error(preds, target, n_bins=15, norm="l1").item()
    expected_mce = binary_calibration_error(preds, target, n_bins=15, norm="max").item()
    assert expected_ece > 0.02  # a miscalibrated sample, so agreement is not agreement on zero
    # Off the edges both bin alike; torchmetrics sums the same float64 values in another order, which
    # moves a sum of n = 1500 terms by at most ~n * eps = 2e-13 relative (measured <= 2e-16).
    assert ece(conf, correct) == pytest.approx(expected_ece, rel=1e-12)
    assert mce(conf, correct) == pytest.approx(expected_mce, rel=1e-12)


@pytest.mark.parametrize("n_bins", [10, 15])
def test_ece_matches_netcal_off_edges(n_bins):
    from netcal.metrics import ECE

    conf, correct = _off_edge_inputs(7, 1000, n_bins)
    expected = ECE(bins=n_bins).measure(conf, correct)
    assert expected > 0.02
    # netcal clips confidences to [eps, 1 - eps] with eps = 2.2e-16, which leaves these (0.003 to
    # 0.999) alone; what remains is float64 summation order over n = 1000: <= ~n * eps = 1e-13
    # relative (measured <= 3e-16).
    assert ece(conf, correct, n_bins=n_bins) == pytest.approx(expected, rel=1e-12)


def test_brier_matches_sklearn():
    from sklearn.metrics import brier_score_loss

    conf, correct = _off_edge_inputs(3, 500)
    # float64 mean of the same 500 squares, perhaps summed in another order (measured exact)
    assert brier(conf, correct) == pytest.approx(brier_score_loss(correct, conf), rel=1e-12)


# ----------------------------------------------------------------- properties

unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
paired = st.lists(st.tuples(unit, unit), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(paired, st.integers(min_value=1, max_value=20))
def test_ece_lies_in_unit_interval_and_below_mce_and_root_brier(pairs, n_bins):
    conf, score = map(list, zip(*pairs))
    value = ece(conf, score, n_bins=n_bins)
    assert 0.0 <= value <= 1.0
    # The inequalities hold exactly in real arithmetic; 1e-12 absorbs float64 round-off of sums of at
    # most n = 60 values in [0, 1] (<= n^2 eps = 4e-13 before dividing by n, far less after).
    assert value <= mce(conf, score, n_bins=n_bins) + 1e-12
    # Jensen: the binned gap cannot exceed the root mean squared per-sample gap
    assert value**2 <= brier(conf, score) + 1e-12
    assert 0.0 <= ace(conf, score, n_bins=n_bins) <= 1.0


@settings(max_examples=60, deadline=None)
@given(paired, st.randoms(use_true_random=False))
def test_ece_mce_brier_invariant_under_permutation(pairs, random):
    conf, score = map(list, zip(*pairs))
    shuffled = pairs[:]
    random.shuffle(shuffled)
    conf2, score2 = map(list, zip(*shuffled))
    # A permutation only reorders float64 sums of <= 60 values in [0, 1]: round-off, not logic.
    assert ece(conf2, score2) == pytest.approx(ece(conf, score), abs=1e-12)
    assert mce(conf2, score2) == pytest.approx(mce(conf, score), abs=1e-12)
    assert brier(conf2, score2) == pytest.approx(brier(conf, score), abs=1e-12)


@st.composite
def calibrated_pairs(draw):
    """Pairs of samples sharing a confidence c with scores c + d and c - d: every bin's mean
    confidence equals its mean score."""
    conf, score = [], []
    for c in draw(st.lists(unit, min_size=1, max_size=30)):
        d = draw(st.floats(min_value=0.0, max_value=min(c, 1.0 - c)))
        conf += [c, c]
        score += [min(1.0, c + d), max(0.0, c - d)]
    return conf, score


@settings(max_examples=60, deadline=None)
@given(calibrated_pairs(), st.integers(min_value=1, max_value=20))
def test_ece_is_zero_when_every_bin_is_calibrated(data, n_bins):
    conf, score = data
    # Zero in real arithmetic; (c + d) + (c - d) differs from 2c by float64 round-off only, a few ulp
    # per pair over <= 30 pairs.
    assert ece(conf, score, n_bins=n_bins) == pytest.approx(0.0, abs=1e-12)
    assert mce(conf, score, n_bins=n_bins) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------- bootstrap CI and summary


def test_ece_bootstrap_matches_a_plain_resampling_loop():
    conf, correct = _off_edge_inputs(11, 200)
    rng = np.random.default_rng(5)
    resampled = [ece(conf[rows], correct[rows]) for rows in rng.integers(0, 200, size=(300, 200))]
    expected = np.percentile(resampled, [2.5, 97.5])
    low, high = ece_bootstrap_ci(conf, correct, n_bootstrap=300, seed=5)
    # The same resamples and per-bin sums; only the vectorised 15-term sum per resample may be ordered
    # differently: float64 round-off (measured exact).
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)
    assert low < ece(conf, correct) < high


def test_ece_bootstrap_is_seeded():
    conf, correct = _off_edge_inputs(12, 100)
    first = ece_bootstrap_ci(conf, correct, n_bootstrap=200, seed=1)
    assert ece_bootstrap_ci(conf, correct, n_bootstrap=200, seed=1) == first
    assert ece_bootstrap_ci(conf, correct, n_bootstrap=200, seed=2) != first
    narrow = ece_bootstrap_ci(conf, correct, n_bootstrap=200, seed=1, ci=0.5)
    assert first[0] < narrow[0] < narrow[1] < first[1]


def test_calibration_summary_keys_types_and_json():
    conf, correct = _off_edge_inputs(13, 300)
    summary = calibration_summary(conf, correct, n_bootstrap=100)
    assert set(summary) == {"ece", "mce", "ace", "brier", "ece_ci_low", "ece_ci_high", "bins", "n_samples"}
    for key in ("ece", "mce", "ace", "brier", "ece_ci_low", "ece_ci_high"):
        assert type(summary[key]) is float, key
    assert type(summary["n_samples"]) is int and summary["n_samples"] == 300
    assert summary["ece"] == ece(conf, correct)
    assert len(summary["bins"]) == 15
    assert sum(b["count"] for b in summary["bins"]) == 300
    for b in summary["bins"]:
        assert type(b["count"]) is int and type(b["lo"]) is float
        assert b["mean_score"] is None or type(b["mean_score"]) is float
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary


def test_calibration_summary_without_bootstrap_gives_nan_ci():
    summary = calibration_summary([0.3, 0.8], [0, 1], n_bootstrap=0)
    assert math.isnan(summary["ece_ci_low"]) and math.isnan(summary["ece_ci_high"])
    assert summary["ece"] == pytest.approx((0.3 + 0.2) / 2, abs=1e-12)  # float64 round-off of 2 sums


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("conf", "score", "message"),
    [
        ([0.1, 0.2], [1], "same length"),
        ([0.1, 1.2], [1, 0], r"confidences must lie in \[0, 1\]"),
        ([0.1, -0.5], [1, 0], r"confidences must lie in \[0, 1\]"),
        ([0.1, 0.2], [1, 2], r"scores must lie in \[0, 1\]"),
        ([0.1, float("nan")], [1, 0], "confidences contains NaN"),
        ([0.1, 0.2], [1, float("inf")], "scores contains NaN or infinite"),
        ([], [], "empty"),
        ([[0.1, 0.2]], [[1, 0]], "one-dimensional"),
        (["high", "low"], [1, 0], "sequence of numbers"),
    ],
)
def test_bad_input_raises_a_clear_error(conf, score, message):
    with pytest.raises(ValueError, match=message):
        calibration_summary(conf, score, n_bootstrap=10)


@pytest.mark.parametrize("n_bins", [0, -3, 2.5, True])
def test_bad_n_bins_raises(n_bins):
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        ece([0.5], [1], n_bins=n_bins)


@pytest.mark.parametrize(("kwargs", "message"), [({"ci": 1.5}, "ci must be"), ({"n_bootstrap": -1}, "n_bootstrap")])
def test_bad_bootstrap_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibration_summary([0.5, 0.6], [1, 0], **kwargs)


# ----------------------------------------------------------------- reliability diagram


def test_reliability_diagram_writes_a_png(tmp_path):
    from matplotlib.image import imread

    from vrp_eval.plots import reliability_diagram

    summary = calibration_summary(EDGE_CONF, EDGE_SCORE, n_bins=10, n_bootstrap=0)
    path = reliability_diagram(summary["bins"], summary["ece"], tmp_path / "out" / "reliability.png", title="tiny")
    assert path == tmp_path / "out" / "reliability.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert (width, height) == (500, 600)


def test_reliability_diagram_rejects_a_table_without_bins(tmp_path):
    from vrp_eval.plots import reliability_diagram

    with pytest.raises(ValueError, match="bins is empty"):
        reliability_diagram([], 0.1, tmp_path / "x.png")
    with pytest.raises(ValueError, match="mean_score"):
        reliability_diagram([{"lo": 0, "hi": 1, "count": 1, "mean_confidence": 0.5}], 0.1, tmp_path / "x.png")
