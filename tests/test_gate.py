"""`vrp-eval check`: policy bounds (point / CI), policy errors, the baseline comparison (paired and
unpaired bootstrap), the exit codes, the Markdown summary and the JUnit file.

Hand-built results and run folders give decisions known in advance; one real tiny-llava run checks that
the recomputed metrics are the run's own and that a run against itself shows no difference at all.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from vrp_eval import cli, gate
from vrp_eval.calibration import calibration_summary
from vrp_eval.results import build_results, read_results, write_results
from vrp_eval.statistics import causal_drop_summary

CONFIG = {"model_name": "org/model", "model_sha": "unknown", "model_dtype": "float32", "vrp_eval_version": "0.1.0",
          "dataset": "vrp-synth", "split": "validation", "probe": {"n_bins": 15, "seed": 0}}
METRICS = {"accuracy": 0.8, "n_samples": 100, "ece": 0.09, "ece_ci_low": 0.06, "ece_ci_high": 0.13,
           "attn_conf_r": 0.30, "attn_conf_r_ci_low": 0.10, "attn_conf_r_ci_high": 0.48,
           "causal_acc_drop": -0.30, "causal_acc_drop_ci_low": -0.45, "causal_acc_drop_ci_high": -0.15,
           "circuit_layers": [4, 5], "integration_layer": 5}


def results_obj(task: str = "vrp_synth", **changes) -> dict:
    return build_results(config=CONFIG, task=task, metrics={**METRICS, **changes})


def policy(*bounds: dict, **extra) -> gate.Policy:
    return gate.parse_policy({"bounds": list(bounds), **extra})


def bound(metric: str, op: str, value: float, decide: str = "point") -> dict:
    return {"metric": metric, "op": op, "value": value, "decide": decide}


# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "passed"), [
    (bound("ece", "<=", 0.10), True),            # 0.09 <= 0.10
    (bound("ece", "<=", 0.08), False),           # the point 0.09 is past 0.08 ...
    (bound("ece", "<=", 0.08, "ci"), True),      # ... but the CI [0.06, 0.13] reaches it
    (bound("ece", "<=", 0.05, "ci"), False),     # the whole CI is above 0.05
    (bound("ece", "<=", 0.06, "ci"), True),      # the CI's low end on the bound: it holds
    (bound("ece", "<", 0.06, "ci"), False),      # ... but not strictly
    (bound("ece", "<", 0.09), False),            # equality fails a strict bound
    (bound("accuracy", ">=", 0.8), True),
    (bound("accuracy", ">", 0.8), False),
    (bound("attn_conf_r", ">=", 0.4), False),    # point 0.30 below 0.4
    (bound("attn_conf_r", ">=", 0.4, "ci"), True),   # CI high end 0.48 reaches 0.4
    (bound("attn_conf_r", ">=", 0.5, "ci"), False),  # the whole CI is below 0.5
    (bound("causal_acc_drop", "<=", -0.2), True),
    (bound("causal_acc_drop", "<=", -0.2, "ci"), True),   # CI low end -0.45 <= -0.2
    (bound("causal_acc_drop", "<=", -0.5, "ci"), False),  # the whole CI is above -0.5
    (bound("integration_layer", "<=", 4), False),
])
def test_a_bound_passes_or_fails_as_decided(rule, passed):
    [result] = gate.check_bounds(results_obj(), policy(rule))
    assert result.passed is passed, result.reason


def test_a_metric_that_could_not_be_computed_fails_its_bound():
    [point, ci] = gate.check_bounds(results_obj(ece=float("nan"), ece_ci_low=float("nan")),
                                    policy(bound("ece", "<=", 1.0), bound("ece", "<=", 1.0, "ci")))
    assert not point.passed and "could not be computed" in point.reason
    assert not ci.passed


def test_the_policy_applies_to_every_task_or_the_one_it_names():
    two = results_obj("task_a")
    two["results"]["task_b"] = {**METRICS, "ece": 0.2, "ece_ci_low": 0.15, "ece_ci_high": 0.25}
    rule = bound("ece", "<=", 0.1)
    every = gate.check_bounds(two, policy(rule))
    assert [(c.task, c.passed) for c in every] == [("task_a", True), ("task_b", False)]
    [only_a] = gate.check_bounds(two, policy(rule, task="task_a"))
    assert (only_a.task, only_a.passed) == ("task_a", True)
    assert [c.task for c in gate.check_bounds(two, policy(rule, task=["task_b", "task_a"]))] == ["task_b", "task_a"]
    with pytest.raises(gate.PolicyError, match="names 'task_c'.*it has task_a, task_b"):
        gate.check_bounds(two, policy(rule, task="task_c"))


@pytest.mark.parametrize(("text", "message"), [
    ("bounds:\n  - {metric: eec, op: '<=', value: 0.1}\n", r"`bounds\[0\].metric` is 'eec'.*did you mean 'ece'"),
    ("bounds:\n  - {metric: causal_drop, op: '<=', value: 0.1}\n", "did you mean 'causal_acc_drop'"),
    ("bounds:\n  - {metric: ece, op: '=<', value: 0.1}\n", r"`bounds\[0\].op` is '=<'; use one of <=, <, >=, >"),
    ("bounds:\n  - {metric: ece, op: '<=', value: low}\n", r"`bounds\[0\].value` is 'low', not a finite number"),
    ("bounds:\n  - {metric: ece, op: '<=', value: .nan}\n", "not a finite number"),
    ("bounds:\n  - {metric: ece, op: '<=', value: true}\n", "not a finite number"),
    ("bounds:\n  - {metric: ece, op: '<='}\n", r"`bounds\[0\].value` is missing"),
    ("bounds:\n  - {metric: accuracy, op: '>=', value: 0.7, decide: ci}\n",
     "accuracy carries no confidence interval; use decide: point"),
    ("bounds:\n  - {metric: ece, op: '<=', value: 0.1, decide: always}\n", r"`bounds\[0\].decide` is 'always'"),
    ("bounds:\n  - {metric: ece, op: '<=', value: 0.1, side: low}\n", r"`bounds\[0\].side` is not a bound field"),
    ("bounds:\n  - {metric: circuit_layers, op: '<=', value: 3}\n", "a layer range"),
    ("bound:\n  - {metric: ece, op: '<=', value: 0.1}\n", "`bound` is not a policy field"),
    ("task: vrp_synth\n", "`bounds` is missing"),
    ("bounds:\n  - {metric: ece, op: '<=', value: 0.1\n", r"not valid YAML at line \d+, column \d+"),
    ("- just a list\n", "a policy is a mapping"),
])
def test_a_bad_policy_is_refused_naming_the_field_and_the_fix(tmp_path, text, message):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(gate.PolicyError, match=message) as error:
        gate.load_policy(path)
    assert str(path) in str(error.value)


def test_a_bound_on_a_metric_the_results_do_not_hold_is_refused():
    partial = results_obj()
    del partial["results"]["vrp_synth"]["causal_acc_drop"]
    with pytest.raises(gate.PolicyError, match="has no metric 'causal_acc_drop'.*--signals"):
        gate.check_bounds(partial, policy(bound("causal_acc_drop", "<=", -0.2)))
    no_ci = results_obj()
    del no_ci["results"]["vrp_synth"]["ece_ci_low"]
    with pytest.raises(gate.PolicyError, match="has no ece_ci_low / ece_ci_high.*decide: point"):
        gate.check_bounds(no_ci, policy(bound("ece", "<=", 0.1, "ci")))


# --------------------------------------------------------------------------------------------
# Summary and JUnit
# --------------------------------------------------------------------------------------------

def test_junit_has_one_testcase_per_bound_and_a_failure_for_each_failing_one(tmp_path):
    two = results_obj("task_a")
    two["results"]["task_b"] = {**METRICS, "ece": 0.2, "ece_ci_low": 0.15, "ece_ci_high": 0.25}
    report = gate.check(two, {"bounds": [bound("ece", "<=", 0.1), bound("accuracy", ">=", 0.9),
                                         bound("ece", "<=", 0.1, "ci")]})
    # task_a: ece passes, accuracy 0.8 fails, ece CI [0.06, 0.13] passes; task_b: 0.2 fails, accuracy fails,
    # CI [0.15, 0.25] fails.
    assert [c.passed for c in report.bounds] == [True, False, True, False, False, False]
    root = ElementTree.fromstring(report.to_junit())
    assert root.tag == "testsuites"
    [suite] = root.findall("testsuite")
    cases = suite.findall("testcase")
    failures = [c for c in cases if c.find("failure") is not None]
    assert (len(cases), len(failures)) == (6, 4)
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("6", "4", "0")
    assert (root.get("tests"), root.get("failures")) == ("6", "4")
    assert {c.get("classname") for c in cases} == {"vrp_eval.gate.task_a", "vrp_eval.gate.task_b"}
    assert cases[0].get("name") == "ece <= 0.1 (point)"
    assert failures[0].find("failure").get("message") == "accuracy = 0.8 is past the bound 0.9"
    markdown = report.to_markdown()
    assert markdown.startswith("## vrp-eval gate FAILED: org/model")
    assert markdown.count("| **FAIL** |") == 4 and markdown.count("| pass |") == 2


def test_the_summary_is_appended_to_the_github_step_summary(tmp_path, monkeypatch):
    step = tmp_path / "step_summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    report = gate.check(results_obj(), {"bounds": [bound("ece", "<=", 0.1)]})
    report.write(summary=tmp_path / "s.md", junit=tmp_path / "j.xml")
    report.write()
    assert step.read_text() == "earlier step\n" + 2 * (report.to_markdown() + "\n")
    assert (tmp_path / "s.md").read_text() == report.to_markdown()
    ElementTree.parse(tmp_path / "j.xml")


# --------------------------------------------------------------------------------------------
# Exit codes through the real command line
# --------------------------------------------------------------------------------------------

@pytest.fixture
def results_file(tmp_path) -> Path:
    return write_results(results_obj(), tmp_path / "run" / "results.json")


def write_policy(tmp_path: Path, *rules: dict) -> Path:
    import yaml

    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"bounds": list(rules)}))
    return path


def test_exit_codes(tmp_path, results_file, capsys):
    passing = write_policy(tmp_path, bound("ece", "<=", 0.1, "ci"), bound("accuracy", ">=", 0.7))
    assert cli.main(["check", str(results_file), "--policy", str(passing)]) == 0
    failing = write_policy(tmp_path, bound("ece", "<=", 0.05, "ci"))
    junit = tmp_path / "junit.xml"
    assert cli.main(["check", str(results_file.parent), "--policy", str(failing), "--junit", str(junit)]) == 1
    assert "FAILED vrp_synth: ece <= 0.05 (ci)" in capsys.readouterr().out
    assert len(list(ElementTree.parse(junit).getroot().iter("failure"))) == 1
    bad = write_policy(tmp_path, bound("eec", "<=", 0.05))
    assert cli.main(["check", str(results_file), "--policy", str(bad)]) == 2
    assert "did you mean 'ece'" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert cli.main(["check", str(broken), "--policy", str(passing)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert cli.main(["check", str(tmp_path / "nowhere"), "--policy", str(passing)]) == 2
    assert cli.main(["check", str(results_file)]) == 2
    assert "nothing to check" in capsys.readouterr().err


def test_exit_codes_of_the_installed_command(tmp_path, results_file):
    """The console script itself (not only cli.main) exits 0 / 1 / 2."""
    exe = Path(sys.executable).parent / "vrp-eval"
    codes = []
    for rules in ([bound("ece", "<=", 0.1)], [bound("ece", "<=", 0.01)], [bound("ece", "~", 0.1)]):
        done = subprocess.run([str(exe), "check", str(results_file), "--policy", str(write_policy(tmp_path, *rules))],
                              capture_output=True, text=True, check=False)
        codes.append(done.returncode)
    assert codes == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Baseline comparison on hand-built run folders
# --------------------------------------------------------------------------------------------

def write_run(folder: Path, confidences, scores, *, ids=None, sharpness=None, corrupted=None, dataset="vrp-synth",
              shuffle: int | None = None) -> Path:
    """A run folder as `vrp-eval run` lays it out: results.json with the aggregate, samples.jsonl with the
    per-sample fields the comparison reads; `shuffle` writes the samples in another order."""
    n = len(confidences)
    ids = list(range(n)) if ids is None else list(ids)
    metrics = {"accuracy": float(np.mean(scores)), "mean_confidence": float(np.mean(confidences))}
    summary = calibration_summary(confidences, scores, n_bootstrap=200)
    summary.pop("bins")
    metrics.update(summary)
    rows = [{"question_id": ids[i], "confidence": float(confidences[i]), "score": float(scores[i]),
             "sharpness": None if sharpness is None else float(sharpness[i]),
             "corrupted_score": None if corrupted is None or i % 2 else float(corrupted[i]),
             "control_score": None if corrupted is None or i % 2 else float(scores[i])} for i in range(n)]
    if corrupted is not None:
        held = [r for r in rows if r["corrupted_score"] is not None]
        metrics.update(causal_drop_summary([r["score"] for r in held], [r["corrupted_score"] for r in held],
                                           n_bootstrap=200))
    if shuffle is not None:
        rows = [rows[i] for i in np.random.default_rng(shuffle).permutation(n)]
    config = {**CONFIG, "dataset": dataset}
    write_results(build_results(config=config, task="vrp_synth", metrics=metrics), folder / "results.json")
    (folder / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def oracle_ece(c: np.ndarray, a: np.ndarray, n_bins: int = 15) -> float:
    """ECE written out bin by bin: (lo, hi] bins, confidence 0 in the first (calibration.py's convention)."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = [(ci, ai) for ci, ai in zip(c, a) if (lo < ci <= hi) or (b == 0 and ci == 0.0)]
        if inside:
            total += abs(sum(ci for ci, _ in inside) - sum(ai for _, ai in inside)) / len(c)
    return total


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A well-calibrated baseline and a run whose wrong answers got 0.35 more confident (worse ECE), on the
    same 60 samples; the run's samples.jsonl is written in another order."""
    rng = np.random.default_rng(7)
    n = 60
    confidences = rng.uniform(0.3, 0.95, n)
    scores = (rng.uniform(size=n) < confidences).astype(float)
    worse = np.where(scores == 0.0, np.minimum(1.0, confidences + 0.35), confidences)
    root = tmp_path_factory.mktemp("planted")
    baseline = write_run(root / "baseline", confidences, scores)
    run = write_run(root / "run", worse, scores, shuffle=3)
    return run, baseline, confidences, worse, scores


def test_paired_bootstrap_ci_matches_an_independent_computation(planted):
    run, baseline, confidences, worse, scores = planted
    n_bootstrap, seed = 300, 5
    result = gate.regression(run, baseline, n_bootstrap=n_bootstrap, seed=seed)
    assert result.paired
    by_name = {d.metric: d for d in result.differences}
    # The oracle: the same resampled rows for both runs (statistics.bootstrap_ci's documented draw,
    # default_rng(seed).integers(0, n, (n_bootstrap, n)) for a chunk this small), ECE written out by hand.
    rows = np.random.default_rng(seed).integers(0, len(scores), size=(n_bootstrap, len(scores)))
    differences = [oracle_ece(worse[r], scores[r]) - oracle_ece(confidences[r], scores[r]) for r in rows]
    low, high = np.percentile(differences, [2.5, 97.5])
    ece = by_name["ece"]
    # 1e-12: the two ECEs sum the same numbers in another order (bincount vs a loop); float64 rounding only.
    assert ece.difference == pytest.approx(oracle_ece(worse, scores) - oracle_ece(confidences, scores), abs=1e-12)
    assert (ece.ci_low, ece.ci_high) == pytest.approx((low, high), abs=1e-12)
    assert ece.decision == "worse" and ece.gates and not ece.passed
    # Scores are identical, so the paired accuracy difference is 0 in every resample, exactly.
    accuracy = by_name["accuracy"]
    assert (accuracy.difference, accuracy.ci_low, accuracy.ci_high) == (0.0, 0.0, 0.0)
    assert accuracy.decision == "no detectable difference"


def test_planted_worse_ece_fails_the_gate_and_exits_1(planted, tmp_path, capsys):
    run, baseline, *_ = planted
    junit = tmp_path / "junit.xml"
    code = cli.main(["check", str(run), "--baseline", str(baseline), "--junit", str(junit), "--n-bootstrap", "200"])
    assert code == 1
    out = capsys.readouterr().out
    assert "FAILED ece got worse than the baseline" in out
    root = ElementTree.parse(junit).getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"ece not worse than the baseline", "accuracy not worse than the baseline"}
    assert cases["ece not worse than the baseline"].find("failure") is not None
    assert cases["accuracy not worse than the baseline"].find("failure") is None
    # Gating on accuracy alone, the worse calibration is reported but passes.
    assert cli.main(["check", str(run), "--baseline", str(baseline), "--regression-metrics", "accuracy",
                     "--n-bootstrap", "200"]) == 0
    # The baseline against the run: ECE got better, which never fails.
    assert cli.main(["check", str(baseline), "--baseline", str(run), "--n-bootstrap", "200"]) == 0
    assert "| ece | 0.0" in capsys.readouterr().out


def test_a_run_against_itself_in_another_order_shows_exactly_no_difference(planted):
    run, *_ = planted
    again = gate.regression(run, run, n_bootstrap=200)
    assert again.paired and again.passed
    assert all((d.difference, d.ci_low, d.ci_high) == (0.0, 0.0, 0.0) for d in again.differences)
    assert {d.decision for d in again.differences} == {"no detectable difference"}


def test_runs_on_different_samples_are_compared_unpaired_and_say_so(tmp_path):
    rng = np.random.default_rng(11)
    n = 60
    confidences = rng.uniform(0.3, 0.95, n)
    scores = (rng.uniform(size=n) < confidences).astype(float)
    worse = np.where(scores == 0.0, np.minimum(1.0, confidences + 0.35), confidences)
    baseline = write_run(tmp_path / "b", confidences, scores)
    run = write_run(tmp_path / "r", worse, scores, ids=range(100, 100 + n))
    result = gate.regression(run, baseline, n_bootstrap=300, seed=2)
    assert not result.paired
    assert result.notes[0].startswith("unpaired: the runs scored different samples (60, baseline 60; 0 question ids "
                                      "shared)")
    by_name = {d.metric: d for d in result.differences}
    # Unpaired, identical scores no longer give a zero-width accuracy CI: the two resamples differ.
    assert by_name["accuracy"].difference == 0.0
    assert by_name["accuracy"].ci_low < 0.0 < by_name["accuracy"].ci_high
    # The independent resamples widen the ECE interval against the paired one on the same numbers.
    paired = gate.regression(write_run(tmp_path / "r2", worse, scores), baseline, n_bootstrap=300, seed=2)
    paired_ece = {d.metric: d for d in paired.differences}["ece"]
    assert by_name["ece"].difference == pytest.approx(paired_ece.difference, abs=1e-12)  # float rounding only
    assert by_name["ece"].ci_high - by_name["ece"].ci_low > paired_ece.ci_high - paired_ece.ci_low
    other = write_run(tmp_path / "d", confidences, scores, dataset="another")
    assert "different datasets ('vrp-synth', baseline 'another')" in gate.regression(
        baseline, other, n_bootstrap=50).notes[0]


def test_baseline_errors(tmp_path, planted, capsys):
    run, baseline, *_ = planted
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "results.json").write_text((baseline / "results.json").read_text())
    assert cli.main(["check", str(run), "--baseline", str(bare)]) == 2
    assert "has no samples.jsonl beside it" in capsys.readouterr().err
    assert cli.main(["check", str(run), "--baseline", str(baseline), "--regression-metrics", "eec"]) == 2
    assert "did you mean 'ece'" in capsys.readouterr().err
    # attention was not recorded in these runs, so its correlation cannot gate.
    assert cli.main(["check", str(run), "--baseline", str(baseline), "--regression-metrics", "attn_conf_r"]) == 2
    assert "not reported by both runs" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# A real run
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("real") / "run"
    done = subprocess.run([str(Path(sys.executable).parent / "vrp-eval"), "run", "--limit", "24", "--n-bootstrap",
                           "200", "--output", str(folder)], capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_a_real_run_recomputes_its_own_metrics_and_equals_itself(real_run, tmp_path):
    reported = read_results(real_run / "results.json")["results"]["vrp_synth"]
    result = gate.regression(real_run, real_run, gate_metrics=("ece", "accuracy", "attn_conf_r", "causal_acc_drop"),
                             n_bootstrap=200)
    by_name = {d.metric: d for d in result.differences}
    assert {"accuracy", "ece", "mce", "ace", "brier", "attn_conf_r", "causal_acc_drop"} <= set(by_name)
    for name, difference in by_name.items():
        # 1e-12: recomputed from samples.jsonl by the same functions the run's aggregation called; the JSON
        # round trip of float64 is exact, so only summation order could differ.
        assert difference.run == pytest.approx(reported[name], abs=1e-12), name
        assert (difference.difference, difference.ci_low, difference.ci_high) == (0.0, 0.0, 0.0), name
        assert difference.decision == "no detectable difference", name
    policy_path = write_policy(tmp_path, bound("ece", "<=", 1.0, "ci"), bound("accuracy", ">=", 0.0),
                               bound("causal_acc_drop", "<=", 1.0, "ci"))
    assert cli.main(["check", str(real_run), "--policy", str(policy_path), "--baseline", str(real_run),
                     "--n-bootstrap", "100"]) == 0
    assert math.isfinite(reported["ece"])
