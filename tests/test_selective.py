"""vrp_eval.selective against hand computations, sklearn's AUROC, brute force over tie orders and
a plain bootstrap loop, plus properties (oracle bound, input-order independence)."""
import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vrp_eval.selective import (
    aurc,
    auroc,
    excess_aurc,
    oracle_aurc,
    orient,
    risk_coverage,
    selective_summary,
    wrong,
)
from vrp_eval.statistics import UndefinedStatisticWarning

VQA_SCORES = np.array([0.0, 0.3, 0.6, 0.9, 1.0])  # the VQAv2 soft accuracies with ten human answers


def _vqa_run(seed: int, n: int):
    """VQA-like soft scores and a confidence that tracks them, rounded so that it ties often."""
    rng = np.random.default_rng(seed)
    scores = rng.choice(VQA_SCORES, size=n, p=[0.25, 0.1, 0.15, 0.1, 0.4])
    confidence = np.round(1 / (1 + np.exp(-(2.0 * scores - 1.0 + rng.normal(scale=1.0, size=n)))), 1)
    return confidence, scores


# ----------------------------------------------------------------- error rule and orientation


def test_wrong_is_score_below_threshold():
    assert wrong(VQA_SCORES).tolist() == [True, True, False, False, False]
    assert wrong([0, 1, 1, 0]).tolist() == [True, False, False, True]
    assert wrong(VQA_SCORES, threshold=1.0).tolist() == [True, True, True, True, False]
    assert wrong(VQA_SCORES, threshold=0.3).tolist() == [True, False, False, False, False]


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_wrong_refuses_a_threshold_outside_the_unit_interval(threshold):
    with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\]"):
        wrong([0.5], threshold=threshold)


def test_wrong_refuses_scores_outside_the_unit_interval():
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\]"):
        wrong([0.5, 60.0])


def test_orient_negates_a_signal_where_higher_means_right():
    signal = np.array([0.9, -2.0, 0.0, 7.5])
    assert orient(signal, "right").tolist() == [-0.9, 2.0, -0.0, -7.5]
    assert orient(signal, "wrong").tolist() == signal.tolist()
    with pytest.raises(ValueError, match="higher_means must be 'wrong' or 'right'"):
        orient(signal, "correct")


def test_orienting_the_other_way_mirrors_the_auroc():
    rng = np.random.default_rng(1)
    signal, is_wrong = rng.integers(0, 6, size=80), rng.uniform(size=80) < 0.4
    forward = auroc(signal, is_wrong)
    assert forward != pytest.approx(0.5, abs=0.02)  # not the trivial fixed point of x -> 1 - x
    # U' = n_w n_r - U exactly; the two quotients round once each: 1 ulp apart at most.
    assert auroc(orient(signal, "right"), is_wrong) == pytest.approx(1.0 - forward, abs=1e-15)


# ----------------------------------------------------------------- AUROC


@pytest.mark.parametrize(
    ("signal", "is_wrong", "expected"),
    [
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),  # every wrong answer above every right one
        ([0.8, 0.9, 0.1, 0.2], [0, 0, 1, 1], 0.0),  # reversed
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied: every pair counts 1/2
        # wrong {2, 3} against right {1, 2}: 2>1, 2=2 (1/2), 3>1, 3>2 -> 3.5 / 4
        ([1.0, 2.0, 2.0, 3.0], [False, True, False, True], 0.875),
        # wrong {0.4} against right {0.1, 0.5, 0.4}: 1 + 0 + 1/2 over 3 pairs
        ([0.1, 0.4, 0.5, 0.4], [0, 1, 0, 0], 1.5 / 3),
    ],
)
def test_auroc_hand_computed(signal, is_wrong, expected):
    # numerator and denominator are exact in float64 and divided once, as is `expected`
    assert auroc(signal, is_wrong) == expected


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auroc_matches_sklearn_with_ties(seed):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n = 500
    is_wrong = rng.uniform(size=n) < 0.35
    # a few distinct values, so most samples tie with others; shifted for the wrong ones
    signal = rng.integers(0, 8, size=n) + 2 * is_wrong
    signal = np.where(rng.uniform(size=n) < 0.2, rng.normal(size=n), signal)  # some distinct values too
    assert len(np.unique(signal)) < 0.5 * n
    expected = roc_auc_score(is_wrong, signal)
    assert 0.6 < expected < 0.95  # informative but imperfect: a wrong tie rule would show
    # Ours divides an exact U by an exact n_wrong * n_right (one rounding); sklearn integrates the
    # ROC curve with the trapezoidal rule over cumulative rates, a sum of up to n float64 terms:
    # round-off of order n * eps = 1e-13 (measured <= 2.3e-16 over 200 seeds).
    assert auroc(signal, is_wrong) == pytest.approx(expected, abs=1e-12)


def test_auroc_accepts_0_1_labels_and_refuses_other_values():
    assert auroc([3.0, 1.0, 2.0], [1, 0, 0]) == auroc([3.0, 1.0, 2.0], [True, False, False]) == 1.0
    with pytest.raises(ValueError, match=r"pass wrong\(scores\)"):
        auroc([3.0, 1.0, 2.0], [0.6, 0.0, 1.0])


@pytest.mark.parametrize("is_wrong", [[0, 0, 0], [1, 1, 1]])
def test_auroc_is_nan_with_a_warning_when_one_class_is_empty(is_wrong):
    with pytest.warns(UndefinedStatisticWarning, match=f"{sum(is_wrong)} of 3 samples are wrong"):
        assert math.isnan(auroc([0.1, 0.2, 0.3], is_wrong))


# ----------------------------------------------------------------- risk-coverage and AURC

# confidence 0.9 > 0.8 > 0.7 > 0.6, losses 1 - score = 0, 1, 0, 0.7
HAND_CONF, HAND_SCORES = [0.7, 0.9, 0.6, 0.8], [1.0, 1.0, 0.3, 0.0]  # deliberately not in rank order


def test_risk_coverage_on_a_hand_computed_example():
    coverage, risk = risk_coverage(HAND_CONF, HAND_SCORES)
    assert coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    # top-1 {0}: 0; top-2 {0, 1}: 1/2; top-3 {0, 1, 0}: 1/3; all: 1.7 / 4. The float64 cumulative
    # sums of 0.7 and 1 and the divisions by k are within an ulp or two of these.
    assert risk == pytest.approx([0.0, 0.5, 1 / 3, 1.7 / 4], abs=1e-15)


def test_aurc_oracle_and_excess_on_a_hand_computed_example():
    # AURC = (0 + 1/2 + 1/3 + 0.425) / 4; the oracle orders the losses 0, 0, 0.7, 1:
    # (0 + 0 + 0.7/3 + 0.425) / 4; so E-AURC = (1/2 + 1/3 - 0.7/3) / 4 = 0.15.
    # Sums of four float64 values of this size: round-off below 1e-16; 1e-15 leaves room.
    assert aurc(HAND_CONF, HAND_SCORES) == pytest.approx((0.5 + 1 / 3 + 0.425) / 4, abs=1e-15)
    assert oracle_aurc(HAND_SCORES) == pytest.approx((0.7 / 3 + 0.425) / 4, abs=1e-15)
    assert excess_aurc(HAND_CONF, HAND_SCORES) == pytest.approx(0.15, abs=1e-15)


def test_tied_confidences_are_averaged_over_their_orders():
    # 0.5 ties a right and a wrong answer: orders (right, wrong) and (wrong, right) give risks
    # (0, 0, 1/3) and (0, 1/2, 1/3); their mean is (0, 1/4, 1/3).
    risk = risk_coverage([0.9, 0.5, 0.5], [1.0, 1.0, 0.0])[1]
    assert risk == pytest.approx([0.0, 0.25, 1 / 3], abs=1e-15)  # a few float64 operations
    assert risk_coverage([0.9, 0.5, 0.5], [1.0, 0.0, 1.0])[1] == pytest.approx(risk, abs=1e-15)


def _brute_force_aurc(confidence, scores):
    """Mean AURC over every order of the samples that is descending in confidence."""
    loss = 1.0 - np.asarray(scores)
    levels = sorted(set(confidence), reverse=True)
    groups = [[i for i, c in enumerate(confidence) if c == level] for level in levels]
    values = []
    for orders in itertools.product(*(itertools.permutations(group) for group in groups)):
        ranked = loss[[i for group in orders for i in group]]
        values.append(np.mean(np.cumsum(ranked) / np.arange(1, len(ranked) + 1)))
    return np.mean(values)


@pytest.mark.parametrize("seed", range(6))
def test_aurc_is_the_mean_over_random_tie_breaking(seed):
    rng = np.random.default_rng(seed)
    n = 7
    confidence = rng.choice([0.2, 0.5, 0.8], size=n).tolist()  # three levels: large tie groups
    scores = rng.choice(VQA_SCORES, size=n)
    # the same sums in other orders, averaged over at most 7! orders: float64 round-off (measured
    # <= 2.3e-16)
    assert aurc(confidence, scores) == pytest.approx(_brute_force_aurc(confidence, scores), abs=1e-12)


def test_aurc_extremes():
    assert aurc([0.3, 0.9, 0.1], [1, 1, 1]) == 0.0  # no loss anywhere
    assert aurc([0.3, 0.9, 0.1], [0, 0, 0]) == 1.0  # every answer wrong at every coverage
    # a constant confidence is a random ranking: every position expects the mean loss (fd-shifts'
    # "random AURC" is the mean risk for the same reason)
    scores = [1.0, 0.0, 0.6, 0.3, 1.0]
    assert aurc([0.5] * 5, scores) == pytest.approx(1 - np.mean(scores), abs=1e-15)  # float64 means


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), st.sampled_from(VQA_SCORES.tolist())),
        min_size=1,
        max_size=30,
    )
)
def test_oracle_aurc_is_a_lower_bound(rows):
    confidence, scores = map(list, zip(*rows))
    # Mathematically aurc >= oracle_aurc (for every k the oracle's top-k loss is the smallest); the
    # two sum equal losses in different groupings, so they may differ by float64 round-off when
    # the ordering is optimal: a few eps of a value <= 1.
    assert aurc(confidence, scores) >= oracle_aurc(scores) - 1e-12
    assert excess_aurc(confidence, scores) >= -1e-12


def test_excess_aurc_is_zero_for_the_oracle_ordering():
    confidence, scores = _vqa_run(5, 300)
    # any increasing function of the score ranks, and ties, exactly as the oracle does: the same
    # groups in the same order, so the same float64 operations and an exact 0
    assert excess_aurc(2.0 * scores + 1.0, scores) == 0.0
    assert excess_aurc(scores, scores) == 0.0
    assert excess_aurc(confidence, scores) > 0.01  # and a noisy confidence is not optimal
    assert excess_aurc(-scores, scores) > excess_aurc(confidence, scores)  # reversed is worse still


def _naive_stable_aurc(confidence, scores):
    """AURC with ties left in input order (a stable sort): what order independence rules out."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    loss = 1.0 - np.asarray(scores)[order]
    return np.mean(np.cumsum(loss) / np.arange(1, len(loss) + 1))


def test_numbers_do_not_depend_on_the_order_of_the_samples():
    confidence, scores = _vqa_run(11, 400)
    is_wrong = wrong(scores)
    shuffle = np.random.default_rng(0).permutation(len(scores))
    # the test has teeth: with ties left in input order the shuffle moves the AURC
    naive_shift = _naive_stable_aurc(confidence, scores) - _naive_stable_aurc(confidence[shuffle], scores[shuffle])
    assert abs(naive_shift) > 1e-4
    # AUROC: exact integer counts, exactly equal
    assert auroc(-confidence[shuffle], is_wrong[shuffle]) == auroc(-confidence, is_wrong)
    # AURC: the group means sum the same losses in another order: float64 round-off, ~n eps
    # (measured <= 1.6e-15 over 50 seeds)
    assert aurc(confidence[shuffle], scores[shuffle]) == pytest.approx(aurc(confidence, scores), abs=1e-12)
    assert risk_coverage(confidence[shuffle], scores[shuffle])[1] == pytest.approx(
        risk_coverage(confidence, scores)[1], abs=1e-12
    )
    assert oracle_aurc(scores[shuffle]) == pytest.approx(oracle_aurc(scores), abs=1e-12)


# ----------------------------------------------------------------- summary and bootstrap


def test_summary_bootstrap_is_paired_and_matches_a_plain_loop():
    confidence, scores = _vqa_run(3, 150)
    sharpness = np.round(np.random.default_rng(8).uniform(size=150) + 0.3 * (scores < 0.5), 1)
    signals = {"confidence": confidence, "sharpness": sharpness}
    orientation = {"confidence": False, "sharpness": True}
    summary = selective_summary(signals, scores, orientation, n_bootstrap=300, seed=9)
    # one chunk of 300 x 150 draws from the seed, the same for every statistic and signal
    draws = np.random.default_rng(9).integers(0, 150, size=(300, 150))
    for name, values in signals.items():
        wrongness = orient(values, "wrong" if orientation[name] else "right")
        looped = {
            "auroc": [auroc(wrongness[rows], wrong(scores[rows])) for rows in draws],
            "aurc": [aurc(-wrongness[rows], scores[rows]) for rows in draws],
            "e_aurc": [excess_aurc(-wrongness[rows], scores[rows]) for rows in draws],
        }
        for statistic, values_per_draw in looped.items():
            low, high = np.percentile(values_per_draw, [2.5, 97.5])
            # The same resamples through another path (duplicated rows as tie groups rather than
            # counts): float64 round-off in sums of <= 150 terms (measured <= 4e-16).
            ci = (summary[name][f"{statistic}_ci_low"], summary[name][f"{statistic}_ci_high"])
            assert ci == pytest.approx((low, high), abs=1e-12)
    assert summary["confidence"]["auroc"] == auroc(-confidence, wrong(scores))
    assert summary["sharpness"]["auroc"] == auroc(sharpness, wrong(scores))


def test_summary_fields_orientation_and_rank_invariance():
    confidence, scores = _vqa_run(4, 200)
    summary = selective_summary(
        {"c": confidence, "minus_c": -confidence, "exp_c": np.exp(confidence)},
        scores,
        {"c": False, "minus_c": True, "exp_c": False},
        n_bootstrap=200,
        seed=1,
    )
    entry = summary["c"]
    assert set(entry) == {
        "auroc", "auroc_ci_low", "auroc_ci_high", "aurc", "aurc_ci_low", "aurc_ci_high",
        "oracle_aurc", "e_aurc", "e_aurc_ci_low", "e_aurc_ci_high", "n", "n_wrong",
    }
    assert entry["n"] == 200 and entry["n_wrong"] == int(np.sum(scores < 0.5))
    assert entry["auroc"] == auroc(-confidence, wrong(scores))
    assert entry["aurc"] == aurc(confidence, scores)
    assert entry["oracle_aurc"] == oracle_aurc(scores)
    assert entry["e_aurc"] == pytest.approx(excess_aurc(confidence, scores), abs=0)  # the same subtraction
    assert entry["auroc"] > 0.6  # the planted link: confidence tracks the score
    # the same ranks (negated with the opposite orientation, or through exp) give the same numbers,
    # intervals included: the resamples are shared
    assert summary["minus_c"] == entry
    assert summary["exp_c"] == entry


def test_summary_intervals_contain_the_estimate_and_shrink_with_n():
    widths = {}
    for n in (200, 3200):
        confidence, scores = _vqa_run(6, n)
        entry = selective_summary({"c": confidence}, scores, {"c": False}, n_bootstrap=300, seed=2)["c"]
        for statistic in ("auroc", "aurc", "e_aurc"):
            assert entry[f"{statistic}_ci_low"] < entry[statistic] < entry[f"{statistic}_ci_high"]
        widths[n] = {s: entry[f"{s}_ci_high"] - entry[f"{s}_ci_low"] for s in ("auroc", "aurc", "e_aurc")}
    for statistic, small_n_width in widths[200].items():
        # 16 times the samples: about a quarter of the width (1/sqrt(16)); half is a loose bound
        # that Monte Carlo error of 300 resamples cannot reach
        assert widths[3200][statistic] < 0.5 * small_n_width, statistic


def test_summary_is_deterministic_and_seeded():
    confidence, scores = _vqa_run(7, 120)
    first = selective_summary({"c": confidence}, scores, {"c": False}, n_bootstrap=100, seed=5)
    assert selective_summary({"c": confidence}, scores, {"c": False}, n_bootstrap=100, seed=5) == first
    other = selective_summary({"c": confidence}, scores, {"c": False}, n_bootstrap=100, seed=6)
    assert other["c"]["auroc_ci_low"] != first["c"]["auroc_ci_low"]
    assert other["c"]["auroc"] == first["c"]["auroc"]


def test_summary_without_wrong_answers_has_nan_auroc_but_still_ranks_the_losses():
    with pytest.warns(UndefinedStatisticWarning, match="0 of 3 samples are wrong"):
        entry = selective_summary({"c": [0.2, 0.9, 0.5]}, [1.0, 0.6, 0.9], {"c": False}, n_bootstrap=20)["c"]
    assert math.isnan(entry["auroc"]) and math.isnan(entry["auroc_ci_low"]) and math.isnan(entry["auroc_ci_high"])
    # losses 0, 0.4, 0.1: still a ranking to judge. Conf order 0.9 (0.4), 0.5 (0.1), 0.2 (0):
    # risks 0.4, 0.25, 0.5/3; the oracle's (losses 0, 0.1, 0.4): 0, 0.05, 0.5/3. Float64 sums of
    # three terms.
    assert entry["aurc"] == pytest.approx((0.4 + 0.25 + 0.5 / 3) / 3, abs=1e-15)
    assert entry["e_aurc"] == pytest.approx((0.4 + 0.25 - 0.05) / 3, abs=1e-15)
    assert entry["n_wrong"] == 0


def test_summary_with_n_bootstrap_zero_skips_the_intervals():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry = selective_summary({"c": [0.2, 0.9, 0.5, 0.1]}, [0, 1, 1, 0], {"c": False}, n_bootstrap=0)["c"]
    assert entry["auroc"] == 1.0 and entry["e_aurc"] == 0.0
    intervals = [entry[f"{s}_ci_{side}"] for s in ("auroc", "aurc", "e_aurc") for side in ("low", "high")]
    assert all(math.isnan(value) for value in intervals)


# ----------------------------------------------------------------- errors at the boundary


def test_nan_signals_are_refused_with_their_count():
    with pytest.raises(ValueError, match=r"signal has 2 NaN value\(s\) of 5 \(first at position 1\)"):
        auroc([0.1, np.nan, 0.3, np.nan, 0.2], [0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"confidence has 1 NaN value\(s\) of 3"):
        aurc([0.1, 0.2, np.nan], [0, 1, 1])
    with pytest.raises(ValueError, match=r"signal 'sharpness': signal has 1 NaN value\(s\) of 2"):
        selective_summary({"sharpness": [np.nan, 0.5]}, [0, 1], {"sharpness": True})
    # infinities are refused as everywhere in vrp_eval.statistics
    with pytest.raises(ValueError, match="NaN or infinite values at positions \\[0\\]"):
        auroc([-np.inf, 0.0, 5.0], [0, 1, 1])


def test_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="signal=3, is_wrong=2"):
        auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="confidence=2, scores=3"):
        risk_coverage([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match="signal 'c' has 2 values but scores has 3"):
        selective_summary({"c": [0.1, 0.2]}, [0, 1, 1], {"c": False})


def test_empty_input_is_refused():
    with pytest.raises(ValueError, match="inputs are empty"):
        auroc([], [])
    with pytest.raises(ValueError, match="inputs are empty"):
        aurc([], [])
    with pytest.raises(ValueError, match="inputs are empty"):
        selective_summary({"c": []}, [], {"c": False})
    with pytest.raises(ValueError, match="signals is empty"):
        selective_summary({}, [0, 1], {})


def test_orientation_must_be_stated_for_every_signal():
    with pytest.raises(ValueError, match=r"missing for \['b'\], given for unknown \['z'\]"):
        selective_summary({"a": [0, 1], "b": [1, 0]}, [0, 1], {"a": True, "z": False})
    with pytest.raises(TypeError, match=r"higher_means_wrong\['a'\] must be True or False"):
        selective_summary({"a": [0, 1]}, [0, 1], {"a": "right"})


def test_malformed_signals_are_refused():
    with pytest.raises(ValueError, match="one-dimensional"):
        auroc([[0.1, 0.2]], [0, 1])
    with pytest.raises(ValueError, match="must be a 1-D sequence of numbers"):
        auroc(["high", "low"], [0, 1])
