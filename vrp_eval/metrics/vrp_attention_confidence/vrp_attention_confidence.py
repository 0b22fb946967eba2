# Copyright the vrp-eval contributors. Licensed under the Apache License, Version 2.0.
"""vrp_attention_confidence: does sharper attention mean a confident, a correct, or a confidently
wrong answer? Pearson r with Fisher-z CI and p-value, plus Spearman, across samples. A thin
wrapper: the maths lives in `vrp_eval.statistics`."""

import datasets
import evaluate

from vrp_eval.metric_table import evaluate_arguments
from vrp_eval.statistics import attention_confidence_summary

_CITATION = """\
@article{fisher1915frequency,
  title   = {Frequency Distribution of the Values of the Correlation Coefficient in Samples from an Indefinitely Large Population},
  author  = {Fisher, R. A.},
  journal = {Biometrika},
  volume  = {10},
  number  = {4},
  pages   = {507--521},
  year    = {1915}
}
"""

_DESCRIPTION = """\
Correlations across samples between attention sharpness S (1 - normalised entropy of the
answer-predicting query's attention over image tokens), and (a) the confidence c, (b) the score a,
(c) the overconfidence o = max(0, c - a). Each is a Pearson r with a Fisher-z confidence interval
and a two-sided p-value, plus the Spearman rank correlation. A correlation of a constant series
(or of fewer than 2 samples) is undefined: it is returned as NaN with a warning.
"""

_KWARGS_DESCRIPTION = """
Args:
    sharpness (`list` of `float`): attention sharpness per sample (any finite values).
    confidences (`list` of `float`): confidence per sample, in [0, 1].
    scores (`list` of `float`): score per sample, in [0, 1].
    ci (`float`, default 0.95): confidence level of the Fisher-z intervals.
Returns:
    attn_conf_r, attn_acc_r, attn_overconf_r (`float`): Pearson r of sharpness with confidence,
        score and overconfidence; each also with `_ci_low`, `_ci_high` (Fisher-z interval),
        `_p` (two-sided p-value) and `_rho` (Spearman). NaN where undefined.
Examples:
    >>> import evaluate
    >>> vrp_attention_confidence = evaluate.load("metrics/vrp_attention_confidence")
    >>> results = vrp_attention_confidence.compute(
    ...     sharpness=[0.2, 0.4, 0.5, 0.7, 0.9],
    ...     confidences=[0.3, 0.5, 0.6, 0.8, 0.95],
    ...     scores=[1, 0, 1, 0, 0],
    ... )
    >>> len(results)
    15

    Sharper attention goes with higher confidence, lower accuracy and more overconfidence:

    >>> print(round(results["attn_conf_r"], 4), round(results["attn_conf_r_rho"], 4))
    0.9983 1.0
    >>> print(round(results["attn_conf_r_ci_low"], 4), round(results["attn_conf_r_ci_high"], 4))
    0.9727 0.9999
    >>> print(round(results["attn_acc_r"], 4), round(results["attn_acc_r_p"], 4))
    -0.642 0.2429
    >>> print(round(results["attn_overconf_r"], 4), round(results["attn_overconf_r_rho"], 4))
    0.8381 0.8208
"""

# evaluate.combine passes every keyword to every module; accept the inputs and options of the
# sibling vrp_* modules (listed once, in vrp_eval.metric_table.EVALUATE_MODULES) silently, and reject
# anything else (a misspelt option must not pass).
_SIBLING_NAMES = evaluate_arguments()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VrpAttentionConfidence(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "sharpness": datasets.Value("float64"),
                    "confidences": datasets.Value("float64"),
                    "scores": datasets.Value("float64"),
                }
            ),
        )

    def _compute(self, sharpness, confidences, scores, ci=0.95, **other):
        unknown = sorted(set(other) - _SIBLING_NAMES)
        if unknown:
            raise TypeError(f"vrp_attention_confidence got unknown argument(s) {unknown}; the option is ci.")
        return attention_confidence_summary(sharpness, confidences, scores, ci=ci)
