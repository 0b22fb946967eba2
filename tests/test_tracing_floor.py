"""The restoration sweep at the floor: each replay covers only the positions its restoration can change.

`trace_batch` replays the corrupted run from the first image token over the clean run's keys/values
and the image group only over the prompt's tail after the image. `_from_image=True` keeps the engine
that replayed from the first image token over the corrupted run's keys/values; both must give the
same numbers on every family (Qwen2-VL's 3-D rotary positions and PaliGemma's bidirectional prefix
included), and far less work where the image is long.
"""
import math

import numpy as np
import pytest
import torch
from tracing_models import FAMILIES, encode, one_thread, tiny_loaded  # noqa: F401 (one_thread: autouse)

from vrp_eval.companions import last_position_states
from vrp_eval.generation import generate_answers
from vrp_eval.intervention import estimate_sigma
from vrp_eval.tracing import TraceSettings, clean_run, trace_batch

#: Both engines run the same layer modules on the same inputs; only the query block (tail vs from the
#: image) and the key/value prefix (the clean capture's vs the corrupted replay's, equal in real
#: arithmetic before the image) differ, so kernels may round differently: float32 round-off, bounded
#: as in test_tracing.FLOAT32_PROB_ATOL (measured: 0.0 on all three families, 2026-12-02).
FLOAT32_PROB_ATOL = 1e-5


@pytest.fixture(scope="module", params=FAMILIES)
def traced(request):
    loaded = tiny_loaded(request.param)
    batch = encode(loaded)
    targets = [a.first_token_id for a in generate_answers(loaded, batch, max_new_tokens=1)]
    return loaded, batch, targets, estimate_sigma(loaded, [batch])


@pytest.mark.parametrize("settings", [
    TraceSettings(kind="gaussian", scale=3.0, n_noise=2, seed=1),
    TraceSettings(kind="zero", groups=("image", "text", "last", "all"), max_rows=3),
    TraceSettings(kind="mean", layers=[0, 2]),
], ids=["gaussian", "zero-all-groups", "mean-layer-subset"])
def test_floor_equals_the_replay_from_the_image(traced, settings):
    loaded, batch, targets, sigma = traced
    floor = trace_batch(loaded, batch, targets, settings, sigma)
    before = trace_batch(loaded, batch, targets, settings, sigma, _from_image=True)
    assert max(abs(v) for r in before for g in settings.groups for v in r.ie[g] if not math.isnan(v)) > 0.02
    for new, old in zip(floor, before):
        assert new.p_clean == old.p_clean
        np.testing.assert_allclose(new.p_corrupted_samples, old.p_corrupted_samples, atol=FLOAT32_PROB_ATOL, rtol=0)
        for group in settings.groups:
            np.testing.assert_allclose(new.ie[group], old.ie[group], atol=FLOAT32_PROB_ATOL, rtol=0)
    if loaded.adapter.bidirectional_prefix:  # nothing can be skipped before a bidirectional prefix
        assert floor[0].cost.forward_passes == before[0].cost.forward_passes
    else:
        assert floor[0].cost.forward_passes < before[0].cost.forward_passes


def test_restoring_every_position_is_the_clean_run(traced):
    """The `all` group settles every position: nothing is replayed and the restored run is the clean one."""
    loaded, batch, targets, sigma = traced
    settings = TraceSettings(kind="gaussian", n_noise=2, seed=4, groups=("all",))
    for result in trace_batch(loaded, batch, targets, settings, sigma):
        gap = result.p_clean - result.p_corrupted
        np.testing.assert_allclose(result.ie["all"], gap, atol=FLOAT32_PROB_ATOL, rtol=0)


def test_one_clean_pass_feeds_the_logit_lens_and_the_trace(traced):
    """`clean_run` is the trace's clean pass; the logit lens reads the same states from it as from a
    forward of its own, and a trace given it equals one that makes its own."""
    loaded, batch, targets, sigma = traced
    clean = clean_run(loaded, batch)
    states = last_position_states(loaded, batch)
    assert torch.equal(clean.last_position_states(), states)
    # Against the model's own hidden states (independent of the hooks): entry l + 1 is layer l's
    # output, except the last one, which transformers returns after the final norm.
    with torch.no_grad():
        own = loaded.model(**loaded.model_inputs(batch), output_hidden_states=True).hidden_states
    last = batch["attention_mask"].shape[1] - 1  # left padding: every row's last prompt position
    reference = torch.stack([h[:, last] for h in own[1:-1]], dim=1)
    torch.testing.assert_close(states[:, :-1], reference, atol=1e-5, rtol=0)  # float32 round-off
    settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=2, seed=2)
    shared = trace_batch(loaded, batch, targets, settings, sigma, clean=clean)
    alone = trace_batch(loaded, batch, targets, settings, sigma)
    assert [r.to_dict() for r in shared] == [r.to_dict() for r in alone]


@pytest.mark.parametrize("answering", ["generate", "likelihood"])
def test_the_answers_prefill_is_the_clean_pass(traced, answering):
    """`CleanCapture` records the answer's own prompt pass (a generation's prefill, or the first step
    of likelihood scoring) while it runs, with an attention recorder active: the generation is the
    one without a capture, and the trace, the proxy and the logit lens read the same numbers from it
    as from a clean forward of their own (Qwen2-VL's rotary offsets, PaliGemma's prefix mask and the
    recorded keys/values included). Only the cost differs: the shared clean pass is the answer's."""
    from vrp_eval.attention import SharpnessRecorder
    from vrp_eval.generation import option_answers
    from vrp_eval.hooks import attention_hooks
    from vrp_eval.proxy import proxy_trace_batch
    from vrp_eval.tracing import CleanCapture

    loaded, batch, targets, sigma = traced
    choices = [["red", "blue square"], ["yes", "no", "0"], ["2 3", "green"]]  # two-token options: more generations

    def answer():
        if answering == "likelihood":
            return option_answers(loaded, batch, choices)
        return generate_answers(loaded, batch, max_new_tokens=3)

    plain = answer()
    recorder = SharpnessRecorder.for_batch(loaded.adapter, batch)
    with CleanCapture(loaded, batch) as capture, attention_hooks(loaded.adapter, recorder):
        captured = answer()
    assert [(a.text, a.token_probs) for a in captured] == [(a.text, a.token_probs) for a in plain]
    shared = capture.run
    assert shared.from_answer and len(recorder.log_attention) == loaded.adapter.num_layers
    with CleanCapture(loaded, batch, last_only=True) as last_only:  # what the logit lens alone keeps
        answer()
    assert torch.equal(last_only.last_position_states(), shared.last_position_states())
    with pytest.raises(ValueError, match="last positions only"):
        _ = last_only.run
    own = clean_run(loaded, batch)
    # The answer's prefill and a plain forward run the same layers on the same inputs; generate's
    # cached path may pick other kernels, so float32 round-off (FLOAT32_PROB_ATOL's reasoning).
    torch.testing.assert_close(shared.last_position_states(), own.last_position_states(), atol=1e-5, rtol=0)
    if own.kv is not None:
        # Keys after the rotary embedding: generation numbers a left-padded row's positions from its
        # first real token, a plain forward from the padding, so only the unpadded rows' keys are
        # equal (attention reads relative positions: the states above agree on every row).
        assert sorted(shared.kv) == sorted(own.kv) == list(range(loaded.adapter.num_layers))
        full = batch["attention_mask"].bool().all(1)
        assert full.any() and not full.all()
        for layer in own.kv:
            for a, b in zip(shared.kv[layer], own.kv[layer]):
                torch.testing.assert_close(a[full], b[full], atol=1e-5, rtol=0)
    else:
        assert shared.kv is None and loaded.adapter.bidirectional_prefix
    settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=2, seed=2)
    from_answer = trace_batch(loaded, batch, targets, settings, sigma, clean=shared)
    alone = trace_batch(loaded, batch, targets, settings, sigma, clean=own)
    assert max(abs(v) for r in alone for v in r.ie["image"]) > 0.02
    for new, old in zip(from_answer, alone):
        assert new.p_clean == pytest.approx(old.p_clean, abs=FLOAT32_PROB_ATOL)
        np.testing.assert_allclose(new.p_corrupted_samples, old.p_corrupted_samples, atol=FLOAT32_PROB_ATOL, rtol=0)
        for group in settings.groups:
            np.testing.assert_allclose(new.ie[group], old.ie[group], atol=FLOAT32_PROB_ATOL, rtol=0)
        # The clean pass is counted once, by the answer.
        assert new.cost.forward_passes == pytest.approx(old.cost.forward_passes - 1.0, abs=1e-12)
    proxy_shared = proxy_trace_batch(loaded, batch, targets, settings, sigma, clean=shared)
    proxy_alone = proxy_trace_batch(loaded, batch, targets, settings, sigma)
    for new, old in zip(proxy_shared, proxy_alone):
        for group in settings.groups:
            np.testing.assert_allclose(new.ie[group], old.ie[group], atol=FLOAT32_PROB_ATOL, rtol=0)
        assert new.cost.forward_passes == old.cost.forward_passes - 1.0


@pytest.mark.parametrize("setup", ["eager", "static-cache"])
def test_a_recorded_prefill_replays_as_it_was_computed(traced, setup):
    """The answer's prefill recorded under the sharpness recorder (whose dispatcher builds SDPA's
    boolean masks) traces like a clean forward of the trace's own on a model set to eager attention
    (additive float masks): the replay reads the masks as they were built. With a static cache the
    recorded keys and masks keep the prompt's positions only. The hooks are gone afterwards."""
    from tracing_models import all_hooks

    from vrp_eval.attention import SharpnessRecorder
    from vrp_eval.hooks import attention_hooks
    from vrp_eval.proxy import proxy_trace_batch
    from vrp_eval.tracing import CleanCapture

    loaded, batch, targets, sigma = traced
    language_model = loaded.adapter.language_model
    before = (language_model.config._attn_implementation, loaded.model.generation_config.cache_implementation)
    hooks_before = all_hooks(loaded.model)
    reference = SharpnessRecorder.for_batch(loaded.adapter, batch)
    with attention_hooks(loaded.adapter, reference):
        generate_answers(loaded, batch, max_new_tokens=1)
    try:
        if setup == "eager":
            language_model.set_attn_implementation("eager")
        else:
            loaded.model.generation_config.cache_implementation = "static"
        recorder = SharpnessRecorder.for_batch(loaded.adapter, batch)
        with CleanCapture(loaded, batch) as capture, attention_hooks(loaded.adapter, recorder):
            generate_answers(loaded, batch, max_new_tokens=2)
        shared = capture.run
        assert all_hooks(loaded.model) == hooks_before
        np.testing.assert_allclose([r.sharpness for r in recorder.signals()],
                                   [r.sharpness for r in reference.signals()], atol=FLOAT32_PROB_ATOL, rtol=0)
        assert language_model.config._attn_implementation == ("eager" if setup == "eager" else before[0])
        if shared.kv is not None:
            assert shared.kv[0][0].shape[-2] == batch["input_ids"].shape[1]
        settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=2, seed=2)
        from_answer = trace_batch(loaded, batch, targets, settings, sigma, clean=shared)
        alone = trace_batch(loaded, batch, targets, settings, sigma)
        for new, old in zip(from_answer, alone):
            np.testing.assert_allclose(new.p_corrupted_samples, old.p_corrupted_samples, atol=FLOAT32_PROB_ATOL, rtol=0)
            for group in settings.groups:
                np.testing.assert_allclose(new.ie[group], old.ie[group], atol=FLOAT32_PROB_ATOL, rtol=0)
        proxy_shared = proxy_trace_batch(loaded, batch, targets, settings, sigma, clean=shared)
        proxy_alone = proxy_trace_batch(loaded, batch, targets, settings, sigma)
        for new, old in zip(proxy_shared, proxy_alone):
            np.testing.assert_allclose(new.ie["image"], old.ie["image"], atol=FLOAT32_PROB_ATOL, rtol=0)
    finally:
        language_model.set_attn_implementation(before[0])
        loaded.model.generation_config.cache_implementation = before[1]


def test_a_chunked_prefill_is_refused_with_the_fix(traced):
    """A prefill in chunks is not one clean pass: refused at once, naming the setting to unset."""
    from vrp_eval.tracing import CleanCapture

    loaded, batch, _, _ = traced
    try:
        loaded.model.generation_config.prefill_chunk_size = 16
        for last_only in (False, True):
            with pytest.raises(ValueError, match="prefill_chunk_size"), CleanCapture(loaded, batch, last_only=last_only):
                generate_answers(loaded, batch, max_new_tokens=2)
    finally:
        loaded.model.generation_config.prefill_chunk_size = None


@pytest.mark.parametrize("questions", [
    ("what color is the circle left of the red square?", "what color is the circle left of the red blue square?"),
    ("what color is the circle left of the red square?", "what color is the circle left of the red blue square?",
     "what?"),
], ids=["one-bucket", "two-buckets"])
def test_rows_whose_tails_share_a_replay_keep_their_own_results(traced, questions):
    """Rows with about as long tails after the image share a replay (the longer tail sorted first);
    each row must still get its own numbers: against the engine that replays every row from the image."""
    loaded, _, _, sigma = traced
    batch = encode(loaded, questions)
    targets = [a.first_token_id for a in generate_answers(loaded, batch, max_new_tokens=1)]
    settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=2, seed=3)
    floor = trace_batch(loaded, batch, targets, settings, sigma)
    before = trace_batch(loaded, batch, targets, settings, sigma, _from_image=True)
    for new, old in zip(floor, before):
        for group in settings.groups:
            np.testing.assert_allclose(new.ie[group], old.ie[group], atol=FLOAT32_PROB_ATOL, rtol=0)
