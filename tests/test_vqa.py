"""vrp_eval.vqa against lmms-eval's own VQAv2 scoring and hand values."""
import copy

import pytest

from vrp_eval.vqa import exact_match, normalize_answer, option_match, vqa_accuracy

TRICKY_PREDICTIONS = [
    "Two.", "the 2 dogs", "yes!", "don't", "dont", "Yes", "2", "two dogs", "2.5", "3,000", "3000",
    "a man's hat", " red\tand\nwhite ", "none", "0", "t-shirt", "t shirt", "(yes)", "No.", "ten",
    "an apple", "Apple", "it's", "its", "1.", "red,white", "hat?",
]

HUMAN_ANSWER_SETS = [
    ["2"] * 4 + ["two"] * 3 + ["2 dogs", "two dogs", "3"],
    ["yes"] * 10,
    ["Yes"] * 2 + ["yes!"] + ["no"] * 7,
    ["don't", "dont", "do not", "don't", "no", "dont", "don't", "not sure", "no", "don't"],
    ["2.5", "2.5", "2,5", "3,000", "3000", "3000", "three thousand", "2.5", "3,000", "3 000"],
    ["man's hat", "a man's hat", "hat", "hat", "the hat", "cap", "hat", "mans hat", "hat", "hat"],
    ["red and white", "red white", "red/white", "red and white", "white", "red", "red and white",
     "red & white", "red and white", "red, white"],
    ["0", "none", "zero", "0", "0", "no", "none", "0", "nothing", "0"],
    ["t-shirt", "t shirt", "tshirt", "shirt", "t-shirt", "t shirt", "t-shirt", "tee", "shirt", "t-shirt"],
    ["apple", "an apple", "apples", "apple", "fruit", "apple", "Apple", "apple", "red apple", "apple"],
    ["it's", "its", "it is", "it's", "its", "it's", "yes", "it's", "its", "it's"],
    ["1", "1.", "one", "1", "1", "one", "2", "1", "1", "1"],
]


@pytest.fixture(scope="module")
def lmms_vqav2_score():
    """lmms-eval's own per-sample VQAv2 scoring (it mutates the doc, so hand it a copy)."""
    from lmms_eval.tasks.vqav2.utils import vqav2_process_results

    def score(prediction, answers):
        doc = {
            "question_id": 1,
            # answer_id makes each human answer distinct, as in the VQAv2 annotations, so that
            # lmms-eval's `item != gtAnsDatum` leaves exactly one answer out
            "answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"} for i, a in enumerate(answers)],
        }
        return vqav2_process_results(copy.deepcopy(doc), [prediction])["exact_match"]

    return score


@pytest.mark.parametrize("answers", HUMAN_ANSWER_SETS, ids=lambda a: a[0])
def test_vqa_accuracy_matches_lmms_eval_on_tricky_answers(answers, lmms_vqav2_score):
    ours = [vqa_accuracy(p, answers) for p in TRICKY_PREDICTIONS]
    theirs = [lmms_vqav2_score(p, answers) for p in TRICKY_PREDICTIONS]
    # Same leave-one-out mean of min(1, matches / 3) over 10 subsets, summed in another order: float64
    # round-off of 10 terms (measured <= 2.2e-16, 1 ulp); any scoring difference is >= 0.03.
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert len(set(theirs)) > 1  # the set separates predictions, so agreement is informative


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out_values(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)  # float64 mean of 10 thirds


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two.", "2"),
        ("the 2 dogs", "2 dogs"),
        ("yes!", "yes"),
        ("don't", "don't"),
        ("dont", "don't"),
        ("An Apple", "apple"),
        ("3,000", "3000"),
        ("2.5", "2.5"),
        ("red\tand\nwhite ", "red and white"),
        ("t-shirt", "t shirt"),
        ("none", "0"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_unanimous_answers_are_normalised_too():
    # Documented deviation from the official script (shared with lmms-eval): it would score 0 here.
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0


def test_vqa_accuracy_rejects_bad_answers():
    with pytest.raises(TypeError, match="list of human answers"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(ValueError, match="got 1"):
        vqa_accuracy("yes", ["yes"])
    with pytest.raises(TypeError, match="must be a string"):
        vqa_accuracy(None, ["yes", "no"])


def test_exact_match():
    assert exact_match("Two.", "2") == 1.0
    assert exact_match("the cat", ["dog", "Cat"]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0
    with pytest.raises(ValueError, match="at least one reference"):
        exact_match("cat", [])


@pytest.mark.parametrize(
    "prediction",
    ["B", "b", "(B)", "(b)", "[B]", "B.", "B)", "B:", " B ", "B. blue", "(B) blue", "Answer: B",
     "The answer is B.", "answer B"],
)
def test_option_match_accepts_letter_forms(prediction):
    assert option_match(prediction, "B") == 1.0
    assert option_match(prediction, "C") == 0.0


@pytest.mark.parametrize("prediction", ["Blue", "a dog", "", "BC", "b blue", "The answer is blue"])
def test_option_match_rejects_words(prediction):
    assert option_match(prediction, "B") == 0.0
    assert option_match(prediction, "A") == 0.0


def test_option_match_word_starting_with_the_letter_is_not_the_option():
    assert option_match("A. a dog", "A") == 1.0
    assert option_match("a dog", "A") == 0.0


def test_option_match_validates_the_letter():
    with pytest.raises(ValueError, match="single option letter"):
        option_match("B", "BB")
    with pytest.raises(ValueError, match="single option letter"):
        option_match("B", "1")
