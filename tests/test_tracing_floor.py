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
    assert torch.equal(clean.last_position_states(), last_position_states(loaded, batch))
    settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=2, seed=2)
    shared = trace_batch(loaded, batch, targets, settings, sigma, clean=clean)
    alone = trace_batch(loaded, batch, targets, settings, sigma)
    assert [r.to_dict() for r in shared] == [r.to_dict() for r in alone]


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
