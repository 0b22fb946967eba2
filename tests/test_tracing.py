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
def loaded64(loaded):
    """The same model in float64, for comparisons whose tolerance must be about logic, not round-off."""
    return tiny_loaded(loaded.adapter.family, dtype=torch.float64)


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

    def p_target():  # softmax in at least float32, as the engine does
        logits = model(**inputs).logits[:, -1]
        return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1)[rows, target]

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


#: Engine against the naive oracle, both in float64. The two paths order their arithmetic differently
#: (a masked sum / count against `.mean(0)`, the head on the last position only against the full
#: logits, a replayed layer stack against a model forward), so in float32 they differ by round-off
#: that the sharpened test models amplify (logits up to ~1e2): up to 1.5e-6 was measured, which is
#: where a 1e-6 tolerance flaked. In float64 the same differences are ~1e-16 relative; through 4
#: layers of width 64 and a softmax over logits <= ~1e2 they stay below 1e-12 absolute (measured:
#: exactly 0.0 on all three families). 1e-9 keeps a margin of 1000x over round-off while any logic
#: slip (a wrong layer, position, group or mean) moves these values by far more than 1e-3 (the
#: effects tested here exceed 0.02).
FLOAT64_ATOL = 1e-9
#: Two float32 paths that order the same arithmetic differently (other batch shapes, the LM head on
#: one position or on all, a replayed layer stack or a model forward) differ by round-off: ~6e-8
#: relative per operation, which 4 layers and the sharpened LM head (logits up to ~1e2) turn into
#: logit differences up to ~1e2 * 6e-8 * 4 = 2.4e-5, and since dp/dlogit <= 1/4 into probability
#: differences up to ~6e-6. 1e-5 covers that bound. Measured worst cases over the three families
#: (2026-12-01): p_clean vs generation 1.8e-7, zero-noise IE 9.5e-7, batched vs alone 8.9e-7,
#: full restoration 3e-8. A logic slip moves these values by more than 1e-3.
FLOAT32_PROB_ATOL = 1e-5


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_ie_equals_naive_implementation(loaded64, kind):
    batch = encode(loaded64)
    targets = [a.first_token_id for a in generate_answers(loaded64, batch, max_new_tokens=1)]
    results = trace_batch(loaded64, batch, targets, TraceSettings(kind=kind, max_rows=4))
    p_clean, p_corrupted, ie = naive_trace(loaded64, batch, targets, kind)
    assert p_clean.dtype == torch.float64, "the comparison must run in float64 for its tolerance to hold"
    assert max(float(ie[g].abs().max()) for g in GROUPS) > 0.02, "the oracle's effects are too small to test"
    for row, result in enumerate(results):
        assert result.p_clean == pytest.approx(float(p_clean[row]), abs=FLOAT64_ATOL)
        assert result.p_corrupted == pytest.approx(float(p_corrupted[row]), abs=FLOAT64_ATOL)
        for group in GROUPS:
            assert len(result.ie[group]) == NUM_LAYERS
            np.testing.assert_allclose(result.ie[group], ie[group][:, row].numpy(), atol=FLOAT64_ATOL, rtol=0)


def test_p_clean_is_the_generated_first_token_probability(loaded, batch, targets):
    answers = generate_answers(loaded, batch, max_new_tokens=1)
    results = trace_batch(loaded, batch, targets, TraceSettings(kind="zero", groups=("last",)))
    for answer, result in zip(answers, results):
        assert result.p_clean == pytest.approx(answer.first_token_prob, abs=FLOAT32_PROB_ATOL)


def test_zero_noise_reproduces_the_clean_run(loaded, batch, targets, sigma):
    results = trace_batch(loaded, batch, targets, TraceSettings(kind="gaussian", scale=0.0, n_noise=2), sigma)
    for result in results:
        assert result.p_corrupted_samples == [result.p_clean] * 2  # bit for bit: the same replay, zero noise added
        for group in GROUPS:  # restored and corrupted replays batch differently: float32 round-off only
            assert max(abs(v) for v in result.ie[group]) <= FLOAT32_PROB_ATOL
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
        assert result.ie["all"][-1] == pytest.approx(result.p_clean - result.p_corrupted, abs=FLOAT32_PROB_ATOL)


def test_batched_left_padded_run_equals_one_at_a_time(loaded, batch, targets, sigma):
    settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=2, seed=1)
    together = trace_batch(loaded, batch, targets, settings, sigma)
    pictures = images(len(QUESTIONS))
    for row, question in enumerate(QUESTIONS):
        single = loaded.adapter.encode([pictures[row]], [loaded.adapter.build_prompt(question)])
        (alone,) = trace_batch(loaded, single, [targets[row]], settings, sigma)
        # Padding changes batch shapes (and so kernels), not the maths: float32 round-off only.
        assert alone.p_clean == pytest.approx(together[row].p_clean, abs=FLOAT32_PROB_ATOL)
        np.testing.assert_allclose(alone.p_corrupted_samples, together[row].p_corrupted_samples, atol=FLOAT32_PROB_ATOL)
        for group in GROUPS:
            np.testing.assert_allclose(alone.ie[group], together[row].ie[group], atol=FLOAT32_PROB_ATOL, rtol=0)


def test_layer_subset_and_cost(loaded, batch, targets):
    full = trace_batch(loaded, batch, targets, TraceSettings(kind="mean"))
    part = trace_batch(loaded, batch, targets, TraceSettings(kind="mean", layers=[1, 3]))
    for a, b in zip(full, part):
        for group in GROUPS:
            assert math.isnan(b.ie[group][0]) and math.isnan(b.ie[group][2])
            # The same replays in other staircase blocks (bit-equal when measured): float32 round-off at most.
            assert b.ie[group][1] == pytest.approx(a.ie[group][1], abs=FLOAT32_PROB_ATOL)
            assert b.ie[group][3] == pytest.approx(a.ie[group][3], abs=FLOAT32_PROB_ATOL)
    cost = full[0].cost
    assert cost.naive_forward_passes == 1 + 1 + 3 * NUM_LAYERS
    # clean + corrupted + one staircase of L(L-1)/2 layer evaluations per group. Under PaliGemma's
    # bidirectional prefix every replay covers all positions. In a causal decoder the corrupted run
    # replays from the first image token; per row, `image` only the tail after the image (restoring
    # the whole image settles every position up to its end), `text` from its first position after
    # the image, `last` the last position (positions count as fractions of the batch's length T).
    # Rows whose tails are within tracing.BUCKET_SLACK of each other share a replay, so the count
    # lies between that per-row floor and the slack above it.
    staircase = (NUM_LAYERS * (NUM_LAYERS - 1) / 2) / NUM_LAYERS
    if loaded.adapter.bidirectional_prefix:
        assert cost.forward_passes == pytest.approx(2 + 3 * staircase)  # a count: exact up to float64 division
    else:
        groups = loaded.adapter.position_groups(batch["input_ids"], batch["attention_mask"])
        length = groups["all"].shape[1]
        columns = torch.arange(length)
        image_start = torch.where(groups["image"], columns, length).amin(1)
        image_end = torch.where(groups["image"], columns, -1).amax(1)
        assert int(groups["image"].sum()) == int((image_end - image_start + 1).sum()), "contiguous images"
        text_start = torch.where(groups["text"] & (columns >= image_start[:, None]), columns, length).amin(1)
        last = groups["last"].int().argmax(1)
        tails = (length - image_end - 1) + (length - text_start) + (length - last)
        corrupted = 1 + (length - int(image_start.min())) / length
        floor = staircase * float(tails.double().mean()) / length
        assert corrupted + floor - 1e-9 <= cost.forward_passes <= corrupted + 1.1 * floor + 1e-9
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


def test_normalised_ie_divides_by_what_the_corruption_took():
    from vrp_eval.tracing import NIE_MIN_GAP, normalised_ie

    nie = normalised_ie({"image": [0.2, float("nan"), 0.5], "last": [0.0, 0.1, -0.05]}, p_clean=0.9, p_corrupted=0.4)
    # exact: one float division each (0.2 / 0.5 etc. are the doubles below)
    assert nie == {"image": [0.2 / 0.5, None, 1.0], "last": [0.0, 0.1 / 0.5, -0.05 / 0.5]}
    assert normalised_ie({"image": [0.01]}, 0.5, 0.5 - NIE_MIN_GAP / 2) is None  # too small a gap to divide by
    assert normalised_ie({"image": [0.01]}, 0.3, 0.6) is None  # the corruption raised the probability
    assert normalised_ie({"image": [0.01]}, float("nan"), 0.1) is None


def test_run_records_and_aggregate_the_normalised_ie():
    from vrp_eval.loading import load_model
    from vrp_eval.probe import ProbeSettings, run_probe
    from vrp_eval.tracing import NIE_MIN_GAP
    from vrp_eval.zoo import zoo_path

    if not (zoo_path("tiny-llava") / "config.json").exists():
        pytest.skip("the zoo weights of tiny-llava are not built in this checkout")
    loaded = load_model("tiny-llava", device="cpu")
    report = run_probe(loaded, ProbeSettings(limit=24, signals=("tracing",), n_noise=2, n_calibration=8,
                                             n_bootstrap=10), progress=False)
    with_nie = []
    for record in report.records:
        gap = record.p_clean - record.p_corrupted
        if gap < NIE_MIN_GAP:
            assert record.nie is None
            continue
        with_nie.append(record)
        for group, values in record.ie.items():
            # exact: the record's NIE is this very division of the record's own floats
            assert record.nie[group] == [None if math.isnan(v) else v / gap for v in values]
    assert 0 < len(with_nie) == report.details["n_nie"]  # the trained model's corruption takes something
    for group, curve in report.details["nie_curves"].items():
        expected = np.mean([r.nie[group] for r in with_nie], axis=0)
        # float64 means of the same values in another order: ~1e-16 relative, and |NIE| < 100 here
        assert curve == pytest.approx(expected.tolist(), abs=1e-12)
    # restoring every image position at the first layer gives back most of what the corruption took
    assert report.details["nie_curves"]["image"][0] > 0.5
