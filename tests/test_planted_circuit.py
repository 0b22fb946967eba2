"""The engine finds a circuit planted by construction (tests/assets/planted_circuit.py).

In the planted tiny LLaVA every attention output projection outside decoder layers 4-5 is zero, so
image information can reach the answer only through attention in layers 4 and 5; training with
random single-layer knockouts makes each of the two layers carry the colour on its own. A correct
engine must therefore return exactly (4, 5): a knockout window covering only one of them leaves the
answer intact, and windows away from them change nothing at all (provably: knocked-out attention
there writes nothing). Corrupting the image states that the circuit reads must hurt; the control
window after it (6, 7) cannot change a single answer.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vrp_eval import statistics
from vrp_eval.attention import SharpnessRecorder
from vrp_eval.generation import generate_answers
from vrp_eval.loading import load_model
from vrp_eval.tracing import (
    TraceSettings,
    choose_circuit,
    control_window,
    corrupted_answers,
    estimate_sigma,
    integration_layer,
    knockout_answers,
    knockout_windows,
    trace_batch,
    window_width,
)

ASSETS = Path(__file__).parent / "assets"
sys.path.insert(0, str(ASSETS))
import planted_circuit
from tracing_models import one_thread  # noqa: F401  (an autouse fixture)

N = 48  # 24 discovery + 24 held-out


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    return load_model(str(ASSETS / "planted-llava"), device="cpu")


@pytest.fixture(scope="module")
def halves(loaded):
    adapter = loaded.adapter
    data = planted_circuit.examples(N, seed=123)
    prompt = adapter.build_prompt(planted_circuit.QUESTION)

    def encode(part):
        return adapter.encode([image for image, _ in part], [prompt] * len(part)), [c for _, c in part]

    return encode(data[: N // 2]), encode(data[N // 2:])


def score(answers, gold):
    return [float(a.text == g) for a, g in zip(answers, gold)]


def test_the_construction_holds(loaded):
    first, last = planted_circuit.CIRCUIT
    for index, layer in enumerate(loaded.adapter.decoder_layers):
        weight = layer.self_attn.o_proj.weight
        assert bool((weight == 0).all()) == (not first <= index <= last), index


def test_engine_returns_the_planted_window_and_its_causal_drop(loaded, halves):
    (discovery, gold_d), (heldout, gold_h) = halves
    num_layers = loaded.adapter.num_layers
    clean_d = generate_answers(loaded, discovery, max_new_tokens=3)
    assert np.mean(score(clean_d, gold_d)) >= 0.9, "the planted model must use the image"

    windows = knockout_windows(num_layers, window_width(num_layers))
    assert len(windows[0]) == 2 and windows[0] == (0, 1)
    per_window = [knockout_answers(loaded, discovery, w, max_new_tokens=3) for w in windows]
    knockout_scores = np.array([score(a, gold_d) for a in per_window]).T  # (samples, windows)
    circuit = choose_circuit(knockout_scores, windows, clean_scores=score(clean_d, gold_d))
    assert circuit == planted_circuit.CIRCUIT

    curve = knockout_scores.mean(0)
    assert curve[windows.index(circuit)] <= 0.4  # chance is 0.25
    for window, answers, accuracy in zip(windows, per_window, curve):
        if window == circuit:
            continue
        assert accuracy >= 0.9, (window, accuracy)
        if window[1] < circuit[0] or window[0] > circuit[1]:
            assert [a.token_ids for a in answers] == [a.token_ids for a in clean_d], window

    # Held-out half: corrupt the image states the circuit reads, and the same in the control window.
    control = control_window(circuit, num_layers)
    assert control == (6, 7)
    sigma = estimate_sigma(loaded, [discovery])
    clean_h = generate_answers(loaded, heldout, max_new_tokens=3)
    recorder = SharpnessRecorder.for_batch(loaded.adapter, heldout)
    corrupted = corrupted_answers(loaded, heldout, circuit, "gaussian", 3.0, sigma, seed=0,
                                  extra_hooks=[recorder], max_new_tokens=3)
    assert len(recorder.signals()) == len(gold_h)  # the decoupling check's sharpness was recorded
    controlled = corrupted_answers(loaded, heldout, control, "gaussian", 3.0, sigma, seed=0, max_new_tokens=3)
    assert [a.token_ids for a in controlled] == [a.token_ids for a in clean_h]

    clean_scores = score(clean_h, gold_h)
    causal = statistics.causal_drop_summary(clean_scores, score(corrupted, gold_h), n_bootstrap=200)
    control_drop = statistics.causal_drop_summary(clean_scores, score(controlled, gold_h), n_bootstrap=200)
    assert control_drop["causal_acc_drop"] == 0.0
    assert causal["causal_acc_drop"] <= -0.15
    zeroed = corrupted_answers(loaded, heldout, circuit, "zero", 0.0, None, max_new_tokens=3)
    zero_drop = statistics.causal_drop_summary(clean_scores, score(zeroed, gold_h), n_bootstrap=200)
    assert zero_drop["causal_acc_drop"] <= -0.6  # ablating the image states leaves chance


def test_trace_of_the_planted_model(loaded, halves):
    """Restoring the image positions helps only before the circuit has read them (layers <= 4), the
    last position only once it has (layers >= 4); they cross at layer 5."""
    (discovery, _), _ = halves
    batch = {k: v[:8] for k, v in discovery.items()}
    targets = [a.first_token_id for a in generate_answers(loaded, batch, max_new_tokens=1)]
    sigma = estimate_sigma(loaded, [discovery])
    results = trace_batch(loaded, batch, targets, TraceSettings(n_noise=3, seed=0), sigma)
    ie = {g: np.mean([r.ie[g] for r in results], 0) for g in ("image", "text", "last")}
    gap = np.mean([r.p_clean - r.p_corrupted for r in results])
    assert gap > 0.05
    # Exact in real arithmetic (zero o_proj outside the circuit); what is left is float32 round-off of
    # probabilities near 0.99 (ulp 6e-8) from differently batched restoration runs: measured <= 1 ulp
    # per sample and <= 1.1e-8 on these means. 1e-6 is ~16 ulp, 1e5 below the gap.
    np.testing.assert_allclose(ie["image"][5:], 0, atol=1e-6)  # nothing reads the image after layer 5
    np.testing.assert_allclose(ie["last"][:4], 0, atol=1e-6)  # the last position holds no image yet
    np.testing.assert_allclose(ie["image"][:4], gap, atol=1e-6)  # full recovery before the circuit
    np.testing.assert_allclose(ie["last"][5:], gap, atol=1e-6)  # full recovery after it
    assert integration_layer(ie["last"], ie["image"]) == 5


@pytest.mark.slow
def test_trained_tiny_llava_shows_a_real_effect():
    """On the trained zoo tiny-llava (vrp-synth validation, 128 discovery + 128 held-out samples).

    What the curves look like (weights of 24 Nov, fourth stage, val exact match 0.82): clean accuracy
    0.84 on the discovery half, 0.42 with image attention knocked out in all 8 layers (many synthetic
    questions are partly guessable from the text). No single width-2 window removes the image:
    knockout accuracies lie between 0.66 and 0.80, lowest at layers 4-5, because the question tokens
    read the image redundantly over several layers. Corrupting the image states read from layer 4 on
    drops held-out accuracy by 12%, the control window (6-7) by 1%: early corruption hurts most (it
    reaches every later reader), late corruption little (few readers are left). Over 64 traced
    samples the IE curves cross at layer 5: image IE falls from 0.24 at layer 0 to exactly 0 at
    layer 7 (nothing reads the image states after the last layer), last-position IE rises from 0.00
    to the full clean-corrupted gap (0.24) at layer 7 (restoring the last layer's last position
    restores the output). On 16 samples the curves are noisier.
    """
    from vrp_eval.adapters import DEFAULT_POST_PROMPT
    from vrp_eval.data import load_examples, load_image
    from vrp_eval.probe import score_answer
    from vrp_eval.zoo import zoo_path

    if not (zoo_path("tiny-llava") / "config.json").exists():
        pytest.skip("the zoo tiny-llava is not built (vrp-eval train-tiny --family llava)")
    loaded = load_model("tiny-llava", device="cpu")
    adapter = loaded.adapter
    examples = load_examples("vrp-synth", "validation", limit=256)

    def encode(part):
        return adapter.encode([load_image(e) for e in part],
                              [adapter.build_prompt(e.prompt_text(DEFAULT_POST_PROMPT)) for e in part])

    def scores(part, answers):
        return [score_answer(e, a.text) for e, a in zip(part, answers)]

    discovery, heldout = examples[:128], examples[128:]
    batch_d, batch_h = encode(discovery), encode(heldout)
    clean_d = scores(discovery, generate_answers(loaded, batch_d))
    num_layers = adapter.num_layers
    blind = np.mean(scores(discovery, knockout_answers(loaded, batch_d, (0, num_layers - 1))))
    assert blind <= np.mean(clean_d) - 0.1, "the model must use the image"
    windows = knockout_windows(num_layers, window_width(num_layers))
    knock = np.array([scores(discovery, knockout_answers(loaded, batch_d, w)) for w in windows]).T
    circuit = choose_circuit(knock, windows, clean_scores=clean_d)
    curve = knock.mean(0)
    assert curve.min() <= np.mean(clean_d) - 0.05 and curve.min() >= blind - 0.05, curve

    control = control_window(circuit, num_layers)
    sigma = estimate_sigma(loaded, [batch_d])
    clean_h = scores(heldout, generate_answers(loaded, batch_h))
    corrupted = scores(heldout, corrupted_answers(loaded, batch_h, circuit, "gaussian", 3.0, sigma))
    controlled = scores(heldout, corrupted_answers(loaded, batch_h, control, "gaussian", 3.0, sigma))
    causal = statistics.causal_drop_summary(clean_h, corrupted, n_bootstrap=200)["causal_acc_drop"]
    control_drop = statistics.causal_drop_summary(clean_h, controlled, n_bootstrap=200)["causal_acc_drop"]
    assert causal <= -0.08 and causal < control_drop - 0.05, (circuit, control, causal, control_drop, curve)

    sub = {k: v[:64] for k, v in batch_d.items()}
    targets = [a.first_token_id for a in generate_answers(loaded, sub, max_new_tokens=1)]
    traces = trace_batch(loaded, sub, targets, TraceSettings(n_noise=3), sigma)
    image = np.mean([t.ie["image"] for t in traces], 0)
    last = np.mean([t.ie["last"] for t in traces], 0)
    gap = np.mean([t.p_clean - t.p_corrupted for t in traces])
    # Exact by construction: the last layer's image states are read by nothing, and restoring the
    # last layer's output at the last position restores the clean prediction. Up to float32 round-off
    # of probabilities from differently batched runs: measured image 0 exactly, last - gap <= 9e-8
    # per sample (~1 ulp) and 3e-9 on the mean of 64; 1e-6 leaves 10x on a single sample.
    assert abs(image[-1]) < 1e-6 and last[-1] == pytest.approx(gap, abs=1e-6)
    assert image[0] > 0.05 and image[0] > image[-1] + 0.05 and last[-1] > last[0] + 0.05
    assert integration_layer(last, image) is not None
