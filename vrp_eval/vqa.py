"""Per-sample answer scores: the official VQAv2 accuracy, exact match and multiple-choice option match.

VQAv2 accuracy (Antol et al. 2015; the official `vqaEval.py`): normalise the prediction and each
of the 10 human answers; for each human answer, leave it out and score
min(1, #matches among the other 9 / 3); average the 10 scores. 1 / 2 / 3 / >=4 matching humans
give 0.3 / 0.6 / 0.9 / 1.0.

Normalisation: newlines and tabs become spaces, strip; then the official `processPunctuation`
(each of ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! is deleted when it touches a space or the text
has a digit,digit comma, otherwise replaced by a space; a period not followed by a digit is
deleted) and `processDigitArticle` (lowercase, number words zero..ten and "none" to digits,
drop a / an / the, restore contractions such as "dont" -> "don't"). These two steps are reused
from lmms-eval's `EvalAIAnswerProcessor` (`lmms_eval.tasks._task_utils.vqa_eval_metric`), whose
methods are verbatim ports of the official code, including its quirks (the period regex's
lookbehind typo, `re.UNICODE` passed as a count).

Deviations, both shared with lmms-eval's own `vqav2_process_results`, so vrp-eval and lmms-eval
report the same number:
- The processor's `__call__` is *not* used: its extra `word_tokenize` step (drop all commas and
  question marks, split "'s") is not part of the official evaluation.
- The official script normalises only when the 10 human answers are not all identical; we
  always normalise. They differ only when every annotator gave the same answer and the raw
  prediction differs from it before normalisation (e.g. prediction "Two." against ten "2":
  official 0.0, here 1.0).
- Leave-one-out is by position, so duplicate human answers are each left out once (the official
  script compares answer dicts that differ by `answer_id`, which amounts to the same).

The processor's module is loaded from its file, not through `import lmms_eval` (which pulls in
torch and takes seconds): the module itself needs only `re`. Where lmms-eval is not installed (a
metric Space built by `vrp-eval space build`, which carries a copy of that one MIT-licensed file
beside this module), the copy is used. The processor is built once.
"""
from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["exact_match", "normalize_answer", "option_match", "vqa_accuracy"]


#: lmms-eval's answer-processor module, relative to the lmms_eval package folder.
UPSTREAM_PROCESSOR = Path("tasks", "_task_utils", "vqa_eval_metric.py")
#: The copy a slim Space carries beside this module (see vrp_eval.spaces).
VENDORED_PROCESSOR = Path(__file__).with_name("_lmms_eval_vqa_eval_metric.py")


def upstream_processor_file() -> Path | None:
    """lmms-eval's `vqa_eval_metric.py` where lmms-eval is installed (found without importing it)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / UPSTREAM_PROCESSOR
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def _answer_processor():
    path = upstream_processor_file() or (VENDORED_PROCESSOR if VENDORED_PROCESSOR.is_file() else None)
    if path is None:
        raise ImportError("the VQAv2 answer normalisation comes from lmms-eval, which is not installed: "
                          "`pip install vrp-eval` (or `pip install lmms-eval`).")
    spec = importlib.util.spec_from_file_location("_vrp_vqa_eval_metric", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EvalAIAnswerProcessor()


def normalize_answer(s: str) -> str:
    """The official VQAv2 answer normalisation ("Two dogs." -> "2 dogs", "dont" -> "don't")."""
    if not isinstance(s, str):
        raise TypeError(f"an answer must be a string, got {type(s).__name__}: {s!r}.")
    processor = _answer_processor()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return processor.process_digit_article(processor.process_punctuation(s))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQAv2 soft accuracy of `prediction` against the human `answers` (10 in VQAv2)."""
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(
            "answers must be the list of human answers (10 strings in VQAv2), "
            f"got {type(answers).__name__}: {answers!r}."
        )
    if len(answers) < 2:
        raise ValueError(
            f"VQA accuracy needs the human answers (10 in VQAv2) to leave one out; got {len(answers)}. "
            "For single-reference data use exact_match."
        )
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - matched) / 3.0) for matched in matches) / len(answers)


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    if isinstance(references, str):
        references = [references]
    if len(references) == 0:
        raise ValueError("exact_match needs at least one reference answer.")
    predicted = normalize_answer(prediction)
    return float(any(normalize_answer(reference) == predicted for reference in references))


# A letter alone ("B", "b", "(B)", "[B]", "B.", "B)", "B:"), or followed by the option text after a
# delimiter ("B. blue", "(B) blue"), optionally after "answer:" / "the answer is".
_OPTION = re.compile(
    r"""^\s*(?:(?:the\s+)?(?:correct\s+)?(?:answer|option)\s*(?:is|:)?\s*)?
        (?:[(\[]\s*(?P<bracketed>[a-z])\s*[)\]]   # (B) / [B], anything may follow
          |(?P<plain>[a-z])(?=\s*$|\s*[.:)]))     # B, or B followed by . : )
    """,
    re.IGNORECASE | re.VERBOSE,
)


def option_match(prediction: str, letter: str) -> float:
    """1.0 when a multiple-choice answer picks option `letter`, else 0.0.

    Accepts "B", "b", "(B)", "B.", "B)", "B. blue", "(B) blue", "Answer: B", "The answer is B".
    A word that merely starts with the letter ("a dog", "Blue") does not count.
    """
    if not isinstance(letter, str) or len(letter.strip()) != 1 or not letter.strip().isalpha():
        raise ValueError(f"letter must be a single option letter such as 'B', got {letter!r}.")
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}: {prediction!r}.")
    match = _OPTION.match(prediction)
    if match is None:
        return 0.0
    chosen = match.group("bracketed") or match.group("plain")
    return float(chosen.upper() == letter.strip().upper())
