"""Scoped interventions (vrp_eval.intervention): values, scoping, and behaviour under generation."""
import pytest
import torch
from tracing_models import FAMILIES, all_hooks, encode, one_thread, tiny_loaded  # noqa: F401

from vrp_eval.generation import generate_answers
from vrp_eval.hooks import AttentionHook, attention_hooks
from vrp_eval.intervention import (
    AttentionKnockout,
    AttentionLogitNoise,
    AttentionMixUniform,
    EmbeddingCorruption,
    HiddenStateIntervention,
    RestoreHiddenStates,
    corrupt_states,
    estimate_sigma,
)
from vrp_eval.tracing import knockout_answers, knockout_hook


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request):
    return tiny_loaded(request.param)


@pytest.fixture(scope="module")
def batch(loaded):
    return encode(loaded)


@pytest.fixture(scope="module")
def groups(loaded, batch):
    return loaded.adapter.position_groups(batch["input_ids"], batch["attention_mask"])


@torch.no_grad()
def logits(loaded, batch, **kwargs):
    """Logits at the non-padding positions (padding rows are meaningless and differ between
    attention implementations)."""
    out = loaded.model(**loaded.adapter.model_inputs(batch), **kwargs).logits.float()
    return out[batch["attention_mask"].bool()]


@torch.no_grad()
def layer_outputs(loaded, batch):
    outputs = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out))
               for i, layer in enumerate(loaded.adapter.decoder_layers)]
    try:
        loaded.model(**loaded.adapter.model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


# --- the functional core -------------------------------------------------------------------------
def test_corrupt_states_kinds():
    torch.manual_seed(0)
    states = torch.randn(2, 5, 8)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    zero = corrupt_states(states, mask, "zero")
    assert (zero[mask] == 0).all() and torch.equal(zero[~mask], states[~mask])
    mean = corrupt_states(states, mask, "mean")
    # float32 sums of <= 4 vectors, perhaps associated differently from .mean(): a few ulp (measured
    # exact); torch.allclose's default rtol=1e-5 is ~80 ulp.
    assert torch.allclose(mean[0, 1], states[0, 1:3].mean(0)) and torch.allclose(mean[1, 3], states[1, :4].mean(0))
    assert torch.equal(mean[~mask], states[~mask])
    noisy = corrupt_states(states, mask, "gaussian", scale=3.0, sigma=2.0, seed=1)
    assert torch.equal(noisy[~mask], states[~mask])
    assert torch.equal(corrupt_states(states, mask, "gaussian", scale=0.0, sigma=2.0, seed=1), states)
    assert torch.equal(noisy, corrupt_states(states, mask, "gaussian", scale=3.0, sigma=2.0, seed=1))
    assert not torch.equal(noisy, corrupt_states(states, mask, "gaussian", scale=3.0, sigma=2.0, seed=2))
    assert not torch.equal(noisy, corrupt_states(states, mask, "gaussian", scale=3.0, sigma=2.0, seed=1,
                                                 noise_index=1))
    big = corrupt_states(torch.zeros(1, 4000, 16), torch.ones(1, 4000, dtype=torch.bool), "gaussian", scale=3.0,
                         sigma=0.5, seed=0)
    # Monte Carlo: the std of 64000 draws has relative standard error 1/sqrt(2n) = 0.0028, so 2% is
    # ~7 SE (seeded: measured 0.12% off).
    assert float(big.std()) == pytest.approx(1.5, rel=0.02)
    # A sample's noise does not depend on its batch neighbours or its padding.
    alone = corrupt_states(states[1:], mask[1:], "gaussian", scale=3.0, sigma=2.0, seed=1)
    assert torch.equal(alone[0], noisy[1])
    with pytest.raises(ValueError, match="sigma"):
        EmbeddingCorruption(None, mask, "gaussian", sigma=None)
    with pytest.raises(ValueError, match="unknown noise kind"):
        EmbeddingCorruption(None, mask, "blur")


def test_estimate_sigma_matches_the_clean_states(loaded, batch, groups):
    noise = estimate_sigma(loaded, [batch])
    outputs = layer_outputs(loaded, batch)
    embeds = {}
    handle = loaded.adapter.language_model.register_forward_pre_hook(
        lambda m, a, kw: embeds.update(x=kw["inputs_embeds"]), with_kwargs=True)
    logits(loaded, batch)
    handle.remove()
    # Both passes produce the same float32 states; the std is taken in float64 on both sides, so only
    # float64 round-off of the moments differs (estimate_sigma's one-pass sums against torch's std
    # over ~1e4 elements: ~n eps = 2e-12; measured <= 3e-15).
    for group in ("image", "text", "last"):
        assert noise.embedding[group] == pytest.approx(float(embeds["x"][groups[group]].double().std()), rel=1e-10)
        for layer, out in outputs.items():
            assert noise.outputs[group][layer] == pytest.approx(float(out[groups[group]].double().std()), rel=1e-10)
            if layer + 1 in outputs:
                # exact: layer l + 1 reads the very tensor layer l wrote, summed by the same code
                assert noise.inputs[group][layer + 1] == noise.outputs[group][layer]
    assert noise.n_samples == 3
    capped = estimate_sigma(loaded, [batch], max_samples=1)
    assert capped.n_samples == 1
    first_image = outputs[0][0][groups["image"][0]].double()
    assert capped.outputs["image"][0] == pytest.approx(float(first_image.std()), rel=1e-10)


# --- hidden-state interventions ------------------------------------------------------------------
def test_hidden_state_intervention_sites(loaded, batch, groups):
    clean = layer_outputs(loaded, batch)
    image = groups["image"]
    with HiddenStateIntervention(loaded.adapter, [1], image, kind="zero"):
        out = layer_outputs(loaded, batch)
    assert torch.equal(out[0], clean[0])
    assert (out[1][image] == 0).all() and torch.equal(out[1][~image], clean[1][~image])
    with HiddenStateIntervention(loaded.adapter, [1], image, kind="zero", site="input"):
        out = layer_outputs(loaded, batch)
    assert torch.equal(out[0], clean[0]) and not torch.equal(out[1], clean[1])
    with HiddenStateIntervention(loaded.adapter, [0], image, kind="zero"):
        via_output = logits(loaded, batch)
    with HiddenStateIntervention(loaded.adapter, [1], image, kind="zero", site="input"):
        via_input = logits(loaded, batch)
    assert torch.equal(via_output, via_input)  # layer 0's output is what layer 1 reads
    with RestoreHiddenStates(loaded.adapter, 1, groups["all"], clean[1]), \
            HiddenStateIntervention(loaded.adapter, [0], groups["all"], kind="zero"):
        restored = logits(loaded, batch)
    # Exact by construction: layers 2-3 read only layer 1's output, restored bit for bit at every
    # real position (padding is masked out), and run the same ops as the clean pass.
    assert torch.equal(restored, logits(loaded, batch))


def test_hidden_state_intervention_leaves_cached_generation_steps_alone(loaded, batch, groups):
    """Under generation with a KV cache the intervention acts on the prompt pass only; the result equals
    a no-cache forward over prompt + answer with the masks extended by False."""
    intervention = HiddenStateIntervention(loaded.adapter, range(loaded.adapter.num_layers), groups["image"],
                                           kind="mean")
    with intervention:
        answers = generate_answers(loaded, batch, max_new_tokens=3)
    assert intervention.calls == loaded.adapter.num_layers
    _check_against_full_forward(loaded, batch, answers, lambda extended: HiddenStateIntervention(
        loaded.adapter, range(loaded.adapter.num_layers), extended["image"], kind="mean"))


def _extended(loaded, batch, answers, steps):
    """The batch with the first `steps` answer tokens appended, and its extended group masks."""
    ids = torch.tensor([(a.token_ids + [loaded.adapter.eos_token_ids[0]] * steps)[:steps] for a in answers])
    extended = dict(batch)
    extended["input_ids"] = torch.cat([batch["input_ids"], ids], 1)
    extended["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in batch:
            extended[key] = torch.cat([batch[key], torch.full_like(ids, 1 if key == "token_type_ids" else 0)], 1)
    groups = loaded.adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    pad = torch.zeros_like(ids, dtype=torch.bool)
    masks = {g: torch.cat([m, pad], 1) for g, m in groups.items()}
    masks["generated"] = torch.cat([torch.zeros_like(groups["all"]), ~pad], 1)
    return extended, masks


def _check_against_full_forward(loaded, batch, answers, make_intervention, attention=False):
    steps = min(len(a.token_ids) for a in answers)
    if steps < 2:
        pytest.skip("the model stopped after one token")
    extended, masks = _extended(loaded, batch, answers, steps - 1)
    prompt = batch["input_ids"].shape[1]
    scope = make_intervention(masks)
    inputs = loaded.adapter.model_inputs(extended)
    with torch.no_grad():
        if attention:
            with attention_hooks(loaded.adapter, scope):
                out = loaded.model(**inputs).logits.float()
        else:
            with scope:
                out = loaded.model(**inputs).logits.float()
    probs = out.softmax(-1)
    # float32 round-off: generate's cached one-token steps against one uncached forward, through 4
    # layers and the x30 head; probabilities in [0, 1] moved by <= 1.4e-6 (measured, all families).
    # float32 on purpose: the path users run (float64 under left padding is held finite by
    # test_modifying_hooks_in_float64_stay_finite_under_left_padding).
    for row, answer in enumerate(answers):
        for step in range(steps):
            token = answer.token_ids[step]
            assert float(probs[row, prompt - 1 + step, token]) == pytest.approx(answer.token_probs[step], abs=1e-5)


# --- attention interventions ---------------------------------------------------------------------
class _ProbsRecorder(AttentionHook):
    modifies = True

    def __init__(self, layers):
        self.layers = frozenset(layers)
        self.probs = {}

    def modify_probs(self, layer, probs):
        self.probs[layer] = probs.clone()
        return probs


def eager_logits(loaded, batch, layers):
    """`logits` with `layers` on the dispatcher's eager path and nothing changed (a pass-through hook
    that declares it modifies): the bit-exact reference for a hook whose parameters make it a no-op."""
    with attention_hooks(loaded.adapter, _ProbsRecorder(layers)):
        return logits(loaded, batch)


def assert_eager_matches_sdpa(eager, sdpa):
    """float32 round-off only: SDPA and the eager path reduce in other orders (a few ulp on each
    attention output), which the later layers and the x30 head carry to the logits. Measured <= 2.6 eps
    * max|logit| (6.7e-6) over the three families; 32 eps * max|logit| (8e-5 at |logit| <= 22) leaves
    12x, and a wrong mask or scaling moves logits by O(1). In float32, the dtype users run."""
    atol = 32 * torch.finfo(torch.float32).eps * float(sdpa.abs().max())
    assert torch.allclose(eager, sdpa, rtol=0, atol=atol)


def test_knockout_changes_nothing_before_its_window(loaded, batch, groups):
    clean = layer_outputs(loaded, batch)
    hook = knockout_hook(loaded.adapter, batch, (1, 2))
    with attention_hooks(loaded.adapter, hook):
        out = layer_outputs(loaded, batch)
    assert torch.equal(out[0], clean[0])
    image, valid = groups["image"], groups["all"]
    # Image queries are not knocked out and read the window's first layer's (unchanged) inputs. The
    # knockout runs layer 1 on the eager path, the clean pass on SDPA: float32 round-off of one
    # attention layer, measured <= 4.8e-7 on states up to |h| = 7 (1% of atol + rtol |h|).
    assert torch.allclose(out[1][image], clean[1][image], atol=1e-5)
    non_image = valid & ~image
    assert (out[1][non_image] - clean[1][non_image]).abs().max() > 1e-3


def test_knockout_without_effect_where_attention_writes_nothing(loaded, batch):
    """Zero the attention output projection of the window's layers: the knockout then cannot matter,
    so the logits are identical; in a layer that does attend it changes them."""
    layer = loaded.adapter.decoder_layers[1].self_attn.o_proj
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight.zero_()
        base = logits(loaded, batch)
        with attention_hooks(loaded.adapter, knockout_hook(loaded.adapter, batch, (1, 1))):
            knocked = logits(loaded, batch)
        # Exact by construction: layer 1's attention is multiplied by a zero o_proj whatever it is, and
        # the other layers run transformers' own SDPA function through the dispatcher.
        assert torch.equal(knocked, base)
        with attention_hooks(loaded.adapter, knockout_hook(loaded.adapter, batch, (2, 2))):
            assert (logits(loaded, batch) - base).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


def test_knockout_blocks_exactly_the_edges(loaded, batch, groups):
    recorder = _ProbsRecorder([1])
    with attention_hooks(loaded.adapter, knockout_hook(loaded.adapter, batch, (1, 1)), recorder):
        logits(loaded, batch)
    probs = recorder.probs[1]  # (B, H, T, T)
    non_image = groups["all"] & ~groups["image"]
    blocked = non_image[:, None, :, None] & groups["image"][:, None, None, :]
    assert float(probs.masked_select(blocked.expand_as(probs)).abs().max()) == 0.0
    rows = non_image[:, None, :].expand(probs.shape[:3])
    # A float32 softmax row over <= 54 keys sums to 1 within ~55 eps = 7e-6 (each p rounded, plus the
    # normaliser's sum); atol + rtol = 2e-5; measured <= 1.8e-7.
    assert torch.allclose(probs.sum(-1)[rows], torch.ones(()), atol=1e-5)
    image_rows = probs[groups["image"][:, None, :].expand(probs.shape[:3])]
    assert float(image_rows.max()) > 0  # image queries keep their attention


def test_knockout_during_generation_blocks_the_generated_queries(loaded, batch):
    answers = knockout_answers(loaded, batch, (0, loaded.adapter.num_layers - 1), max_new_tokens=3)
    _check_against_full_forward(
        loaded, batch, answers,
        lambda m: AttentionKnockout(range(loaded.adapter.num_layers), (m["all"] & ~m["image"]) | m["generated"],
                                    m["image"], generated_queries=True),
        attention=True)


def test_mix_uniform(loaded, batch, groups):
    base = logits(loaded, batch)
    eager = eager_logits(loaded, batch, [0, 1])
    assert_eager_matches_sdpa(eager, base)
    with attention_hooks(loaded.adapter, AttentionMixUniform([0, 1], alpha=0.0)):
        assert torch.equal(logits(loaded, batch), eager)  # exact: (1 - 0) p + 0 u is p bit for bit
    recorder = _ProbsRecorder([1])
    with attention_hooks(loaded.adapter, AttentionMixUniform([1], alpha=1.0), recorder):
        mixed = logits(loaded, batch)
    assert (mixed - base).abs().max() > 1e-3
    probs = recorder.probs[1]
    valid = groups["all"]
    for row in range(probs.shape[0]):
        last = int(valid[row].nonzero().max())
        allowed = probs[row, 0, last] > 0
        # float32 1 / n on both sides, at most an ulp apart (double rounding): default rtol=1e-5
        assert torch.allclose(probs[row, :, last][:, allowed], 1.0 / int(allowed.sum()) * torch.ones(()))
        assert allowed[valid[row]].all() and not allowed[~valid[row]].any()


def test_logit_noise_is_seeded(loaded, batch):
    base = logits(loaded, batch)
    eager = eager_logits(loaded, batch, [0, 1])
    assert_eager_matches_sdpa(eager, base)
    with attention_hooks(loaded.adapter, AttentionLogitNoise([0, 1], std=0.0)):
        assert torch.equal(logits(loaded, batch), eager)  # exact: s + 0 * noise is s bit for bit
    runs = []
    for seed in (1, 1, 2):
        with attention_hooks(loaded.adapter, AttentionLogitNoise([0, 1], std=2.0, seed=seed)):
            runs.append(logits(loaded, batch))
    # Another seed moves the logits by O(1) (largest change >= 3.2 in every family), far beyond round-off
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2], atol=1e-4)
    assert (runs[0] - base).abs().max() > 1e-3


# --- scoping -------------------------------------------------------------------------------------
def test_every_hook_is_removed_when_the_block_raises(loaded, batch, groups):
    adapter = loaded.adapter
    before = all_hooks(loaded.model)
    implementation = adapter.language_model.config._attn_implementation
    clean = layer_outputs(loaded, batch)
    scopes = [
        EmbeddingCorruption(adapter, groups["image"], "zero"),
        HiddenStateIntervention(adapter, None, groups["image"], "mean"),
        HiddenStateIntervention(adapter, [0, 2], groups["text"], "zero", site="input"),
        RestoreHiddenStates(adapter, 1, groups["last"], clean[1]),
    ]
    for scope in scopes:
        with pytest.raises(RuntimeError, match="inside"), scope:
            assert all_hooks(loaded.model) > before
            raise RuntimeError("inside")
        assert all_hooks(loaded.model) == before
    hooks = (knockout_hook(adapter, batch, (0, 1)), AttentionMixUniform(None, 0.5))
    with pytest.raises(RuntimeError, match="inside"), attention_hooks(adapter, *hooks):
        assert adapter.language_model.config._attn_implementation == "vrp"
        raise RuntimeError("inside")
    assert adapter.language_model.config._attn_implementation == implementation
    assert torch.equal(logits(loaded, batch), logits(loaded, batch))


@pytest.mark.parametrize("family", ["llava", "paligemma", "qwen2vl"])
def test_modifying_hooks_in_float64_stay_finite_under_left_padding(family):
    """The dispatcher's own attention path (used when a hook modifies attention) softmaxes in the
    scores' dtype when that is float64: in float32 a float64 mask's minimum becomes -inf, a padding
    query with every key masked gives NaN, and the NaN reaches real positions through the values."""
    from tracing_models import encode, tiny_loaded

    answers = {}
    for dtype in (torch.float32, torch.float64):
        loaded = tiny_loaded(family, dtype=dtype)
        batch = encode(loaded)
        assert batch["attention_mask"].sum(1).min() < batch["attention_mask"].sum(1).max()  # left padding
        answers[dtype] = knockout_answers(loaded, batch, (0, loaded.adapter.num_layers - 1), max_new_tokens=1)
    for a32, a64 in zip(answers[torch.float32], answers[torch.float64]):
        assert a32.first_token_id == a64.first_token_id
        # float32 against float64 through 4 layers and the x30 head: probabilities move by float32
        # round-off, ~1e-6 (the engine's other float32-vs-exact bound, FLOAT32_PROB_ATOL, is 1e-5)
        assert a64.first_token_prob == pytest.approx(a32.first_token_prob, abs=1e-5)
