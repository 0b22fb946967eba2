"""Attention sharpness and the companion toolkit's signals (vrp_eval.attention).

The recorder computes one query row per layer inside the attention dispatcher while SDPA runs; the
oracle is the model's own eager attention (`output_attentions=True`). The tiny models get their
query projections scaled up so attention is far from uniform (a random-init model attends almost
uniformly, which would let a wrong row or a wrong mask pass unnoticed).
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vrp_eval import hooks
from vrp_eval.adapters import adapter_for
from vrp_eval.attention import (
    SharpnessRecorder,
    attention_signals,
    cluster_count,
    sharpness_from_attention,
    spatial_entropy,
    token_confidence,
)
from vrp_eval.companions import logit_lens_margin, self_consistency
from vrp_eval.generation import generate_answers
from vrp_eval.loading import LoadedModel
from vrp_eval.zoo.build import TinySpec, build_tiny

WORDS = ["what", "color", "is", "the", "circle", "square", "red", "green", "blue", "yes", "no", "left", "right", "0", "1", "2", "3"]
QUESTIONS = ["what color is the circle left of the red square?", "what?", "is the square blue?"]
NUM_LAYERS = 4


def _images(n=3, size=48):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=["llava", "paligemma", "qwen2vl"])
def loaded(request):
    torch.manual_seed(0)
    model, processor = build_tiny(request.param, WORDS, TinySpec(num_layers=NUM_LAYERS), seed=3)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    adapter = adapter_for(model, processor)
    return LoadedModel(model=model, processor=processor, adapter=adapter, model_name=f"tiny-{request.param}",
                       model_path="", model_sha="", dtype="float32")


@pytest.fixture(scope="module")
def batch(loaded):
    adapter = loaded.adapter
    batch = adapter.encode(_images(), [adapter.build_prompt(q) for q in QUESTIONS])
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "the batch must be left-padded for these tests"
    return batch


@pytest.fixture(scope="module")
def eager_attentions(loaded, batch):
    language_model = loaded.adapter.language_model
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = loaded.model(**loaded.adapter.model_inputs(batch), output_attentions=True)
    finally:
        language_model.set_attn_implementation(previous)
    assert len(out.attentions) == NUM_LAYERS
    return [a.double() for a in out.attentions]


def test_sharpness_and_mass_equal_eager_output_attentions(loaded, batch, eager_attentions):
    signals = attention_signals(loaded, batch)
    image = loaded.adapter.position_groups(batch["input_ids"], batch["attention_mask"])["image"]
    assert len(signals) == len(QUESTIONS)
    for row, sig in enumerate(signals):
        rows = [att[row, :, -1][:, image[row]] for att in eager_attentions]  # (H, N) per layer
        sharp = [float(sharpness_from_attention(a).mean()) for a in rows]
        mass = [float(a.sum(-1).mean()) for a in rows]
        h_s = [spatial_entropy(a.mean(0)) for a in rows]
        # float32 round-off: the recorder's float32 logits in an SDPA pass against the eager float32
        # softmax of another pass, after up to 4 layers of SDPA-vs-eager round-off (float64 is no way
        # out: the recorder works in float32 by design, and eager float64 gives NaN rows under left
        # padding here). Measured <= 1.7e-6 over the three families, on entropies up to
        # log 36 = 3.6 (a few ulp): 1e-5 leaves 6x.
        assert sig.sharpness_per_layer == pytest.approx(sharp, abs=1e-5)
        assert sig.image_attention_mass_per_layer == pytest.approx(mass, abs=1e-5)
        assert sig.sharpness == pytest.approx(np.mean(sharp), abs=1e-5)
        assert sig.image_attention_mass == pytest.approx(np.mean(mass), abs=1e-5)
        assert sig.spatial_entropy_per_layer == pytest.approx(h_s, abs=1e-5)
        assert sig.spatial_layers == [2, 3]  # the second half of 4 layers
        # H_s: the entropy of the ONE map averaged over the spatial layers (the source's definition);
        # the mean of the per-layer entropies keeps its own name. The averaged map weights each layer
        # by its image mass, so concavity bounds H_s below by the mass-weighted mean entropy.
        assert sig.spatial_entropy == pytest.approx(spatial_entropy(np.mean([a.mean(0) for a in rows[2:]], axis=0)),
                                                    abs=1e-5)
        assert sig.spatial_entropy_layer_mean == pytest.approx(np.mean(h_s[2:]), abs=1e-5)
        assert sig.spatial_entropy >= np.average(h_s[2:], weights=mass[2:]) - 1e-5
        assert sig.d_spatial_entropy[0] is None
        assert sig.d_spatial_entropy[1:] == pytest.approx(np.diff(h_s).tolist(), abs=1e-5)
        grid = loaded.adapter.image_grid(batch, row)
        expected_clusters = cluster_count(torch.stack([a.mean(0) for a in rows[2:]]).mean(0).reshape(grid).numpy())
        assert sig.cluster_count == expected_clusters
        assert sig.n_image_tokens == 36 and sig.grid == (6, 6)
    # Non-trivial values, so that a wrong query row or a wrong mask could not pass.
    every = [s for sig in signals for s in sig.sharpness_per_layer]
    assert max(every) - min(every) > 0.05 and max(every) > 0.1
    masses = [m for sig in signals for m in sig.image_attention_mass_per_layer]
    assert 0.05 < min(masses) and max(masses) < 0.999


def test_recorder_ignores_generation_steps(loaded, batch):
    reference = attention_signals(loaded, batch)
    calls = []

    class Counting(SharpnessRecorder):
        def observe(self, layer, query, *args):
            calls.append((layer, query.shape[2]))
            super().observe(layer, query, *args)

    recorder = Counting.for_batch(loaded.adapter, batch)
    with hooks.attention_hooks(loaded.adapter, recorder):
        answers = generate_answers(loaded, batch, max_new_tokens=3)
    assert sum(1 for _, q_len in calls if q_len == 1) >= NUM_LAYERS, "decoding steps reached the observer"
    assert sorted(recorder.log_attention) == list(range(NUM_LAYERS))
    # Two float32 prompt passes that differ by more than kernels: generate counts RoPE positions from
    # each row's first real token, a plain forward from column 0, and transformers computes rotary
    # angles in float32 whatever the model dtype (so float64 would not remove it; nor would it the
    # recorder's float32 logits). S and m move by at most 2 max|dz| (the absolute gradients of S and
    # m in the logits z sum to <= 2H / log N and 2m); the rows' logits (|z| <= 18) differ by <= 2.1e-5
    # (~20 ulp), hence 5e-5. Measured on S and m: <= 3.7e-7, as the errors average over keys and
    # heads; recording a decoding step instead moves them by >= 0.37.
    for got, want in zip(recorder.signals(), reference):
        assert got.sharpness_per_layer == pytest.approx(want.sharpness_per_layer, abs=5e-5)
        assert got.image_attention_mass_per_layer == pytest.approx(want.image_attention_mass_per_layer, abs=5e-5)
    # The capture does not change the answers.
    assert [a.token_ids for a in answers] == [a.token_ids for a in generate_answers(loaded, batch, max_new_tokens=3)]


def test_layer_subset(loaded, batch):
    full = attention_signals(loaded, batch)
    part = attention_signals(loaded, batch, layers=[1, 3])
    # Exact by construction: the recorder does not change the forward, so both runs compute the same
    # rows with the same ops; the mean of two values is (a + b) / 2 in numpy too.
    for f, p in zip(full, part):
        assert p.sharpness_per_layer[0] is None and p.sharpness_per_layer[2] is None
        assert p.sharpness_per_layer[1] == f.sharpness_per_layer[1]
        assert p.sharpness == (f.sharpness_per_layer[1] + f.sharpness_per_layer[3]) / 2
        assert p.spatial_layers == [3]
        assert p.spatial_entropy == f.spatial_entropy_per_layer[3]  # one spatial layer: its own map
        assert p.spatial_entropy_layer_mean == f.spatial_entropy_per_layer[3]


def test_attention_implementation_restored_after_run_and_after_error(loaded, batch):
    language_model = loaded.adapter.language_model
    before = language_model.config._attn_implementation
    attention_signals(loaded, batch)
    assert language_model.config._attn_implementation == before
    wrong = SharpnessRecorder(torch.ones(2, 7, dtype=torch.bool))  # not this batch's shape
    with pytest.raises(ValueError, match="build the recorder from the batch"), \
            hooks.attention_hooks(loaded.adapter, wrong), torch.no_grad():
        loaded.model(**loaded.adapter.model_inputs(batch))
    assert language_model.config._attn_implementation == before
    assert hooks._ACTIVE.get() == ()


def test_logit_lens_margin_at_the_last_layer_is_the_real_margin(loaded, batch):
    answers = generate_answers(loaded, batch, max_new_tokens=1)
    targets = [answers[0].first_token_id, 5, 7]  # the greedy token (margin >= 0) and arbitrary ones
    margins = logit_lens_margin(loaded, batch, targets)
    assert [len(m) for m in margins] == [NUM_LAYERS] * len(QUESTIONS)
    with torch.no_grad():
        logits = loaded.model(**loaded.adapter.model_inputs(batch)).logits[:, -1].double()
    # float32 round-off only: the lens and the model apply the same final norm and head, to one
    # position vs all of them (differently blocked matmuls). The logits are |z| <= 0.52 here, so an
    # ulp is 6e-8; measured <= 2e-8 on the margin.
    for row, target in enumerate(targets):
        others = torch.cat([logits[row, :target], logits[row, target + 1:]])
        assert margins[row][-1] == pytest.approx(float(logits[row, target] - others.max()), abs=1e-6)
    assert margins[0][-1] >= 0
    assert len({round(m, 6) for m in margins[1]}) > 1, "earlier layers read a different state"
    # Several targets per sample come from the same forward pass, each equal to its own call.
    both = logit_lens_margin(loaded, batch, [(t, 5) for t in targets])
    assert [b[0] for b in both] == margins
    assert [b[1] for b in both] == logit_lens_margin(loaded, batch, [5] * len(targets))


def test_truth_margin_is_negative_where_the_model_is_wrong():
    # The truth margin reads the reference answer's token: on a sample the trained zoo model gets
    # wrong it is negative at the last layer ("knew the truth, then lost it" needs that sign), while
    # the margin of the model's own token is never negative there (the last-layer lens is the model).
    from vrp_eval.data import load_examples
    from vrp_eval.loading import load_model
    from vrp_eval.probe import ProbeSettings, run_probe

    loaded = load_model("tiny-llava", device="cpu")
    examples = load_examples("vrp-synth", "validation", 48)
    report = run_probe(loaded, ProbeSettings(signals=("logit_lens",), batch_size=16), examples=examples, progress=False)
    wrong = [r for r in report.records if r.score == 0]  # no human gave this answer
    agree = [r for r in report.records if r.answer == _most_frequent(examples, r.question_id)]
    assert len(wrong) >= 3 and len(agree) >= 20
    for record in wrong:
        assert record.logit_lens_margin[-1] < 0 <= record.logit_lens_margin_predicted[-1]
    for record in agree:  # the same token: the same numbers, bit for bit
        assert record.logit_lens_margin == record.logit_lens_margin_predicted


def _most_frequent(examples, question_id):
    from collections import Counter

    from vrp_eval.vqa import normalize_answer

    (example,) = [e for e in examples if e.question_id == question_id]
    return Counter(normalize_answer(a) for a in example.answers).most_common(1)[0][0]


def test_self_consistency(loaded, batch):
    greedy = [a.text for a in generate_answers(loaded, batch, max_new_tokens=3)]
    state = torch.random.get_rng_state()
    # Near-zero temperature: every sample is the greedy answer.
    assert self_consistency(loaded, batch, k=3, temperature=1e-4, max_new_tokens=3) == [1.0] * 3
    hot_a = self_consistency(loaded, batch, k=4, temperature=5.0, top_p=1.0, seed=1, max_new_tokens=3,
                             greedy_answers=greedy)
    hot_b = self_consistency(loaded, batch, k=4, temperature=5.0, top_p=1.0, seed=1, max_new_tokens=3,
                             greedy_answers=greedy)
    assert hot_a == hot_b and all(0.0 <= x <= 1.0 for x in hot_a)
    assert min(hot_a) < 1.0, "a hot sampler disagrees with greedy sometimes"
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG is left untouched"


# --- hand-computed values --------------------------------------------------------------------------
def test_sharpness_of_hand_built_rows():
    # float64 round-off of a handful of logs and sums (measured exact): 1e-12 leaves 1e4 ulp.
    assert float(sharpness_from_attention([0.0, 1.0, 0.0, 0.0])) == pytest.approx(1.0, rel=1e-12)
    assert float(sharpness_from_attention([0.25] * 4)) == pytest.approx(0.0, abs=1e-12)
    # p = (1/2, 1/4, 1/4, 0): H = 1.5 ln 2, S = 1 - 1.5 ln 2 / ln 4 = 0.25 (unnormalised input)
    assert float(sharpness_from_attention([0.2, 0.1, 0.1, 0.0])) == pytest.approx(0.25, rel=1e-12)
    assert spatial_entropy(np.full((6, 6), 0.3)) == pytest.approx(math.log(36), rel=1e-12)
    assert spatial_entropy(np.eye(1, 36).reshape(6, 6)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 image tokens"):
        sharpness_from_attention([1.0])


def test_cluster_count_of_hand_built_maps():
    two = np.zeros((10, 10))
    two[1:3, 1:3] = 1.0
    two[6, 6:9] = 0.9
    two[7, 7] = 0.9  # top 10 patches = a 2x2 blob and a 4-patch blob far apart
    assert cluster_count(two) == 2
    one = np.zeros((10, 10))
    one[4:6, 3:8] = 1.0
    assert cluster_count(one) == 1
    scattered = np.zeros((10, 10))
    for r, c in [(0, 0), (0, 5), (0, 9), (3, 2), (3, 7), (6, 0), (6, 5), (9, 2), (9, 6), (9, 9)]:
        scattered[r, c] = 1.0
    assert cluster_count(scattered) == 0  # isolated patches are DBSCAN noise


def test_recorder_on_a_hand_built_row():
    # One head, d = 1, query = 1, scaling = 1: the logits are the keys. Keys: pad, text, 4 image
    # patches (a 2x2 grid), last. Attention over the non-pad keys: text 0.1, image (0.4, 0.2, 0.1,
    # 0.1), last 0.1 -> mass 0.8, p = (1/2, 1/4, 1/8, 1/8), H = 1.75 ln 2, S = 1 - 1.75/2 = 0.125.
    a = torch.tensor([1.0, 0.1, 0.4, 0.2, 0.1, 0.1, 0.1])
    key = a.log().view(1, 1, 7, 1)
    query = torch.ones(1, 1, 7, 1)
    mask = torch.zeros(1, 1, 7, 7)
    mask[..., 0] = torch.finfo(torch.float32).min
    image = torch.tensor([[False, False, True, True, True, True, False]])
    recorder = SharpnessRecorder(image, grids=[(2, 2)], num_layers=2)
    recorder.observe(1, query, key, mask, 1.0, torch.nn.Identity())
    recorder.observe(1, query[:, :, -1:] * 5, key, None, 1.0, torch.nn.Identity())  # a decoding step
    (sig,) = recorder.signals()
    # The recorder's logits are float32 (0.1 and its log round at 6e-8 relative): pytest's default
    # rel=1e-6 is ~15 float32 ulp; measured <= 5e-9 relative.
    assert sig.sharpness == pytest.approx(0.125)
    assert sig.sharpness_per_layer == [None, pytest.approx(0.125)]
    assert sig.image_attention_mass == pytest.approx(0.8)
    assert sig.spatial_entropy == pytest.approx(1.75 * math.log(2))
    assert sig.cluster_count == 0  # top 10% of 4 patches = 1 patch < min_samples


def test_token_confidence():
    assert token_confidence([0.5, 0.25]) == pytest.approx(-1.5 * math.log(2), rel=1e-12)  # float64 logs and a mean
    assert token_confidence([1.0]) == 0.0
    assert math.isnan(token_confidence([]))


# --- figures -----------------------------------------------------------------------------------------
def test_attention_and_tracing_figures(tmp_path):
    from vrp_eval.plots import ie_curves, sharpness_scatter, trace_heatmap

    ie = {"image": [0.5, 0.4, 0.1, 0.0], "text": [0.0, 0.05, 0.0, 0.0], "last": [0.0, 0.1, 0.4, 0.5]}
    paths = [
        trace_heatmap(ie, tmp_path / "trace.png", title="tiny"),
        ie_curves(ie, tmp_path / "ie.png", integration_layer=2, circuit=[1, 2]),
        sharpness_scatter([0.1, 0.5, None, 0.9], [0.2, 0.6, 0.5, 0.95], [1, 0, 1, 1], tmp_path / "s.png"),
        sharpness_scatter([0.1, 0.5, 0.7], [0.2, 0.6, 0.5], [0.3, 0.6, 1.0], tmp_path / "graded.png"),
    ]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300
    with pytest.raises(ValueError, match="one IE value per layer"):
        trace_heatmap({"image": [0.1, 0.2], "last": [0.1]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="one value per sample"):
        sharpness_scatter([0.1], [0.2, 0.3], [1, 0], tmp_path / "bad.png")
