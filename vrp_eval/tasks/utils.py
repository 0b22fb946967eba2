"""The functions behind the vrp_* task YAMLs.

Prompts, visuals and answer scoring are the upstream lmms-eval tasks' own (imported, not copied);
`vrp_eval.lmms.process_results` hands them the plain answer (the part of a `--model vrp` response
before its record) and adds one value per reliability metric; the aggregations below all read one
`aggregation.aggregate` over the task's samples (see vrp_eval/lmms.py).
"""
from functools import partial

from lmms_eval.tasks.ok_vqa.utils import ok_vqa_process_results as _ok_vqa_score
from lmms_eval.tasks.pope.utils import pope_process_results as _pope_score
from lmms_eval.tasks.scienceqa.utils import sqa_process_results
from lmms_eval.tasks.vqav2.utils import vqav2_process_results as _vqav2_score

from vrp_eval import lmms
from vrp_eval.data import OPTION_LETTERS
from vrp_eval.vqa import normalize_answer, option_match


def _vqav2_accuracy(doc, results):
    # The upstream scorer normalises doc["answers"] in place and tells the 10 human answers apart by
    # their answer_id: score a copy, numbered when a local file has no ids.
    answers = [{**answer, "answer_id": answer.get("answer_id", i)} for i, answer in enumerate(doc["answers"])]
    return _vqav2_score({**doc, "answers": answers}, results)


def _ok_vqa_accuracy(doc, results):
    return _ok_vqa_score({**doc, "answers": list(doc["answers"])}, results)  # scored in place upstream


def synth_mc_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """vrp-synth-mc asked as an open question: under the default `mc_scoring=likelihood` the options
    are scored as answers, not listed (what `vrp-eval run --dataset vrp-synth-mc` asks)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def synth_mc_doc_to_target(doc):
    return doc["choices"][doc["answer"]]


def _option_accuracy(doc, results):
    """1 when the answer names the correct option: its text (after VQA normalisation) or its letter."""
    answer, gold = results[0], doc["choices"][doc["answer"]]
    right = normalize_answer(answer) == normalize_answer(gold) or option_match(answer, OPTION_LETTERS[doc["answer"]])
    return {"exact_match": float(right)}


def _pope_accuracy(doc, results):
    scored = _pope_score(doc, results)
    return {"score": scored["pope_accuracy"]["score"], **scored}


POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")


def _for(task, score, score_key, **kwargs):
    """`process_results` of `task`: its name tells its records apart from another task's on the same rows."""
    return partial(lmms.process_results, score=score, score_key=score_key, task=task, **kwargs)


vqav2_process_results = _for("vrp_vqav2", _vqav2_accuracy, "exact_match")
vqav2_lite_process_results = _for("vrp_vqav2_lite", _vqav2_accuracy, "exact_match")
synth_process_results = _for("vrp_synth", _vqav2_accuracy, "exact_match")
ok_vqa_process_results = _for("vrp_okvqa", _ok_vqa_accuracy, "exact_match")
scienceqa_process_results = _for("vrp_scienceqa_img", sqa_process_results, "exact_match")
synth_mc_process_results = _for("vrp_synth_mc", _option_accuracy, "exact_match")
pope_process_results = _for("vrp_pope", _pope_accuracy, "score", extra_metrics=POPE_METRICS)


# One aggregation per reliability metric, named as the metric (lmms.RELIABILITY_METRICS, from the metric
# table): what the YAMLs' `aggregation: !function utils.<name>` finds.
globals().update({name: lmms.reliability_aggregation(name) for name in lmms.RELIABILITY_METRICS})
