"""vrp-synth: deterministic, schema-correct, true to its scenes, readable by datasets and lmms-eval."""
import copy
import hashlib
import json
import re
from collections import Counter

import pytest

from vrp_eval import synth

N_VAL = 1000


@pytest.fixture(scope="module")
def validation():
    return synth.generate("validation", n=N_VAL)


@pytest.fixture(scope="module")
def validation_mc():
    return synth.generate("validation", n=200, flavour="mc")


def _image_hash(record):
    return hashlib.sha256(record["image"].tobytes()).hexdigest()


def _plain(record):
    return {k: v for k, v in record.items() if k != "image"}


def _normalise(answer):
    # The official VQA normalisation, as lmms-eval ships it (the oracle our answers are scored by).
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

    processor = EvalAIAnswerProcessor()
    return processor.process_digit_article(processor.process_punctuation(answer))


# determinism and splits


def test_same_seed_gives_identical_records_and_images(validation):
    again = synth.generate("validation", n=60)
    assert [_plain(r) for r in again] == [_plain(r) for r in validation[:60]]
    assert [r["image"].tobytes() for r in again] == [r["image"].tobytes() for r in validation[:60]]


def test_a_start_index_gives_the_same_items_as_a_longer_prefix(validation):
    """`start` continues the split: a later training stage's range holds no item of an earlier one."""
    later = synth.generate("validation", n=20, start=40)
    assert [_plain(r) for r in later] == [_plain(r) for r in validation[40:60]]
    assert [r["image"].tobytes() for r in later] == [r["image"].tobytes() for r in validation[40:60]]
    assert {r["question_id"] for r in later}.isdisjoint(r["question_id"] for r in validation[:40])


def test_another_seed_gives_other_items(validation):
    other = synth.generate("validation", n=60, seed=7)
    assert {_image_hash(r) for r in other}.isdisjoint(_image_hash(r) for r in validation[:60])
    assert [r["question_id"] for r in other] == [r["question_id"] for r in validation[:60]]


def test_splits_share_no_image_and_no_question_id(validation):
    test = synth.generate("test")
    train = synth.generate("train", n=2000)
    assert len(test) == synth.DEFAULT_SIZES["test"] == 1000
    splits = {"validation": validation, "test": test, "train": train}
    hashes = {name: {_image_hash(r) for r in rows} for name, rows in splits.items()}
    ids = {name: {r["question_id"] for r in rows} for name, rows in splits.items()}
    for name, rows in splits.items():
        assert len(ids[name]) == len(rows), f"question ids repeat inside {name}"
        assert len(hashes[name]) == len(rows), f"images repeat inside {name}"
    for a, b in (("validation", "test"), ("validation", "train"), ("test", "train")):
        assert hashes[a].isdisjoint(hashes[b]), f"{a} and {b} share an image"
        assert ids[a].isdisjoint(ids[b]), f"{a} and {b} share a question id"


# schema

VQA_FIELDS = {"question_id", "image_id", "question", "image", "answers", "multiple_choice_answer", "answer_type",
              "question_type", "difficulty", "hard_reason", "scene"}


def test_vqa_records_follow_the_vqav2_schema(validation):
    for r in validation:
        assert set(r) == VQA_FIELDS
        assert isinstance(r["question_id"], int) and r["question_id"] == r["image_id"] * 1000
        assert r["image"].mode == "RGB" and r["image"].size == (64, 64)
        assert r["question"].endswith("?") and r["question"][0].isupper()
        assert [a["answer_id"] for a in r["answers"]] == list(range(1, 11))
        assert all(set(a) == {"answer", "answer_confidence", "answer_id"} for a in r["answers"])
        assert {a["answer_confidence"] for a in r["answers"]} <= {"yes", "maybe", "no"}
        assert r["multiple_choice_answer"] in synth.ANSWER_SET
        # VQAv2's multiple_choice_answer is the annotators' most frequent (normalised) answer.
        said = Counter(_normalise(a["answer"]) for a in r["answers"])
        assert said.most_common(1)[0][0] == r["multiple_choice_answer"]
        assert said[r["multiple_choice_answer"]] >= 7
        expected_types = {"how many": "number", "is there a": "yes/no", "is the": "yes/no"}
        assert r["answer_type"] == expected_types.get(r["question_type"], "other")
        assert r["question"].lower().startswith(r["question_type"])
        assert (r["difficulty"], bool(r["hard_reason"])) in {("normal", False), ("hard", True)}
        assert r["hard_reason"] in ("", *synth.HARD_REASONS)


def test_answers_show_human_variation(validation):
    raw = Counter(a["answer"] for r in validation for a in r["answers"])
    for variant in ("two", "Yes", "a circle", "orange", "purple"):
        assert raw[variant] > 0, variant
    assert sum(len({a["answer"] for a in r["answers"]}) > 1 for r in validation) > 0.2 * N_VAL


def test_mc_flavour_matches_the_vqa_items(validation, validation_mc):
    by_id = {r["question_id"]: r for r in validation}
    lengths = Counter()
    for r in validation_mc:
        vqa = by_id[r["question_id"]]
        assert r["question"] == vqa["question"] and r["image"].tobytes() == vqa["image"].tobytes()
        assert 2 <= len(r["choices"]) <= 5 and len(set(r["choices"])) == len(r["choices"])
        assert isinstance(r["answer"], int) and r["choices"][r["answer"]] == vqa["multiple_choice_answer"]
        assert r["hint"] == r["subject"] == r["lecture"] == ""
        assert {"answers", "multiple_choice_answer"}.isdisjoint(r)
        lengths[len(r["choices"])] += 1
    assert set(lengths) == {2, 3, 4, 5}
    positions = Counter(r["answer"] for r in validation_mc if len(r["choices"]) == 2)
    assert min(positions.values()) > 0.3 * sum(positions.values()), "choices are not shuffled"


# the answers are true of the scene, and the scene is what the image shows

QUESTION_PATTERNS = [
    (re.compile(r"What color is the (\w+)\?"), "colour"),
    (re.compile(r"What shape is the (\w+) object\?"), "shape"),
    (re.compile(r"How many (\w+)s are there\?"), "count_shape"),
    (re.compile(r"How many (\w+) objects are there\?"), "count_colour"),
    (re.compile(r"Is there a (\w+) (\w+)\?"), "exist"),
    (re.compile(r"Is the (\w+) (\w+) to the (left|right) of the (\w+) (\w+)\?"), "relation"),
    (re.compile(r"Which side is the (\w+) on\?"), "side"),
]


def _true_answer(question, objects):
    for pattern, kind in QUESTION_PATTERNS:
        match = pattern.fullmatch(question)
        if match:
            break
    else:
        raise AssertionError(f"unparsed question {question!r}")
    g = match.groups()

    def only(pred):
        found = [o for o in objects if pred(o)]
        assert len(found) == 1, f"{question!r}: {len(found)} objects fit, the question needs exactly one"
        return found[0]

    if kind == "colour":
        return only(lambda o: o["shape"] == g[0])["color"]
    if kind == "shape":
        return only(lambda o: o["color"] == g[0])["shape"]
    if kind == "count_shape":
        return str(sum(o["shape"] == g[0] for o in objects))
    if kind == "count_colour":
        return str(sum(o["color"] == g[0] for o in objects))
    if kind == "exist":
        return "yes" if any((o["color"], o["shape"]) == g for o in objects) else "no"
    if kind == "relation":
        a = only(lambda o: (o["color"], o["shape"]) == g[:2])
        b = only(lambda o: (o["color"], o["shape"]) == g[3:])
        assert abs(a["x"] - b["x"]) >= 10, "relation too close to call"
        return "yes" if (a["x"] < b["x"]) == (g[2] == "left") else "no"
    x = only(lambda o: o["shape"] == g[0])["x"]
    assert abs(x - 32) >= 5, "side too close to call"
    return "left" if x < 32 else "right"


def test_every_canonical_answer_is_true_of_its_scene(validation):
    for r in validation:
        objects = json.loads(r["scene"])["objects"]
        assert _true_answer(r["question"], objects) == r["multiple_choice_answer"], r["question_id"]


def test_the_image_shows_the_scene(validation):
    checked = 0
    for r in validation[:300]:
        pixels = r["image"].load()
        for o in json.loads(r["scene"])["objects"]:
            if o["occluded"]:
                continue
            got = pixels[int(o["x"]), int(o["y"])]
            assert max(abs(a - b) for a, b in zip(got, o["rgb"])) <= 3, (r["question_id"], o, got)
            checked += 1
    assert checked > 500


def test_question_families_and_answers_are_balanced(validation):
    families = Counter({"is the": "spatial", "which side is the": "spatial"}.get(r["question_type"], r["question_type"])
                       for r in validation)
    assert len(families) == 5
    assert all(0.15 * N_VAL <= n <= 0.25 * N_VAL for n in families.values()), families
    yes_no = Counter(r["multiple_choice_answer"] for r in validation if r["answer_type"] == "yes/no")
    assert abs(yes_no["yes"] - yes_no["no"]) < 0.15 * sum(yes_no.values())
    counts = Counter(r["multiple_choice_answer"] for r in validation if r["answer_type"] == "number")
    assert set(counts) == set(synth.NUMBERS) and min(counts.values()) > 0.1 * sum(counts.values())


def test_hard_items_are_a_fifth_or_less_and_of_every_kind(validation):
    hard = [r for r in validation if r["difficulty"] == "hard"]
    assert 0.14 <= len(hard) / N_VAL <= 0.21
    assert set(Counter(r["hard_reason"] for r in hard)) == set(synth.HARD_REASONS)
    crowded = [len(json.loads(r["scene"])["objects"]) for r in hard if r["hard_reason"] == "crowded"]
    assert min(crowded) >= 5
    normal_sizes = [o["size"] for r in validation if r["difficulty"] == "normal"
                    for o in json.loads(r["scene"])["objects"]]
    small_sizes = [o["size"] for r in hard if r["hard_reason"] == "small" for o in json.loads(r["scene"])["objects"]]
    assert max(small_sizes) < min(normal_sizes)

    def disagreeing(rows):
        return sum(sum(_normalise(a["answer"]) != r["multiple_choice_answer"] for a in r["answers"])
                   for r in rows) / len(rows)

    assert disagreeing(hard) > 3 * disagreeing([r for r in validation if r["difficulty"] == "normal"])


# datasets and lmms-eval


def test_load_synth_is_a_dataset_with_an_image_feature():
    import datasets

    ds = synth.load_synth("validation", n=8)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 8 and ds.split == "validation"
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds[3]["answers"][0].keys() == {"answer", "answer_confidence", "answer_id"}
    mc = synth.load_synth("test", flavour="mc", n=4)
    assert mc.column_names[:4] == ["question_id", "image_id", "question", "image"] and "choices" in mc.features


@pytest.mark.parametrize("flavour", synth.FLAVOURS)
def test_parquet_and_disk_exports_round_trip(tmp_path, flavour):
    import datasets

    records = synth.generate("validation", n=12, flavour=flavour)
    path = synth.export("validation", tmp_path / "parquet", flavour=flavour, n=12)
    assert path == tmp_path / "parquet" / "validation.parquet"
    loaded = datasets.load_dataset("parquet", data_files={"validation": str(path)}, split="validation",
                                   cache_dir=str(tmp_path / "cache"))
    assert isinstance(loaded.features["image"], datasets.Image)
    disk = synth.export("validation", tmp_path / "disk", flavour=flavour, format="disk", n=12)
    for dataset in (loaded, datasets.load_from_disk(str(disk))):
        assert len(dataset) == 12
        for row, record in zip(dataset, records):
            assert row["image"].convert("RGB").tobytes() == record["image"].tobytes()
            assert _plain(row) == _plain(record)


def test_vocabulary_covers_every_question_and_answer(validation, validation_mc):
    vocabulary = synth.vocabulary()
    assert vocabulary == sorted(set(vocabulary)) == synth.vocabulary()
    assert all(w == w.lower() and " " not in w for w in vocabulary)
    assert {"?", "color", "how", "many", "left", "two", *synth.ANSWER_SET} <= set(vocabulary)
    rows = validation + synth.generate("train", n=2000)
    used = {t for r in rows for text in [r["question"], *(a["answer"] for a in r["answers"])]
            for t in synth.tokenize(text)}
    used |= {t for r in validation_mc for c in r["choices"] for t in synth.tokenize(c)}
    assert used <= set(vocabulary), used - set(vocabulary)
    assert synth.tokenize("Is there a red circle?") == ["is", "there", "a", "red", "circle", "?"]


@pytest.mark.parametrize("call, message", [
    (lambda: synth.generate("dev"), "train, validation, test"),
    (lambda: synth.generate("train", flavour="scienceqa"), "vqa, mc"),
    (lambda: synth.generate("train", n=0), "positive"),
    (lambda: synth.generate("test", n=-3), "positive"),
    (lambda: synth.generate("test", n=3, start=-1), "index >= 0"),
    (lambda: synth.load_synth("valid"), "train, validation, test"),
    (lambda: synth.export("test", "/nonexistent-never-written", format="csv"), "parquet, disk"),
])
def test_bad_input_is_a_value_error_naming_the_valid_choices(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_lmms_eval_vqav2_and_scienceqa_utils_read_our_records(tmp_path):
    import datasets

    vqav2 = pytest.importorskip("lmms_eval.tasks.vqav2.utils")
    scienceqa = pytest.importorskip("lmms_eval.tasks.scienceqa.utils")
    path = synth.export("validation", tmp_path / "vqa", n=40)
    rows = datasets.load_dataset("parquet", data_files={"validation": str(path)}, split="validation",
                                 cache_dir=str(tmp_path / "cache"))
    post = "\nAnswer the question using a single word or phrase."
    fractional = 0
    for doc in rows:
        assert vqav2.vqav2_doc_to_text(doc, {"pre_prompt": "", "post_prompt": post}) == doc["question"] + post
        assert vqav2.vqav2_doc_to_visual(doc)[0].size == (64, 64)
        canonical = vqav2.vqav2_process_results(copy.deepcopy(doc), [doc["multiple_choice_answer"]])
        assert canonical["exact_match"] == 1.0
        assert canonical["submission"]["question_id"] == doc["question_id"]
        assert vqav2.vqav2_process_results(copy.deepcopy(doc), ["giraffe"])["exact_match"] == 0.0
        for minority in {a["answer"] for a in doc["answers"]}:
            score = vqav2.vqav2_process_results(copy.deepcopy(doc), [minority])["exact_match"]
            fractional += 0 < score < 1
    assert fractional > 0, "no minority answer earns partial VQA credit"

    kwargs = {"format": "default", "pre_prompt": "", "post_prompt": "\nAnswer with the option's letter."}
    for doc in synth.generate("validation", n=10, flavour="mc"):
        text = scienceqa.sqa_doc_to_text(doc, kwargs)
        assert text.startswith(doc["question"] + "\nA. " + doc["choices"][0])
        letter = scienceqa.sqa_doc_to_target(doc)
        assert letter == "ABCDE"[doc["answer"]]
        assert scienceqa.sqa_process_results(doc, [letter])["exact_match"] == 1.0
