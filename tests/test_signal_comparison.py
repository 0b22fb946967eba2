"""Issue 16, section 1: which reliability signal predicts errors.

Oracles: hand-computed concentrations; a finite-difference directional derivative for the gradient
saliency (float64); sklearn's roc_auc_score and scipy's spearmanr for the table; a planted probe
layer for the probing classifier; and the probe's own engine counter for the cost column.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import MISSING, fields

import numpy as np
import pytest
import torch

from vrp_eval.records import SampleRecord
from vrp_eval.results import ResultsError, validate_results
from vrp_eval.saliency import concentration
from vrp_eval.signal_comparison import (
    SIGNAL_NAMES,
    compare_signals,
    fit_probe,
    format_signal_table,
)


def _record(i: int, score: float, confidence: float, half: str, **extra) -> SampleRecord:
    required = {f.name: None for f in fields(SampleRecord) if f.default is MISSING and f.default_factory is MISSING}
    given = {"question_id": i, "question": "q", "answer": "a", "score": score, "confidence": confidence,
             "confidence_product": confidence, "confidence_first_token": confidence,
             "confidence_length_norm": confidence, "token_probs": [confidence], "reference": "a", "kind": "vqa",
             "half": half}
    return SampleRecord(**{**required, **given, **extra})


# --------------------------------------------------------------------------- saliency


def test_concentration_by_hand():
    # Uniform: H = log n, so 0; one token: H = 0, so 1; two of four equal: 1 - log 2 / log 4 = 1/2.
    # Float64 logs of a handful of values: round-off ~1e-16.
    assert concentration(torch.ones(4)) == pytest.approx(0.0, abs=1e-12)
    assert concentration(torch.tensor([0.0, 3.0, 0.0])) == pytest.approx(1.0, abs=1e-12)
    assert concentration(torch.tensor([2.0, 2.0, 0.0, 0.0])) == pytest.approx(0.5, abs=1e-12)
    assert concentration(torch.zeros(5)) is None  # no gradient at all: undefined, not "uniform"
    assert concentration(torch.ones(1)) is None  # one token cannot be more or less concentrated


@pytest.fixture(scope="module")
def llava64():
    from vrp_eval import load_model

    loaded = load_model("tiny-llava")
    loaded.model.to(torch.float64)
    return loaded


def test_saliency_is_input_times_gradient_over_the_image_tokens(llava64):
    """`total` = sum over image tokens of |e_i . grad_i|, and e_i . grad_i is the derivative of
    log p(t*) along e_i alone: a central finite difference in float64 is the oracle, token by token."""
    from vrp_eval.data import load_examples
    from vrp_eval.generation import generate_answers
    from vrp_eval.hooks import HookScope
    from vrp_eval.probe import ProbeSettings, _encode
    from vrp_eval.saliency import gradient_saliency

    loaded = llava64
    examples = load_examples("vrp-synth", "validation", 3)
    batch = _encode(loaded, examples, ProbeSettings())
    targets = [o.first_token_id for o in generate_answers(loaded, batch, max_new_tokens=2)]
    (sal,) = gradient_saliency(loaded, loaded.adapter.select_rows(batch, [1]), [targets[1]])
    single = loaded.adapter.select_rows(batch, [1])
    image = loaded.adapter.position_groups(single["input_ids"], single["attention_mask"])["image"][0]
    positions = image.nonzero().flatten().tolist()
    assert sal.n_image_tokens == len(positions) == 36

    def log_p(position: int, step: float) -> float:
        def scale(embeds):
            out = embeds.clone()
            out[0, position] = embeds[0, position] * (1.0 + step)
            return out

        with torch.no_grad(), HookScope() as scope:
            loaded.adapter.hook_embeddings(scope, scale)
            logits = loaded.model(**loaded.model_inputs(single), logits_to_keep=1, use_cache=False).logits[0, -1]
        return float(torch.log_softmax(logits, -1)[targets[1]])

    step = 1e-2
    weights = torch.tensor([abs(log_p(p, step) - log_p(p, -step)) / (2 * step) for p in positions])
    # The step is 1% of each embedding: the central difference's truncation error is O(step^2) (measured
    # ~0.1% per token), and the parts of the forward that stay float32 (rotary tables) leave ~1e-10 of
    # noise in log p, ~1e-8 after dividing by the step; smaller steps drown in that noise. A 0.5%
    # bound on the sum still catches a gradient taken at the wrong place (wrong group, logits instead
    # of log-probs, the signed sum instead of |.| per token: each >5% off here).
    assert sal.total == pytest.approx(float(weights.sum()), rel=5e-3)
    assert sal.concentration == pytest.approx(concentration(weights), abs=5e-3)  # same 0.5% per weight


def test_saliency_of_a_row_does_not_depend_on_its_batch(llava64):
    from vrp_eval.data import load_examples
    from vrp_eval.generation import generate_answers
    from vrp_eval.probe import ProbeSettings, _encode
    from vrp_eval.saliency import gradient_saliency

    loaded = llava64
    batch = _encode(loaded, load_examples("vrp-synth", "validation", 6), ProbeSettings())
    targets = [o.first_token_id for o in generate_answers(loaded, batch, max_new_tokens=2)]
    together = gradient_saliency(loaded, batch, targets)
    alone = gradient_saliency(loaded, loaded.adapter.select_rows(batch, [4]), [targets[4]])
    # Left padding is masked out, so only round-off differs: float64 model, but the rotary tables stay
    # float32 (~1e-7 relative in the states; measured 2.5e-8 here).
    assert together[4].concentration == pytest.approx(alone[0].concentration, abs=1e-6)
    assert len({round(s.concentration, 6) for s in together}) == 6  # per-sample values, not one batch value
    assert all(p.grad is None for p in loaded.model.parameters())  # no parameter gradient left behind


# --------------------------------------------------------------------------- the probing classifier


def _planted(n: int, layer: int, seed: int = 0, layers: int = 4, width: int = 6):
    """Records whose right / wrong answers are linearly separable at `layer` only (noise elsewhere)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        right = i % 3 != 0
        features = rng.normal(size=(layers, width))
        features[layer, 0] += 3.0 if right else -3.0
        records.append(_record(i, float(right), 0.5, "discovery" if i < n // 2 else "heldout",
                               probe_features=features.tolist()))
    return records


def test_the_probe_finds_the_planted_layer_and_scores_only_held_out_samples():
    from sklearn.metrics import roc_auc_score

    records = _planted(240, layer=2)
    discovery = [r for r in records if r.half == "discovery"]
    heldout = [r for r in records if r.half == "heldout"]
    p_right, info = fit_probe(discovery, heldout, seed=0)
    assert info["layer"] == 2
    assert info["cv_auroc"][2] > 0.95 and max(info["cv_auroc"][:2] + info["cv_auroc"][3:]) < 0.75
    # A 6-sigma gap along one axis: the held-out AUROC is ~1; 0.95 leaves room for the 120-sample fit.
    assert roc_auc_score([r.score for r in heldout], p_right) > 0.95
    # The held-out labels play no part: flipping them changes no prediction.
    flipped = [_record(r.question_id, 1.0 - r.score, 0.5, "heldout", probe_features=r.probe_features)
               for r in heldout]
    again, _ = fit_probe(discovery, flipped, seed=0)
    assert again == p_right


def test_the_probe_needs_both_kinds_of_answer_on_the_discovery_half():
    records = _planted(40, layer=1)
    discovery = [_record(r.question_id, 1.0, 0.5, "discovery", probe_features=r.probe_features)
                 for r in records if r.half == "discovery"]
    p_right, info = fit_probe(discovery, [r for r in records if r.half == "heldout"])
    assert p_right is None and "20 right and 0 wrong" in info["reason"]


# --------------------------------------------------------------------------- the table


def test_the_table_against_sklearn_and_scipy_on_the_held_out_half_only():
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    records = []
    for i in range(200):
        score = float(rng.choice([0.0, 0.3, 0.6, 1.0]))
        confidence = float(np.clip(0.5 + 0.3 * (score - 0.5) + rng.normal(0, 0.2), 0.01, 0.99))
        half = "discovery" if i % 2 else "heldout"
        # On the discovery half the signals say the opposite: if they leaked in, the AUROCs would fall.
        sign = 1.0 if half == "heldout" else -1.0
        records.append(_record(i, score, confidence, half, sharpness=sign * score + rng.normal(0, 0.5),
                               spatial_entropy=-sign * score + rng.normal(0, 0.5), saliency=float(rng.random())))
    table = compare_signals(records, n_bootstrap=200, seed=0)
    heldout = [r for r in records if r.half == "heldout"]
    wrong = [r.score < 0.5 for r in heldout]
    over = [max(0.0, r.confidence - r.score) for r in heldout]
    rows = {row["name"]: row for row in table["signals"]}
    assert list(rows) == ["confidence", "attention_sharpness", "spatial_entropy", "gradient_saliency"]
    assert table["n"] == 100 and table["n_wrong"] == sum(wrong)
    # sklearn's trapezoidal AUROC equals the Mann-Whitney count exactly (ties 1/2): float64 sums of
    # a few thousand halves, round-off ~1e-15.
    for name, values, higher_means_wrong in (
            ("confidence", [r.confidence for r in heldout], False),
            ("attention_sharpness", [r.sharpness for r in heldout], False),
            ("spatial_entropy", [r.spatial_entropy for r in heldout], True)):
        oriented = np.asarray(values) * (1 if higher_means_wrong else -1)
        assert rows[name]["auroc"] == pytest.approx(roc_auc_score(wrong, oriented), abs=1e-12)
        rho = spearmanr(oriented, over).statistic
        assert rows[name]["spearman_overconfidence"] == pytest.approx(rho, abs=1e-12)
        low, high = rows[name]["spearman_overconfidence_ci_low"], rows[name]["spearman_overconfidence_ci_high"]
        assert low < rho < high
    assert rows["attention_sharpness"]["auroc"] > 0.75  # the planted held-out relation, seen
    assert rows["gradient_saliency"]["auroc"] == pytest.approx(0.5, abs=0.15)  # pure noise: n=100 sd ~0.06
    curve = rows["confidence"]["curve"]
    assert curve["coverage"][-1] == 1.0 and len(curve["coverage"]) == 100
    # At full coverage the risk is the held-out mean loss, whatever the order.
    assert curve["risk"][-1] == pytest.approx(1 - np.mean([r.score for r in heldout]), abs=1e-12)
    assert rows["confidence"]["passes"] == 0.0 and rows["attention_sharpness"]["passes"] == 0.0
    text = format_signal_table(table)
    assert "attention sharpness" in text and "misleading" in text and "moderate" in text


def test_a_signal_missing_on_a_held_out_sample_is_left_out_with_a_reason():
    records = [_record(i, float(i % 2), 0.6, "heldout", saliency=None if i == 3 else 0.2 + 0.01 * i)
               for i in range(20)]
    table = compare_signals(records, n_bootstrap=0)
    assert [row["name"] for row in table["signals"]] == ["confidence"]
    assert table["left_out"] == {"gradient_saliency": "undefined on 1 of 20 held-out samples"}
    assert compare_signals(records[:1], n_bootstrap=0) is None


def test_results_validation_rejects_a_malformed_signal_table():
    import copy

    from sample_results import sample_results

    valid = sample_results()[0]
    (task,) = valid["results"]
    table = {"signals": [{"name": "confidence", "higher_means": "right", "auroc": 0.7,
                          "curve": {"coverage": [0.5, 1.0], "risk": [0.1, 0.2]}}]}
    valid.setdefault("details", {}).setdefault(task, {})["signal_comparison"] = table
    validate_results(valid)  # the well-formed table is accepted
    for change, field in ((lambda t: t["signals"][0].update(higher_means="sideways"), "higher_means"),
                          (lambda t: t["signals"][0].update(auroc="high"), "auroc"),
                          (lambda t: t["signals"][0]["curve"].update(risk=[0.1]), "curve")):
        broken = copy.deepcopy(valid)
        change(broken["details"][task]["signal_comparison"])
        with pytest.raises(ResultsError, match=field):
            validate_results(broken)


# --------------------------------------------------------------------------- a real run


@pytest.mark.slow
def test_a_run_reports_the_table_costs_and_the_picture(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "vrp_eval.cli", "run", "--limit", "64", "--output", str(out),
                           "--n-bootstrap", "50"], capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Which signal predicts errors" in done.stdout
    results = json.loads((out / "results.json").read_text())
    (details,) = results["details"].values()
    table = details["signal_comparison"]
    rows = {row["name"]: row for row in table["signals"]}
    defaults = {"confidence", "attention_sharpness", "image_attention_mass", "spatial_entropy",
                "logit_lens_margin", "gradient_saliency", "probing_classifier", "ie_circuit",
                "p_clean_minus_corrupted"}
    assert set(rows) == defaults and set(SIGNAL_NAMES) - defaults == {"self_consistency", "ie_proxy_circuit"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    heldout = [s for s in samples if s["half"] == "heldout"]
    assert table["n"] == len(heldout) > 10
    # Costs beyond answering come from where the work is counted: the engine's own counter for
    # tracing (> 1 pass), 3 for a forward + backward, 0 for the states read from the answer's own
    # prompt pass (the logit lens and the probe).
    assert rows["gradient_saliency"]["passes"] == 3.0
    assert rows["probing_classifier"]["passes"] == rows["logit_lens_margin"]["passes"] == 0.0
    assert rows["ie_circuit"]["passes"] == pytest.approx(np.mean([s["cost"]["tracing"] for s in heldout]), rel=1e-12)
    assert rows["ie_circuit"]["passes"] > 2.0
    assert rows["p_clean_minus_corrupted"]["passes"] == 5.0  # K=5 corrupted prompt passes (the clean one is the answer's)
    assert all(math.isfinite(rows[n]["auroc"]) for n in rows)
    assert 0 <= table["probing"]["layer"] < 8
    assert (out / "risk_coverage.png").stat().st_size > 10_000
