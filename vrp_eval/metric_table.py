"""The reported metrics, each written once: one row per metric; every list of metric names derives from it.

    from vrp_eval.metric_table import SUMMARY, columns
    columns("lmms", SUMMARY)   # what every lmms-eval vrp_* task reports beside `accuracy`

A row (`Metric`) holds a metric's name, what it means, how a harness aggregates it, the direction in
which it is better, which companion columns it carries (95% CI bounds, p-value, Spearman rho), the
probe signals it needs, the harness tasks that report it, whether it is SPEC vocabulary or a layer
range, and the `evaluate` module that computes it on its own. Derived from the table (as lmms-eval
registers aggregations by name in one registry):

- `harness.RELIABILITY_METRICS` (= `lmms.RELIABILITY_METRICS`), `lm.RELIABILITY_METRICS`,
  `lm.CALIBRATION_METRICS`: `columns(task, SUMMARY)`;
- the aggregation functions of vrp_eval/tasks/utils.py and vrp_eval/tasks_lm/utils.py, one per
  column and named as it (what a YAML's `aggregation: !function utils.<name>` finds);
- the task YAMLs' metric lists (`YAML_FILES`): written here between two marker lines, because a
  harness `include:` replaces a list instead of extending it (vrp_pope adds POPE's own metrics);
- `results.METRICS` (`spec_names`), `results.METRIC_SUFFIXES`, `results.LAYER_RANGE_METRICS`;
- the keywords every `evaluate` module accepts from its siblings (`evaluate_arguments`).

Adding a metric: its maths, one row here, `python -m vrp_eval.metric_table --write`, its test
(docs/DESIGN.md, "Recipe: add a metric"). Only the standard library is imported here, so the slim
Spaces carry this module (`spaces.LIGHT_MODULES`).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

#: `aggregation` of a metric whose per-sample values the harness averages itself (`aggregation: mean`).
MEAN = "mean"
#: `aggregation` of a metric read from one aggregate over all of a task's samples (`harness.Summaries`:
#: `aggregate` of the records, plus `n_probed`).
SUMMARY = "summary"
#: The harness tasks that report metrics, by kind.
TASKS = {
    "lmms": "every lmms-eval vrp_* task (vrp_eval/tasks/)",
    "lm": "lm-eval's short-answer vrp_text_synth (vrp_eval/tasks_lm/)",
    "lm_mc": "lm-eval's multiple-choice vrp_text_synth_mc: calibration only (no probe signal fits a log-likelihood)",
}
ALL_TASKS = frozenset(TASKS)
#: The tasks whose model ran the probe (the multiple-choice task only has each sample's answer and confidence).
PROBED_TASKS = frozenset({"lmms", "lm"})
#: Companion columns in the order they follow their metric: 95% CI bounds, p-value, Spearman rho.
COMPANION_SUFFIXES = ("_ci_low", "_ci_high", "_p", "_rho")


@dataclass(frozen=True)
class Metric:
    """One reported metric (a row of `TABLE`)."""

    name: str
    description: str
    tasks: frozenset[str]
    #: MEAN or SUMMARY.
    aggregation: str = SUMMARY
    higher_is_better: bool = True
    #: Companion columns: `<name>_ci_low` / `<name>_ci_high`, `<name>_p`, `<name>_rho`.
    ci: bool = False
    p_value: bool = False
    rho: bool = False
    #: Probe signals (`options.SIGNALS`) without which the aggregate leaves the metric out.
    signals: tuple[str, ...] = ()
    #: In the SPEC vocabulary (`results.METRICS`): published, never renamed.
    spec: bool = False
    #: Its value is a decoder-layer range [first, last] (`results.LAYER_RANGE_METRICS`).
    layer_range: bool = False
    #: The `evaluate` module (`EVALUATE_MODULES`) whose output holds every column of the metric.
    evaluate_module: str | None = None

    def __post_init__(self) -> None:
        if self.aggregation not in (MEAN, SUMMARY):
            raise ValueError(f"metric {self.name!r}: aggregation {self.aggregation!r} is neither {MEAN!r} nor {SUMMARY!r}")
        if not self.tasks or not self.tasks <= ALL_TASKS:
            raise ValueError(f"metric {self.name!r}: tasks {sorted(self.tasks)} must be some of {sorted(TASKS)}")

    @property
    def columns(self) -> tuple[str, ...]:
        """The metric and its companions, as reported: ("ece", "ece_ci_low", "ece_ci_high")."""
        carried = (self.ci, self.ci, self.p_value, self.rho)
        return (self.name, *(self.name + suffix for suffix, on in zip(COMPANION_SUFFIXES, carried) if on))


_ATTENTION = ("attention",)
_CIRCUIT = ("circuit",)
_CORRELATION = {"ci": True, "p_value": True, "rho": True, "signals": _ATTENTION, "tasks": PROBED_TASKS,
                "spec": True, "evaluate_module": "vrp_attention_confidence"}
_CALIBRATION = {"higher_is_better": False, "tasks": ALL_TASKS, "spec": True, "evaluate_module": "vrp_ece"}

#: Every reported metric, in the order the harnesses report them (and the task YAMLs list them).
TABLE: tuple[Metric, ...] = (
    Metric("accuracy", "the task's own per-sample score (VQA accuracy, exact match, option match), averaged",
           ALL_TASKS, aggregation=MEAN, spec=True, evaluate_module="vrp_vqa_accuracy"),
    Metric("n_samples", "samples evaluated", ALL_TASKS, spec=True, evaluate_module="vrp_ece"),
    Metric("n_probed", "samples whose response carried a vrp-eval record (a harness run)", PROBED_TASKS),
    Metric("mean_confidence", "mean confidence c of the answers", ALL_TASKS),
    Metric("ece", "expected calibration error (equal-width bins) of c against the score a, bootstrap CI",
           ci=True, **_CALIBRATION),
    Metric("mce", "maximum calibration error: the largest gap of a non-empty bin", **_CALIBRATION),
    Metric("ace", "adaptive (equal-mass bins) calibration error", **_CALIBRATION),
    Metric("brier", "Brier score of the confidences", **_CALIBRATION),
    Metric("attn_conf_r", "Pearson r of attention sharpness S with confidence c (Fisher-z CI)", **_CORRELATION),
    Metric("attn_acc_r", "Pearson r of attention sharpness S with the score a (Fisher-z CI)", **_CORRELATION),
    Metric("attn_overconf_r", "Pearson r of attention sharpness S with overconfidence max(0, c - a) (Fisher-z CI)",
           **{**_CORRELATION, "higher_is_better": False}),
    Metric("mean_sharpness", "mean attention sharpness S", PROBED_TASKS, signals=_ATTENTION),
    Metric("mean_image_attention_mass", "mean attention mass on the image tokens (a text model: on the subject "
           "sentence)", PROBED_TASKS, signals=_ATTENTION),
    Metric("causal_acc_drop", "held-out accuracy with the circuit corrupted / clean accuracy - 1, paired "
           "bootstrap CI", PROBED_TASKS, higher_is_better=False, ci=True, signals=_CIRCUIT, spec=True,
           evaluate_module="vrp_causal_drop"),
    Metric("control_acc_drop", "the same drop for a control window of the circuit's width", PROBED_TASKS, ci=True,
           signals=_CIRCUIT, spec=True),
    Metric("clean_accuracy", "held-out accuracy of the clean run", PROBED_TASKS, signals=_CIRCUIT,
           evaluate_module="vrp_causal_drop"),
    Metric("corrupted_accuracy", "held-out accuracy with the circuit corrupted", PROBED_TASKS, signals=_CIRCUIT,
           evaluate_module="vrp_causal_drop"),
    Metric("n_heldout", "held-out samples the causal drops are measured on", PROBED_TASKS, signals=_CIRCUIT),
    Metric("sharpness_heldout_clean", "mean attention sharpness of the held-out samples, clean run",
           frozenset({"lmms"}), signals=("attention", "circuit")),
    Metric("sharpness_heldout_corrupted", "mean attention sharpness of the held-out samples, circuit corrupted",
           frozenset({"lmms"}), signals=("attention", "circuit")),
    Metric("circuit_layers", "the causal circuit: decoder layers [first, last] whose knockout drops accuracy "
           "most on the discovery half", PROBED_TASKS, signals=_CIRCUIT, spec=True, layer_range=True),
    Metric("control_layers", "the control window [first, last]: as wide as the circuit, away from it",
           PROBED_TASKS, signals=_CIRCUIT, layer_range=True),
    Metric("integration_layer", "the first layer where the causal trace's mean indirect effect at the last "
           "position exceeds the image positions'", PROBED_TASKS, signals=("tracing",), spec=True),
)


def columns(task: str, aggregation: str | None = None) -> tuple[str, ...]:
    """Every column that `task` (a key of `TASKS`) reports, in table order; only the metrics aggregated
    by `aggregation` (MEAN or SUMMARY) when it is given."""
    if task not in TASKS:
        raise ValueError(f"unknown task kind {task!r}: choose one of {', '.join(TASKS)}")
    return tuple(column for metric in TABLE if task in metric.tasks and aggregation in (None, metric.aggregation)
                 for column in metric.columns)


def spec_names() -> tuple[str, ...]:
    """The SPEC vocabulary (`results.METRICS`), in table order."""
    return tuple(metric.name for metric in TABLE if metric.spec)


def layer_range_names() -> tuple[str, ...]:
    """The metrics whose value is a decoder-layer range [first, last] (`results.LAYER_RANGE_METRICS`)."""
    return tuple(metric.name for metric in TABLE if metric.layer_range)


# --------------------------------------------------------------------------------------------
# The `evaluate` modules (vrp_eval/metrics/<name>/<name>.py)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluateModule:
    """What an `evaluate` module takes: its input columns (features) and its `compute` options."""

    inputs: tuple[str, ...]
    options: tuple[str, ...]


EVALUATE_MODULES = {
    "vrp_ece": EvaluateModule(("confidences", "scores"), ("n_bins", "n_bootstrap", "seed", "ci")),
    "vrp_attention_confidence": EvaluateModule(("sharpness", "confidences", "scores"), ("ci",)),
    "vrp_causal_drop": EvaluateModule(("clean_scores", "corrupted_scores"), ("n_bootstrap", "seed", "ci")),
    "vrp_vqa_accuracy": EvaluateModule(("predictions", "references"), ()),
}


def evaluate_arguments() -> frozenset[str]:
    """Every input and option of the `evaluate` modules. `evaluate.combine` passes each keyword to every
    module, so each module accepts its siblings' keywords silently (and refuses any other)."""
    return frozenset(name for module in EVALUATE_MODULES.values() for name in (*module.inputs, *module.options))


# --------------------------------------------------------------------------------------------
# The task YAMLs' metric lists
# --------------------------------------------------------------------------------------------

#: The YAMLs holding a metric list (paths inside the package) and the task kind each one is.
YAML_FILES = {
    "tasks/_vrp_template_yaml": "lmms",
    "tasks/vrp_pope.yaml": "lmms",
    "tasks_lm/vrp_text_synth.yaml": "lm",
    "tasks_lm/vrp_text_synth_mc.yaml": "lm_mc",
}
#: The lines around the generated part of a `metric_list:` (a task's own metrics may follow the end line).
BEGIN = ("  # Generated from vrp_eval/metric_table.py by `python -m vrp_eval.metric_table --write`: "
         "edit the table, not these lines.")
END = "  # End of the generated metrics."


def metric_list(task: str) -> list[str]:
    """The YAML lines of `task`'s metrics: MEAN ones aggregated by the harness, SUMMARY ones by the
    function of their name in the task folder's utils.py."""
    if task not in TASKS:
        raise ValueError(f"unknown task kind {task!r}: choose one of {', '.join(TASKS)}")
    lines = []
    for metric in TABLE:
        if task not in metric.tasks:
            continue
        for column in metric.columns:
            aggregation = MEAN if metric.aggregation == MEAN else f"!function utils.{column}"
            lines += [f"  - metric: {column}", f"    aggregation: {aggregation}",
                      f"    higher_is_better: {str(metric.higher_is_better).lower()}"]
    return lines


def render(text: str, task: str) -> str:
    """`text` (a task YAML) with the lines between BEGIN and END replaced by `metric_list(task)`."""
    lines = text.split("\n")
    if BEGIN not in lines or END not in lines or lines.index(BEGIN) > lines.index(END):
        raise ValueError(f"no generated metric list: put the lines {BEGIN.strip()!r} and {END.strip()!r} "
                         "(indented two spaces) under `metric_list:`")
    return "\n".join([*lines[:lines.index(BEGIN) + 1], *metric_list(task), *lines[lines.index(END):]])


def yaml_path(name: str) -> Path:
    """The path of a `YAML_FILES` entry inside the installed package."""
    return Path(__file__).resolve().parent / name


def stale_yamls() -> list[str]:
    """The `YAML_FILES` whose metric list differs from the table's."""
    return [name for name, task in YAML_FILES.items()
            if (text := yaml_path(name).read_text(encoding="utf-8")) != render(text, task)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vrp_eval.metric_table",
        description="Check (or with --write, rewrite) the task YAMLs' metric lists against the metric table.")
    parser.add_argument("--write", action="store_true", help="rewrite the YAMLs whose metric list is out of date")
    args = parser.parse_args(argv)
    stale = stale_yamls()
    for name in stale:
        if args.write:
            path = yaml_path(name)
            path.write_text(render(path.read_text(encoding="utf-8"), YAML_FILES[name]), encoding="utf-8")
        print(f"{'rewrote' if args.write else 'out of date'}: vrp_eval/{name}")
    if stale and not args.write:
        print("run `python -m vrp_eval.metric_table --write`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
