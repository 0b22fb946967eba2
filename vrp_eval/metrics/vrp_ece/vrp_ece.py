# Copyright the vrp-eval contributors. Licensed under the Apache License, Version 2.0.
"""vrp_ece: expected calibration error (Guo bins) with MCE, adaptive ECE, Brier, a bootstrap CI and
the per-bin reliability table. A thin wrapper: the maths lives in `vrp_eval.calibration`."""

import datasets
import evaluate

from vrp_eval.calibration import (
    DEFAULT_N_BINS,
    DEFAULT_N_BOOTSTRAP,
    calibration_summary,
)
from vrp_eval.metric_table import evaluate_arguments

_CITATION = """\
@inproceedings{guo2017calibration,
  title     = {On Calibration of Modern Neural Networks},
  author    = {Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle = {Proceedings of the 34th International Conference on Machine Learning},
  pages     = {1321--1330},
  year      = {2017}
}
@inproceedings{nixon2019measuring,
  title     = {Measuring Calibration in Deep Learning},
  author    = {Nixon, Jeremy and Dusenberry, Michael W. and Zhang, Linchuan and Jerfel, Ghassen and Tran, Dustin},
  booktitle = {CVPR Workshops},
  year      = {2019}
}
"""

_DESCRIPTION = """\
Expected calibration error (ECE) of per-sample confidences against per-sample scores in [0, 1]
(0/1 correctness or a soft score such as VQA accuracy). Equal-width bins (default 15); bin b
covers (b/n, (b+1)/n] and a confidence of exactly 0 goes into the first bin (Guo et al. 2017).
ECE is the bin-count-weighted L1 gap between mean confidence and mean score. Also returned: MCE
(largest gap over non-empty bins), adaptive equal-mass ECE (ACE: stable sort by confidence,
numpy.array_split into n groups), the Brier score, a seeded percentile-bootstrap CI for ECE and
the per-bin table for a reliability diagram.
"""

_KWARGS_DESCRIPTION = """
Args:
    confidences (`list` of `float`): the model's confidence per sample, in [0, 1].
    scores (`list` of `float`): the score per sample, in [0, 1] (1 = correct; fractions allowed).
    n_bins (`int`, default 15): number of equal-width bins (and of ACE groups).
    n_bootstrap (`int`, default 1000): bootstrap resamples for the CI; 0 skips it (CI is NaN).
    seed (`int`, default 0): seed of the bootstrap.
    ci (`float`, default 0.95): confidence level of the interval.
Returns:
    ece (`float`), mce (`float`), ace (`float`), brier (`float`),
    ece_ci_low (`float`), ece_ci_high (`float`): percentile bootstrap interval of ECE,
    bins (`list` of `dict`): one per bin with lo, hi, count, mean_confidence, mean_score
        (the means are None for an empty bin),
    n_samples (`int`).
Examples:
    Four samples, each alone in its bin: ECE = (0.05 + 0.85 + 0.25 + 0.35) / 4.

    >>> import evaluate
    >>> vrp_ece = evaluate.load("metrics/vrp_ece")
    >>> results = vrp_ece.compute(confidences=[0.95, 0.85, 0.25, 0.65], scores=[1, 0, 0, 1], n_bins=10)
    >>> print(round(results["ece"], 4), round(results["mce"], 4), round(results["brier"], 4))
    0.375 0.85 0.2275
    >>> results["n_samples"], len(results["bins"])
    (4, 10)
    >>> results["bins"][8]
    {'lo': 0.8, 'hi': 0.9, 'count': 1, 'mean_confidence': 0.85, 'mean_score': 0.0}

    A confidence on an edge closes its bin: 0.2 lies in (0.1, 0.2], 0.0 in the first bin.

    >>> results = vrp_ece.compute(confidences=[0.0, 0.2, 0.2], scores=[0, 1, 0], n_bins=10, n_bootstrap=0)
    >>> [b["count"] for b in results["bins"][:3]], round(results["ece"], 4)
    ([1, 2, 0], 0.2)
"""

# evaluate.combine passes every keyword to every module; accept the inputs and options of the
# sibling vrp_* modules (listed once, in vrp_eval.metric_table.EVALUATE_MODULES) silently, and reject
# anything else (a misspelt option must not pass).
_SIBLING_NAMES = evaluate_arguments()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class VrpEce(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"confidences": datasets.Value("float64"), "scores": datasets.Value("float64")}
            ),
            reference_urls=["https://arxiv.org/abs/1706.04599", "https://arxiv.org/abs/1904.01685"],
        )

    def _compute(self, confidences, scores, n_bins=DEFAULT_N_BINS, n_bootstrap=DEFAULT_N_BOOTSTRAP, seed=0, ci=0.95,
                 **other):
        unknown = sorted(set(other) - _SIBLING_NAMES)
        if unknown:
            raise TypeError(f"vrp_ece got unknown argument(s) {unknown}; options are n_bins, n_bootstrap, seed, ci.")
        return calibration_summary(
            confidences, scores, n_bins=n_bins, n_bootstrap=n_bootstrap, seed=seed, ci=ci
        )
