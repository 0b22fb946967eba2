# Copyright the vrp-eval contributors. Licensed under the Apache License, Version 2.0.
"""vrp_vqa_accuracy: the official VQAv2 accuracy with the official answer normalisation. A thin
wrapper: the maths lives in `vrp_eval.vqa`."""

import datasets
import evaluate

from vrp_eval.metric_table import evaluate_arguments
from vrp_eval.vqa import vqa_accuracy

_CITATION = """\
@inproceedings{antol2015vqa,
  title     = {{VQA}: Visual Question Answering},
  author    = {Antol, Stanislaw and Agrawal, Aishwarya and Lu, Jiasen and Mitchell, Margaret and Batra, Dhruv and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {International Conference on Computer Vision (ICCV)},
  year      = {2015}
}
@inproceedings{goyal2017making,
  title     = {Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author    = {Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle = {Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2017}
}
"""

_DESCRIPTION = """\
VQAv2 accuracy: the prediction and the 10 human answers are normalised (punctuation, lowercase,
number words to digits, articles dropped, contractions restored); for each human answer, leave it
out and score min(1, matches among the other 9 / 3); average. A prediction matching 1 / 2 / 3 /
4+ annotators scores 0.3 / 0.6 / 0.9 / 1.0. The reported accuracy is the mean over questions.
Like lmms-eval, answers are normalised even when all annotators agree (the official script skips
normalisation in that case).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the model's answer per question.
    references (`list` of `list` of `str`): the human answers per question (10 in VQAv2).
Returns:
    accuracy (`float`): mean VQA accuracy over the questions, in [0, 1].
Examples:
    >>> import evaluate
    >>> vrp_vqa_accuracy = evaluate.load("metrics/vrp_vqa_accuracy")
    >>> humans = ["2"] * 2 + ["two dogs"] * 8
    >>> results = vrp_vqa_accuracy.compute(predictions=["Two."], references=[humans])
    >>> print(round(results["accuracy"], 4))
    0.6
    >>> results = vrp_vqa_accuracy.compute(predictions=["Two.", "the 2 dogs"], references=[humans, humans])
    >>> print(round(results["accuracy"], 4))
    0.8
"""


# evaluate.combine passes every keyword to every module; accept the inputs and options of the
# sibling vrp_* modules (listed once, in vrp_eval.metric_table.EVALUATE_MODULES) silently, and reject
# anything else (a misspelt option must not pass).
_SIBLING_NAMES = evaluate_arguments()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VrpVqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            reference_urls=["https://visualqa.org/evaluation.html"],
        )

    def _compute(self, predictions, references, **other):
        unknown = sorted(set(other) - _SIBLING_NAMES)
        if unknown:
            raise TypeError(f"vrp_vqa_accuracy got unknown argument(s) {unknown}; it takes no options.")
        if not predictions:
            raise ValueError("predictions is empty: pass one answer string per question.")
        scores = [vqa_accuracy(prediction, list(answers)) for prediction, answers in zip(predictions, references)]
        return {"accuracy": sum(scores) / len(scores)}
