"""Causal tracing (vrp_eval.tracing): the fast restoration sweep against a deliberately naive one.

The oracle is written here with plain PyTorch hooks: one full model forward per (layer, group), the
image-token embeddings entering the language model replaced by their per-sample mean (or zero), and
layer l's output at the group's positions replaced by the clean run's.
"""
import math

import numpy as np
import pytest
import torch
from tracing_models import (  # noqa: F401 (one_thread: an autouse fixture)
    FAMILIES,
    NUM_LAYERS,
    QUESTIONS,
    all_hooks,
    encode,
    images,
    one_thread,
    tiny_loaded,
)

from vrp_eval.generation import generate_answers
from vrp_eval.intervention import estimate_sigma
from vrp_eval.tracing import (
    TraceSettings,
    choose_circuit,
    control_window,
    corrupted_answers,
    integration_layer,
    knockout_windows,
    trace_batch,
)

GROUPS = ("image", "text", "last")


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return tiny_loaded(request.param)


@pytest.fixture(scope="module")
def batch(loaded):
    batch = encode(loaded)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "the batch must be left-padded for these tests"
    return batch


@pytest.fixture(scope="module")
def targets(loaded, batch):
    return [a.first_token_id for a in generate_answers(loaded, batch, max_new_tokens=1)]


@pytest.fixture(scope="module")
def sigma(loaded, batch):
    return estimate_sigma(loaded, [batch])


@torch.no_grad()
def naive_trace(loaded, batch, targets, kind):
    """p_clean, p_corrupted (B,), ie {group: (L, B)} with one plain forward per (layer, group)."""
    adapter, model = loaded.adapter, loaded.model
    inputs = adapter.model_inputs(batch)
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    rows = torch.arange(len(targets))
    target = torch.tensor(targets)

    def p_target():
        return model(**inputs).logits[:, -1].float().softmax(-1)[rows, target]

    clean = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: clean.__setitem__(i, out))
               for i, layer in enumerate(adapter.decoder_layers)]
    p_clean = p_target()
    for handle in handles:
        handle.remove()

    def corrupt(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        for row in range(embeds.shape[0]):
            image = groups["image"][row]
            embeds[row, image] = embeds[row, image].mean(0) if kind == "mean" else 0.0
        return args, {**kwargs, "inputs_embeds": embeds}

    corruption = adapter.language_model.register_forward_pre_hook(corrupt, with_kwargs=True)
    try:
        p_corrupted = p_target()
        ie = {}
        for group in GROUPS:
            values = []
            for layer in range(adapter.num_layers):
                def restore(module, args, out, layer=layer, group=group):
                    return torch.where(groups[group][..., None], clean[layer], out)
                handle = adapter.decoder_layers[layer].register_forward_hook(restore)
                values.append(p_target() - p_corrupted)
                handle.remove()
            ie[group] = torch.stack(values)
    finally:
        corruption.remove()
    return p_clean, p_corrupted, ie


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_ie_equals_naive_implementation(loaded, batch, targets, kind):
    results = trace_batch(loaded, batch, targets, TraceSettings(kind=kind, max_rows=4))
    p_clean, p_corrupted, ie = naive_trace(loaded, batch, targets, kind)
    assert max(float(ie[g].abs().max()) for g in GROUPS) > 0.02, "the oracle's effects are too small to test"
    for row, result in enumerate(results):
        assert result.p_clean == pytest.approx(float(p_clean[row]), abs=1e-6)
        assert result.p_corrupted == pytest.approx(float(p_corrupted[row]), abs=1e-6)
        for group in GROUPS:
            assert len(result.ie[group]) == NUM_LAYERS
            np.testing.assert_allclose(result.ie[group], ie[group][:, row].numpy(), atol=1e-5, rtol=0)


def test_p_clean_is_the_generated_first_token_probability(loaded, batch, targets):
    answers = generate_answers(loaded, batch, max_new_tokens=1)
    results = trace_batch(loaded, batch, targets, TraceSettings(kind="zero", groups=("last",)))
    for answer, result in zip(answers, results):
        assert result.p_clean == pytest.approx(answer.first_token_prob, abs=1e-6)


def test_zero_noise_reproduces_the_clean_run(loaded, batch, targets, sigma):
    results = trace_batch(loaded, batch, targets, TraceSettings(kind="gaussian", scale=0.0, n_noise=2), sigma)
    for result in results:
        assert result.p_corrupted_samples == [result.p_clean] * 2  # bit for bit
        for group in GROUPS:
            assert max(abs(v) for v in result.ie[group]) <= 1e-6
    clean = generate_answers(loaded, batch, max_new_tokens=3)
    corrupted = corrupted_answers(loaded, batch, (1, 2), "gaussian", 0.0, sigma, seed=0, max_new_tokens=3)
    assert [a.token_ids for a in corrupted] == [a.token_ids for a in clean]
    assert [a.token_probs for a in corrupted] == [a.token_probs for a in clean]


def test_gaussian_noise_is_seeded_and_moves_the_probability(loaded, batch, targets, sigma):
    settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=2, seed=5)
    first = trace_batch(loaded, batch, targets, settings, sigma)
    again = trace_batch(loaded, batch, targets, settings, sigma)
    other = trace_batch(loaded, batch, targets, TraceSettings(kind="gaussian", n_noise=2, seed=6), sigma)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in again]
    assert [r.p_corrupted for r in first] != [r.p_corrupted for r in other]
    assert max(abs(r.p_clean - r.p_corrupted) for r in first) > 1e-3
    # Restoring every position's clean state at the last layer gives back the clean probability.
    full = trace_batch(loaded, batch, targets, TraceSettings(kind="gaussian", n_noise=2, seed=5, groups=("all",)), sigma)
    for result in full:
        assert result.ie["all"][-1] == pytest.approx(result.p_clean - result.p_corrupted, abs=1e-5)


def test_batched_left_padded_run_equals_one_at_a_time(loaded, batch, targets, sigma):
    settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=2, seed=1)
    together = trace_batch(loaded, batch, targets, settings, sigma)
    pictures = images(len(QUESTIONS))
    for row, question in enumerate(QUESTIONS):
        single = loaded.adapter.encode([pictures[row]], [loaded.adapter.build_prompt(question)])
        (alone,) = trace_batch(loaded, single, [targets[row]], settings, sigma)
        assert alone.p_clean == pytest.approx(together[row].p_clean, abs=1e-5)
        np.testing.assert_allclose(alone.p_corrupted_samples, together[row].p_corrupted_samples, atol=1e-5)
        for group in GROUPS:
            np.testing.assert_allclose(alone.ie[group], together[row].ie[group], atol=1e-5)


def test_layer_subset_and_cost(loaded, batch, targets):
    full = trace_batch(loaded, batch, targets, TraceSettings(kind="mean"))
    part = trace_batch(loaded, batch, targets, TraceSettings(kind="mean", layers=[1, 3]))
    for a, b in zip(full, part):
        for group in GROUPS:
            assert math.isnan(b.ie[group][0]) and math.isnan(b.ie[group][2])
            assert b.ie[group][1] == pytest.approx(a.ie[group][1], abs=1e-6)
            assert b.ie[group][3] == pytest.approx(a.ie[group][3], abs=1e-6)
    cost = full[0].cost
    assert cost.naive_forward_passes == 1 + 1 + 3 * NUM_LAYERS
    # clean + corrupted + one staircase of L(L-1)/2 layer evaluations per group. In a causal decoder
    # `image` replays from the first image token, `text` and `last` only the prompt's tail after the
    # image; under PaliGemma's bidirectional prefix every staircase covers all positions.
    staircase = (NUM_LAYERS * (NUM_LAYERS - 1) / 2) / NUM_LAYERS
    if loaded.adapter.bidirectional_prefix:
        assert cost.forward_passes == pytest.approx(2 + 3 * staircase)
    else:
        assert 2 + staircase * 0.5 <= cost.forward_passes <= 2 + staircase * 1.5
    assert cost.forward_passes < cost.naive_forward_passes / 2


def test_hooks_are_gone_after_a_run_that_raised(loaded, batch, targets, sigma):
    adapter = loaded.adapter
    before = all_hooks(loaded.model)
    implementation = adapter.language_model.config._attn_implementation
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    handle = adapter.decoder_layers[-1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            trace_batch(loaded, batch, targets, TraceSettings(kind="gaussian", n_noise=2), sigma)
        calls["n"] = -10
        with pytest.raises(RuntimeError, match="boom"):
            corrupted_answers(loaded, batch, (0, 1), "gaussian", 3.0, sigma, max_new_tokens=20)
    finally:
        handle.remove()
    assert all_hooks(loaded.model) == before
    assert adapter.language_model.config._attn_implementation == implementation


def test_trace_rejects_bad_arguments(loaded, batch, targets, sigma):
    with pytest.raises(ValueError, match="sigma"):
        trace_batch(loaded, batch, targets, TraceSettings(kind="gaussian"), None)
    with pytest.raises(ValueError, match="target ids"):
        trace_batch(loaded, batch, targets[:1], TraceSettings(kind="mean"))
    with pytest.raises(ValueError, match="out of range"):
        trace_batch(loaded, batch, targets, TraceSettings(kind="mean", layers=[NUM_LAYERS]))
    with pytest.raises(ValueError, match="unknown noise kind"):
        trace_batch(loaded, batch, targets, TraceSettings(kind="blur"))


# --- the pure functions --------------------------------------------------------------------------
def test_knockout_windows():
    assert knockout_windows(8, 2) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    assert knockout_windows(4, 4) == [(0, 3)]
    with pytest.raises(ValueError):
        knockout_windows(4, 5)


def test_choose_circuit_takes_the_largest_drop():
    windows = knockout_windows(6, 2)
    scores = np.ones((4, len(windows)))
    scores[:, 3] = [0, 0, 1, 0]
    scores[:, 1] = [0, 1, 1, 0]
    assert choose_circuit(scores, windows) == (3, 4)
    assert choose_circuit(scores, windows, clean_scores=[1, 1, 1, 1]) == (3, 4)
    assert choose_circuit(np.ones((2, len(windows))), windows) == (0, 1)  # ties: the earliest
    with pytest.raises(ValueError):
        choose_circuit(scores[:, :3], windows)


def test_control_window():
    assert control_window((2, 3), 8) == (4, 5)
    assert control_window((6, 7), 8) == (4, 5)
    assert control_window((5, 6), 8) == (3, 4)  # no room after: before
    assert control_window((1, 3), 5) == (4, 4)  # no room either side: the larger side, clipped
    with pytest.raises(ValueError):
        control_window((0, 3), 4)


def test_integration_layer():
    assert integration_layer([0, 0.1, 0.5, 0.9], [0.9, 0.8, 0.4, 0.0]) == 2
    assert integration_layer([0, 0], [1, 1]) is None
    assert integration_layer([float("nan"), 0.6], [0.9, 0.5]) == 1
