# Copyright the vrp-eval contributors. Licensed under the Apache License, Version 2.0.
"""vrp_causal_drop: relative accuracy drop when a causal circuit is corrupted, with a paired
bootstrap CI. A thin wrapper: the maths lives in `vrp_eval.statistics`."""

import datasets
import evaluate

from vrp_eval.metric_table import evaluate_arguments
from vrp_eval.statistics import DEFAULT_N_BOOTSTRAP, causal_drop_summary

_CITATION = """\
@inproceedings{meng2022locating,
  title     = {Locating and Editing Factual Associations in {GPT}},
  author    = {Meng, Kevin and Bau, David and Andonian, Alex and Belinkov, Yonatan},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2022}
}
@book{efron1993bootstrap,
  title     = {An Introduction to the Bootstrap},
  author    = {Efron, Bradley and Tibshirani, Robert J.},
  publisher = {Chapman and Hall/CRC},
  year      = {1993}
}
"""

_DESCRIPTION = """\
Causal accuracy drop: mean(corrupted_scores) / mean(clean_scores) - 1, where both lists score the
same samples, once answered cleanly and once with a model component (e.g. the hidden states of a
causal circuit) corrupted. -0.5 means accuracy halved. The interval is a seeded percentile
bootstrap that resamples samples (pairs) jointly. A clean accuracy of 0 makes the drop undefined:
NaN with a warning.
"""

_KWARGS_DESCRIPTION = """
Args:
    clean_scores (`list` of `float`): per-sample score of the clean run, in [0, 1].
    corrupted_scores (`list` of `float`): per-sample score of the corrupted run, same samples, in [0, 1].
    n_bootstrap (`int`, default 1000): bootstrap resamples; 0 skips the CI (NaN).
    seed (`int`, default 0): seed of the bootstrap.
    ci (`float`, default 0.95): confidence level.
Returns:
    causal_acc_drop (`float`), causal_acc_drop_ci_low (`float`), causal_acc_drop_ci_high (`float`),
    clean_accuracy (`float`), corrupted_accuracy (`float`).
Examples:
    Clean accuracy 0.8, corrupted 0.4: the drop is -50%.

    >>> import evaluate
    >>> vrp_causal_drop = evaluate.load("metrics/vrp_causal_drop")
    >>> results = vrp_causal_drop.compute(
    ...     clean_scores=[1, 1, 1, 1, 0, 1, 1, 1, 1, 0],
    ...     corrupted_scores=[1, 0, 1, 0, 0, 0, 1, 0, 1, 0],
    ... )
    >>> print(round(results["causal_acc_drop"], 4), results["clean_accuracy"], results["corrupted_accuracy"])
    -0.5 0.8 0.4
    >>> results["causal_acc_drop_ci_low"] <= -0.5 <= results["causal_acc_drop_ci_high"]
    True
"""

# evaluate.combine passes every keyword to every module; accept the inputs and options of the
# sibling vrp_* modules (listed once, in vrp_eval.metric_table.EVALUATE_MODULES) silently, and reject
# anything else (a misspelt option must not pass).
_SIBLING_NAMES = evaluate_arguments()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VrpCausalDrop(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"clean_scores": datasets.Value("float64"), "corrupted_scores": datasets.Value("float64")}
            ),
        )

    def _compute(self, clean_scores, corrupted_scores, n_bootstrap=DEFAULT_N_BOOTSTRAP, seed=0, ci=0.95, **other):
        unknown = sorted(set(other) - _SIBLING_NAMES)
        if unknown:
            raise TypeError(f"vrp_causal_drop got unknown argument(s) {unknown}; options are n_bootstrap, seed, ci.")
        return causal_drop_summary(clean_scores, corrupted_scores, n_bootstrap=n_bootstrap, seed=seed, ci=ci)
