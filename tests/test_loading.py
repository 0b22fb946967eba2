"""The loader, the family adapters and batched generation, on random-init models of all three families
saved with `save_pretrained` (so the real Auto-class loading path runs, offline), and the zoo's text
model through the same loader."""
import pytest
import torch
from PIL import Image

from vrp_eval.adapters import (
    LlavaAdapter,
    PaliGemmaAdapter,
    Qwen2VLAdapter,
    TextAdapter,
)
from vrp_eval.generation import generate_answers
from vrp_eval.loading import ModelLoadError, load_model

FAMILY_ADAPTERS = {"llava": LlavaAdapter, "paligemma": PaliGemmaAdapter, "qwen2vl": Qwen2VLAdapter}


def _images():
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30)]
    images = []
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (64, 64), (245, 245, 245))
        image.paste(colour, (8 * i, 8, 8 * i + 24, 40))
        images.append(image)
    return images


QUESTIONS = ["what color is the circle?", "how many squares are there?",
             "is there a red triangle left of the blue circle?", "what?"]


@pytest.fixture(scope="module", params=["llava", "paligemma", "qwen2vl"])
def loaded(request, random_tiny_dirs):
    return load_model(str(random_tiny_dirs[request.param]), device="cpu")


def test_adapter_is_found_by_config_class(loaded, random_tiny_dirs):
    assert isinstance(loaded.adapter, FAMILY_ADAPTERS[loaded.adapter.family])
    assert loaded.adapter.num_layers == 8
    assert loaded.adapter.decoder_layers is loaded.model.model.language_model.layers
    assert loaded.adapter.bidirectional_prefix == (loaded.family == "paligemma")
    assert len(loaded.model_sha) == 64 and loaded.dtype == "float32"


def test_position_groups_partition_the_prompt(loaded):
    adapter = loaded.adapter
    batch = adapter.encode(_images(), [adapter.build_prompt(q) for q in QUESTIONS])
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    valid = batch["attention_mask"].bool()
    # 48x48 input: 36 image tokens per sample in every family, counted from the expanded ids.
    assert groups["image"].sum(1).tolist() == [36] * 4
    assert groups["last"].sum(1).tolist() == [1] * 4
    assert groups["last"][:, -1].all(), "left padding: the last prompt position is the last column"
    union = groups["image"] | groups["text"] | groups["last"]
    assert torch.equal(union, valid)
    assert not (groups["image"] & groups["text"]).any() and not (groups["text"] & groups["last"]).any()
    assert torch.equal(groups["all"], valid)
    # padding is on the left and excluded from every group
    lengths = valid.sum(1)
    assert lengths.min() < lengths.max(), "the prompts differ in length, so some rows are padded"
    assert adapter.image_grid(batch, 0) == (6, 6)


def test_selected_rows_equal_a_fresh_encoding(loaded):
    """`select_rows` (the discovery half of a batch) gives what encoding those samples alone gives:
    Qwen2-VL's pixel patches are one flat tensor split per image, padding columns are dropped."""
    adapter = loaded.adapter
    images, prompts = _images(), [adapter.build_prompt(q) for q in QUESTIONS]
    rows = [3, 1]
    selected = adapter.select_rows(adapter.encode(images, prompts), rows)
    fresh = adapter.encode([images[r] for r in rows], [prompts[r] for r in rows])
    assert selected.keys() == fresh.keys()
    for key in fresh:
        assert torch.equal(selected[key], fresh[key]), key


def test_batched_generation_with_padding_equals_one_at_a_time(loaded):
    adapter = loaded.adapter

    def encode(images, prompts):
        batch = adapter.encode(images, prompts)
        return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}

    images, prompts = _images(), [adapter.build_prompt(q) for q in QUESTIONS]
    # In float64, so that padding is tested, not round-off (in float32 padded and unpadded rows differ
    # by up to 5.2e-7 relative after 8 layers and 4 steps). The float64 logits agree to ~1e-15
    # (measured: identical), but generate_answers rounds them to float32 before its log-softmax, where
    # a logit on a rounding boundary could still flip by 1 ulp (6e-8 at |z| < 1): <= 2 ulp per step on
    # log p, <= 4.8e-7 relative over 4 steps, hence rel=1e-6. Relative, as these random-init
    # confidences are 1e-12 to 1e-7. float32 -> float64 -> float32 is exact: the model is restored.
    loaded.model.to(torch.float64)
    try:
        batched = generate_answers(loaded, encode(images, prompts), max_new_tokens=4)
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            single = generate_answers(loaded, encode([image], [prompt]), max_new_tokens=4)[0]
            assert single.token_ids == batched[i].token_ids
            assert single.text == batched[i].text
            assert single.confidence == pytest.approx(batched[i].confidence, rel=1e-6, abs=0)
            assert single.first_token_prob == pytest.approx(batched[i].first_token_prob, rel=1e-6, abs=0)
    finally:
        loaded.model.to(torch.float32)


def test_confidence_is_the_product_of_answer_token_probabilities(loaded):
    adapter = loaded.adapter
    out = generate_answers(loaded, adapter.encode(_images()[:1], [adapter.build_prompt(QUESTIONS[0])]),
                           max_new_tokens=3)[0]
    expected = 1.0
    for p in out.token_probs:
        expected *= p
    # float64 round-off: exp(sum of <= 3 logs) against their product, |log| <= 30 (measured 1.4e-15)
    assert out.token_probs and out.confidence == pytest.approx(expected, rel=1e-12)
    assert 0.0 < out.confidence <= out.first_token_prob <= 1.0
    assert out.confidence_length_norm == pytest.approx(expected ** (1 / len(out.token_probs)), rel=1e-12)


def test_unknown_hub_model_offline_names_the_fix():
    with pytest.raises(ModelLoadError, match="(?i)not in the local Hugging Face cache.*offline"):
        load_model("some-org/no-such-vlm")


def test_missing_local_folder():
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model("./does/not/exist")


def test_text_only_model_is_refused_clearly(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelLoadError, match="not a vision-language model"):
        load_model(str(tmp_path / "bert"))


def test_unknown_dtype():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model("tiny-llava", dtype="float8")


def test_one_loader_for_the_text_model():
    """The zoo's text model loads through `load_model` like the VLMs, with the text adapter, and the
    engine's hooks on it last only as long as their scope (none is installed for the model's life)."""
    from tracing_models import all_hooks

    from vrp_eval.intervention import estimate_sigma
    from vrp_eval.zoo import is_text_model, rebuild_command

    assert is_text_model("tiny-text-llama") and not is_text_model("tiny-llava")
    assert rebuild_command("tiny-text-llama") == "python -m vrp_eval.zoo.build_text"
    loaded = load_model("tiny-text-llama", device="cpu")
    assert isinstance(loaded.adapter, TextAdapter) and loaded.family == "text"
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.model_name == "tiny-text-llama"
    assert len(loaded.model_sha) == 64 and loaded.dtype == "float32"
    assert all_hooks(loaded.model) == 0
    batch = loaded.adapter.encode([None], ["There is a red circle. What color is the circle?"])
    sigma = estimate_sigma(loaded, batch)
    assert sigma.embedding["image"] > 0  # the subject's embeddings were seen
    assert all_hooks(loaded.model) == 0
