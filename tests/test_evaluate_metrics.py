"""The `evaluate` modules in metrics/: loaded offline by path, equal to the vrp_eval core, combinable,
with Space cards, app.py and docstring examples that run as doctests."""
import doctest
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

evaluate = pytest.importorskip("evaluate")

from vrp_eval.calibration import calibration_summary
from vrp_eval.statistics import (
    attention_confidence_summary,
    causal_drop_summary,
)
from vrp_eval.vqa import vqa_accuracy

REPO = Path(__file__).resolve().parents[1]
METRICS = REPO / "metrics"
NAMES = ["vrp_ece", "vrp_attention_confidence", "vrp_causal_drop", "vrp_vqa_accuracy"]


@pytest.fixture(scope="module")
def modules():
    return {name: evaluate.load(str(METRICS / name)) for name in NAMES}


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(21)
    sharpness = rng.uniform(size=60)
    conf = np.clip(0.2 + 0.7 * sharpness + rng.normal(0, 0.1, 60), 0, 1)
    score = (rng.uniform(size=60) < conf - 0.2).astype(float)
    return sharpness.tolist(), conf.tolist(), score.tolist()


def _same(a, b):
    """Equal results, NaN equal to NaN, lists of dicts compared element-wise."""
    assert set(a) == set(b)
    for key in a:
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            # Exact by construction: the modules call the same core functions on float64 Arrow
            # columns, which hold Python floats bit for bit (measured: identical).
            assert a[key] == b[key], key


def test_modules_load_offline_by_path(modules):
    for name, module in modules.items():
        assert module.name == name
        assert isinstance(module, evaluate.Metric)


def test_vrp_ece_equals_the_core_including_bins(modules, samples):
    _, conf, score = samples
    result = modules["vrp_ece"].compute(confidences=conf, scores=score, n_bins=10, n_bootstrap=200, seed=4)
    _same(result, calibration_summary(conf, score, n_bins=10, n_bootstrap=200, seed=4))
    assert len(result["bins"]) == 10 and all(isinstance(b, dict) for b in result["bins"])
    assert result["ece_ci_low"] < result["ece"] < result["ece_ci_high"]


def test_vrp_ece_rejects_bad_input_and_unknown_options(modules):
    with pytest.raises(ValueError, match=r"confidences must lie in \[0, 1\]"):
        modules["vrp_ece"].compute(confidences=[0.5, 1.5], scores=[1, 0])
    with pytest.raises(TypeError, match="n_bin"):
        modules["vrp_ece"].compute(confidences=[0.5, 0.7], scores=[1, 0], n_bin=10)


def test_vrp_attention_confidence_equals_the_core(modules, samples):
    sharpness, conf, score = samples
    result = modules["vrp_attention_confidence"].compute(sharpness=sharpness, confidences=conf, scores=score)
    assert len(result) == 15
    _same(result, attention_confidence_summary(sharpness, conf, score))
    assert result["attn_conf_r"] > 0.7


def test_vrp_causal_drop_equals_the_core(modules, samples):
    _, _, score = samples
    corrupted = [s * (i % 2) for i, s in enumerate(score)]
    result = modules["vrp_causal_drop"].compute(clean_scores=score, corrupted_scores=corrupted, n_bootstrap=300)
    _same(result, causal_drop_summary(score, corrupted, n_bootstrap=300))
    assert set(result) == {
        "causal_acc_drop", "causal_acc_drop_ci_low", "causal_acc_drop_ci_high", "clean_accuracy", "corrupted_accuracy",
    }


def test_vrp_vqa_accuracy_equals_the_core(modules):
    humans = [["2"] * 2 + ["two dogs"] * 8, ["yes"] * 3 + ["no"] * 7, ["red"] * 10]
    predictions = ["Two dogs!", "Yes", "blue"]
    result = modules["vrp_vqa_accuracy"].compute(predictions=predictions, references=humans)
    expected = sum(vqa_accuracy(p, h) for p, h in zip(predictions, humans)) / 3
    assert result == {"accuracy": expected}  # exact: the module sums the core's scores the same way
    assert expected == pytest.approx((1.0 + 0.9 + 0.0) / 3, abs=1e-12)  # float64 round-off of two means


def test_combine_calibration_and_attention(modules, samples):
    sharpness, conf, score = samples
    combined = evaluate.combine([modules["vrp_ece"], modules["vrp_attention_confidence"]])
    result = combined.compute(sharpness=sharpness, confidences=conf, scores=score)
    expected = {**calibration_summary(conf, score), **attention_confidence_summary(sharpness, conf, score)}
    _same(result, expected)


def test_combine_all_four(modules, samples):
    sharpness, conf, score = samples
    result = evaluate.combine(list(modules.values())).compute(
        sharpness=sharpness, confidences=conf, scores=score,
        clean_scores=score, corrupted_scores=score,
        predictions=["yes"], references=[["yes"] * 10],
        n_bootstrap=50,
    )
    assert result["accuracy"] == 1.0
    assert result["causal_acc_drop"] == 0.0
    assert result["ece"] == calibration_summary(conf, score, n_bootstrap=0)["ece"]  # exact: same core call, same floats
    assert "attn_overconf_r_rho" in result and "bins" in result


@pytest.mark.parametrize("name", NAMES)
def test_docstring_examples_run_as_doctests(name, monkeypatch):
    monkeypatch.chdir(REPO)  # the examples load "metrics/<name>" as a user in the repo would
    module = evaluate.load(str(METRICS / name))
    source = sys.modules[type(module).__module__]
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(source):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted >= 4
    assert results.failed == 0


@pytest.mark.parametrize("name", NAMES)
def test_space_card_and_app(name, monkeypatch):
    folder = METRICS / name
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py"
    assert {"evaluate", "metric"} <= set(header["tags"])
    assert f"# Metric Card for {name}" in text

    launched = []
    monkeypatch.setattr(evaluate.utils, "launch_gradio_widget", launched.append)
    monkeypatch.chdir(folder.parent.parent)  # app.py must not depend on the working directory
    runpy.run_path(str(folder / header["app_file"]), run_name="__main__")
    assert [m.name for m in launched] == [name]


@pytest.mark.parametrize("name", NAMES)
def test_module_file_follows_the_loader_rules(name):
    source = (METRICS / name / f"{name}.py").read_text(encoding="utf-8")
    assert "import evaluate\n" in source and "(evaluate.Metric):" in source
    assert "from evaluate import" not in source
    assert "from vrp_eval." in source  # the maths comes from the core, never a copy
    for line in source.splitlines():
        if line.startswith("import "):
            assert "," not in line, line
