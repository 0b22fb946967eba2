"""The shipped zoo: real transformers classes through the Auto classes, offline, and the accuracy each
model's training report states, reproduced on a fixed validation slice."""
import json

import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vrp_eval import synth
from vrp_eval.adapters import DEFAULT_POST_PROMPT
from vrp_eval.generation import generate_answers
from vrp_eval.loading import load_model
from vrp_eval.zoo import TEXT_FAMILY, ZOO, zoo_path

MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "paligemma": "PaliGemmaForConditionalGeneration",
                 "qwen2vl": "Qwen2VLForConditionalGeneration"}
#: The zoo's VLMs (its text model is tested with the lm-eval glue, tests/test_lm_eval.py).
VLMS = sorted(name for name, family in ZOO.items() if family != TEXT_FAMILY)
#: Validation exact match each model has been trained past (its report must keep it there).
ZOO_BARS = {"tiny-llava": 0.80, "tiny-paligemma": 0.75, "tiny-qwen2vl": 0.75}


@pytest.fixture(scope="module")
def validation_slice():
    return synth.generate("validation", n=200)


@pytest.mark.parametrize("name", VLMS)
def test_zoo_folder_loads_through_the_auto_classes(name):
    path = zoo_path(name)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert type(model).__name__ == MODEL_CLASSES[ZOO[name]]
    assert len(model.model.language_model.layers) >= 8
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) in ("<image>", "<|image_pad|>")
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 8 * 1024 * 1024, f"{name} is {size} bytes; the whole zoo must stay under 25 MB"


def _exact_match(loaded, records, blank=False):
    adapter = loaded.adapter
    hits = 0
    for start in range(0, len(records), 50):
        chunk = records[start:start + 50]
        images = [Image.new("RGB", (64, 64), (240, 240, 240)) if blank else r["image"] for r in chunk]
        batch = adapter.encode(images, [adapter.build_prompt(r["question"] + DEFAULT_POST_PROMPT) for r in chunk])
        answers = generate_answers(loaded, batch, max_new_tokens=4)
        hits += sum(a.text == r["multiple_choice_answer"] for a, r in zip(answers, chunk))
    return hits / len(records)


@pytest.mark.parametrize("name", VLMS)
def test_zoo_model_reaches_its_stated_accuracy_and_uses_the_image(name, validation_slice):
    report = json.loads((zoo_path(name) / "training_report.json").read_text())
    loaded = load_model(name, device="cpu")
    accuracy = _exact_match(loaded, validation_slice)
    # The report measured the first 500 validation items; 200 of them agree within sampling noise: a
    # 200-of-500 subset mean has SE sqrt(p (1 - p) (1/200 - 1/500)) <= 0.027, so 0.08 is ~3 SE
    # (measured off by 0.012, 0.000, 0.023 for llava, paligemma, qwen2vl: <= 1.1 SE). The slice is fixed: that error is a constant.
    assert accuracy == pytest.approx(report["val_exact_match"], abs=0.08)
    # Chance on this data is about 0.3 (yes/no, left/right, 3 shapes, 4 colours, 5 counts): the models
    # answer from the image, and a blank image costs them most of their accuracy.
    assert accuracy > 0.45
    if name in ZOO_BARS:
        # The bar each model has reached, on the report's 500 items, and 0.05 lower on this slice (about
        # 2 SE of a 200-of-500 subset mean, above): the default model's (foundation issue) 0.80, report 0.822;
        # issue 17's 0.75 for the other families, reports tiny-paligemma 0.770 and tiny-qwen2vl 0.812.
        bar = ZOO_BARS[name]
        assert report["val_exact_match"] >= bar and accuracy >= bar - 0.05, (report["val_exact_match"], accuracy)
    # Measured on this slice: tiny-llava 0.81 vs 0.39 blank, tiny-paligemma 0.77 vs 0.41, tiny-qwen2vl 0.83 vs 0.40.
    assert _exact_match(loaded, validation_slice, blank=True) < accuracy - 0.10


def test_train_tiny_builds_a_model_then_a_further_stage_continues_it(tmp_path):
    """`vrp-eval train-tiny` with custom sizes, then `--init-from` that folder: the second stage starts
    from the first stage's weights, keeps its sizes and records it in `stages`."""
    import torch

    from vrp_eval.cli import main

    small = ["--layers", "2", "--hidden-size", "32", "--intermediate-size", "64", "--heads", "2",
             "--vision-layers", "1", "--vision-hidden", "32", "--n-train", "64", "--epochs", "2", "--threads", "1"]
    first, second = tmp_path / "stage1", tmp_path / "stage2"
    assert main(["train-tiny", "--family", "llava", *small, "--output", str(first)]) == 0
    report = json.loads((first / "training_report.json").read_text())
    assert report["steps_done"] == 2 and report["spec"]["hidden_size"] == 32 and report["stages"] == []
    loaded = load_model(str(first), device="cpu")
    assert loaded.adapter.num_layers == 2 and loaded.model.config.vision_config.hidden_size == 32

    assert main(["train-tiny", "--family", "llava", "--init-from", str(first), "--n-train", "64", "--train-start", "64",
                 "--epochs", "1", "--eval-every", "1", "--lr", "1e-2", "--threads", "1", "--output", str(second)]) == 0
    again = json.loads((second / "training_report.json").read_text())
    assert again["init_from"] == str(first) and again["spec"]["hidden_size"] == 32
    assert (report["train_start"], again["train_start"]) == (0, 64)  # the second stage's 64 items are unseen
    assert [stage["steps_done"] for stage in again["stages"]] == [2] and again["steps_done"] == 1
    before = AutoModelForImageTextToText.from_pretrained(first).state_dict()
    after = AutoModelForImageTextToText.from_pretrained(second).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # trained further
    # Continued, not rebuilt from the defaults (width 64): the saved model has the first stage's sizes.
    assert AutoModelForImageTextToText.from_pretrained(second).config.text_config.hidden_size == 32

    # A file-system error: one line and exit code 2 at the CLI boundary, the traceback with --debug.
    assert main(["train-tiny", "--family", "llava", "--init-from", str(tmp_path / "missing"), "--output", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="--train-start"):
        main(["--debug", "train-tiny", "--family", "llava", "--train-start", "-5", "--output", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["--debug", "train-tiny", "--family", "llava", "--init-from", str(tmp_path / "missing"),
              "--output", str(tmp_path)])
