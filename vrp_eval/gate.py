"""The release gate: bounds of a policy, and regressions against a baseline run.

    from vrp_eval.gate import check
    report = check("runs/x", "docs/ci/policy.yaml")                # bounds only
    report = check("runs/x", baseline="runs/main")                 # regression only
    report.passed, report.to_markdown(), report.to_junit()

**Policy** (YAML; docs/ci.md):

    task: vrp_synth          # optional: a task, or a list of tasks; default every task of the results
    bounds:
      - metric: ece          # any metric of the metric table that is a number
        op: "<="             # <=, <, >=, >
        value: 0.10
        decide: ci           # point (default): the point estimate decides; ci: only a whole 95% CI past the
                             # bound fails (the metric must carry <metric>_ci_low / <metric>_ci_high)

A bound *fails* when the point is past it (`decide: point`) or when even the nearest end of the CI is
(`decide: ci`): for `ece <= 0.10` that is `ece_ci_low > 0.10`. A metric that could not be computed
(null / NaN in the file) fails its bound: a gate must not pass on a number it does not have.

**Baseline**: each metric that both runs report is recomputed from their samples.jsonl, with a
percentile bootstrap CI of the difference run - baseline. When both runs scored the same samples
(same dataset, split and question ids) the difference is *paired*: every resample draws the same
question ids from both runs (one `statistics.bootstrap_ci` index matrix, the same seed for every
metric). Otherwise the two runs are resampled independently (*unpaired*) and the report says so.
A CI wholly above or below 0 is a detectable difference, better or worse by the metric's direction;
a metric of `gate_metrics` (default ece and accuracy) that got detectably worse fails the gate.
"""
from __future__ import annotations

import difflib
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from vrp_eval import calibration, metric_table, statistics
from vrp_eval.compare import Run, Samples, format_ci, load_run
from vrp_eval.errors import VrpError

__all__ = [
    "DEFAULT_GATE_METRICS",
    "OPERATORS",
    "Bound",
    "BoundCheck",
    "Difference",
    "GateReport",
    "Policy",
    "PolicyError",
    "Regression",
    "check",
    "check_bounds",
    "load_policy",
    "parse_policy",
    "regression",
]

#: Operator -> holds(value, bound).
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda value, bound: value <= bound,
    "<": lambda value, bound: value < bound,
    ">=": lambda value, bound: value >= bound,
    ">": lambda value, bound: value > bound,
}
DECIDERS = ("point", "ci")
#: The regressions that fail the gate unless told otherwise: calibration and accuracy.
DEFAULT_GATE_METRICS = ("ece", "accuracy")
_POLICY_KEYS = {"task", "bounds"}
_BOUND_KEYS = {"metric", "op", "value", "decide"}


class PolicyError(VrpError, ValueError):
    """A policy file that cannot be used; the message names the field, the problem and the fix."""


def _table() -> dict[str, metric_table.Metric]:
    return {m.name: m for m in metric_table.TABLE}


# --------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Bound:
    metric: str
    op: str
    value: float
    decide: str = "point"

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Policy:
    bounds: tuple[Bound, ...]
    #: None: every task of the results file.
    tasks: tuple[str, ...] | None = None
    source: str = "policy"


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy YAML file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyError(f"cannot read policy file {path}: {error.strerror}") from None
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise PolicyError(f"{path} is not valid YAML{where} ({problem}); fix the syntax "
                          "(docs/ci.md shows a policy file)") from None
    return parse_policy(obj, source=str(path))


def _fail(source: str, field: str, problem: str, fix: str) -> PolicyError:
    return PolicyError(f"{source}: policy field `{field}` {problem}; {fix}")


def parse_policy(obj: Any, source: str = "policy") -> Policy:
    """A validated Policy from a mapping (what a policy YAML holds)."""
    if not isinstance(obj, Mapping):
        raise PolicyError(f"{source}: a policy is a mapping with `bounds:` (a list) and optionally `task:`, "
                          f"not {type(obj).__name__}; see docs/ci.md")
    unknown = sorted(set(obj) - _POLICY_KEYS, key=str)
    if unknown:
        raise _fail(source, str(unknown[0]), "is not a policy field", f"use only {', '.join(sorted(_POLICY_KEYS))}")
    tasks = obj.get("task")
    if tasks is not None:
        tasks = [tasks] if isinstance(tasks, str) else tasks
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
            raise _fail(source, "task", f"is {obj.get('task')!r}", "give a task name, a list of them, or leave it "
                        "out to apply the bounds to every task of the results file")
        tasks = tuple(tasks)
    bounds = obj.get("bounds")
    if not isinstance(bounds, list) or not bounds:
        raise _fail(source, "bounds", "is missing or not a non-empty list",
                    "list bounds such as `- {metric: ece, op: \"<=\", value: 0.1}`")
    return Policy(tuple(_parse_bound(b, f"bounds[{i}]", source) for i, b in enumerate(bounds)), tasks, source)


def _parse_bound(obj: Any, where: str, source: str) -> Bound:
    if not isinstance(obj, Mapping):
        raise _fail(source, where, f"is {obj!r}, not a mapping", "write `- {metric: ece, op: \"<=\", value: 0.1}`")
    unknown = sorted(set(obj) - _BOUND_KEYS, key=str)
    if unknown:
        raise _fail(source, f"{where}.{unknown[0]}", "is not a bound field",
                    f"use only {', '.join(sorted(_BOUND_KEYS))}")
    for key in ("metric", "op", "value"):
        if key not in obj:
            raise _fail(source, f"{where}.{key}", "is missing", "every bound needs metric, op and value")
    table = _table()
    name = obj["metric"]
    if not isinstance(name, str) or name not in table:
        close = difflib.get_close_matches(str(name), table, n=1)
        fix = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(table)}"
        raise _fail(source, f"{where}.metric", f"is {name!r}, which is not a vrp-eval metric", fix)
    row = table[name]
    if row.layer_range:
        raise _fail(source, f"{where}.metric", f"is {name!r}, a layer range [first, last], not a number",
                    "bound a number such as causal_acc_drop or integration_layer")
    op = obj["op"]
    if op not in OPERATORS:
        raise _fail(source, f"{where}.op", f"is {op!r}", f"use one of {', '.join(OPERATORS)} (quote it in YAML: "
                    "op: \"<=\")")
    value = obj["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, f"{where}.value", f"is {value!r}, not a finite number", "write a number such as 0.1")
    decide = obj.get("decide", "point")
    if decide not in DECIDERS:
        raise _fail(source, f"{where}.decide", f"is {decide!r}", "use point (the estimate decides) or ci (only a "
                    "whole 95% CI past the bound fails)")
    if decide == "ci" and not row.ci:
        carried = ", ".join(m.name for m in table.values() if m.ci)
        raise _fail(source, f"{where}.decide", f"is ci, but {name} carries no confidence interval",
                    f"use decide: point for {name} (metrics with a CI: {carried})")
    return Bound(name, op, float(value), decide)


# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BoundCheck:
    task: str
    bound: Bound
    value: float
    ci_low: float | None
    ci_high: float | None
    passed: bool
    reason: str


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _check_bound(task: str, metrics: Mapping, bound: Bound, source: str) -> BoundCheck:
    if bound.metric not in metrics:
        raise PolicyError(f"{source}: task {task!r} has no metric {bound.metric!r} for the bound `{bound}`; "
                          "run with the signals that compute it (`--signals`) or drop the bound")
    value = _number(metrics[bound.metric])
    low = high = None
    if bound.decide == "ci":
        names = (f"{bound.metric}_ci_low", f"{bound.metric}_ci_high")
        if not all(n in metrics for n in names):
            raise PolicyError(f"{source}: task {task!r} has no {names[0]} / {names[1]} for the bound `{bound}` "
                              "(decide: ci); use decide: point, or a results file that carries the CI")
        low, high = _number(metrics[names[0]]), _number(metrics[names[1]])
    holds = OPERATORS[bound.op]
    if math.isnan(value):
        return BoundCheck(task, bound, value, low, high, False, f"{bound.metric} could not be computed (null)")
    if bound.decide == "point":
        passed = holds(value, bound.value)
        reason = f"{bound.metric} = {value:.4g} {'meets' if passed else 'is past'} the bound {bound.value:g}"
        return BoundCheck(task, bound, value, low, high, passed, reason)
    if math.isnan(low) or math.isnan(high):
        return BoundCheck(task, bound, value, low, high, False, f"the CI of {bound.metric} could not be computed")
    # The whole CI is past the bound when even its end nearest the allowed side is.
    nearest, farthest = (low, high) if bound.op in ("<=", "<") else (high, low)
    passed = holds(nearest, bound.value)
    where = ("lies wholly within" if holds(farthest, bound.value) else "straddles") if passed else "lies wholly past"
    reason = f"the 95% CI [{low:.4g}, {high:.4g}] {where} the bound {bound.value:g}"
    return BoundCheck(task, bound, value, low, high, passed, reason)


def check_bounds(results: Mapping, policy: Policy, source: str = "results") -> list[BoundCheck]:
    """One BoundCheck per (task, bound). PolicyError when a named task or metric is not in `results`."""
    available = list(results["results"])
    tasks = list(policy.tasks) if policy.tasks is not None else available
    missing = [t for t in tasks if t not in available]
    if missing:
        raise PolicyError(f"{policy.source}: policy field `task` names {', '.join(map(repr, missing))}, which "
                          f"{source} does not hold; it has {', '.join(available)}")
    return [_check_bound(task, results["results"][task], bound, source) for task in tasks for bound in policy.bounds]


# --------------------------------------------------------------------------------------------
# Regression against a baseline
# --------------------------------------------------------------------------------------------

def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    return statistics.pearson(x, y).r


#: How each metric that can be compared is recomputed from samples: (population, statistic).
#: "all": every sample; "heldout": the held-out half of the circuit runs. Each statistic is the one
#: implementation of that metric (calibration, statistics), applied to resampled rows.
_RECOMPUTE: dict[str, tuple[str, Callable[[Samples, np.ndarray, int], float]]] = {
    "accuracy": ("all", lambda s, i, b: float(s.scores[i].mean())),
    "ece": ("all", lambda s, i, b: calibration.ece(s.confidences[i], s.scores[i], b)),
    "mce": ("all", lambda s, i, b: calibration.mce(s.confidences[i], s.scores[i], b)),
    "ace": ("all", lambda s, i, b: calibration.ace(s.confidences[i], s.scores[i], b)),
    "brier": ("all", lambda s, i, b: calibration.brier(s.confidences[i], s.scores[i])),
    "attn_conf_r": ("all", lambda s, i, b: _pearson(s.sharpness[i], s.confidences[i])),
    "attn_acc_r": ("all", lambda s, i, b: _pearson(s.sharpness[i], s.scores[i])),
    "attn_overconf_r": ("all", lambda s, i, b: _pearson(
        s.sharpness[i], statistics.overconfidence(s.confidences[i], s.scores[i]))),
    "causal_acc_drop": ("heldout", lambda s, i, b: statistics.causal_drop(s.heldout_clean[i],
                                                                           s.heldout_corrupted[i])),
    "control_acc_drop": ("heldout", lambda s, i, b: statistics.causal_drop(s.heldout_clean[i],
                                                                            s.heldout_control[i])),
}
COMPARABLE = tuple(_RECOMPUTE)


@dataclass(frozen=True)
class Difference:
    """run - baseline for one metric, with a percentile bootstrap CI."""

    metric: str
    run: float
    baseline: float
    difference: float
    ci_low: float
    ci_high: float
    paired: bool
    gates: bool

    @property
    def decision(self) -> str:
        """better / worse / no detectable difference (a CI touching 0 detects nothing); undetermined: no CI."""
        if math.isnan(self.ci_low) or math.isnan(self.ci_high):
            return "undetermined"
        if self.ci_low <= 0.0 <= self.ci_high:
            return "no detectable difference"
        higher = self.ci_low > 0.0
        return "better" if higher == _table()[self.metric].higher_is_better else "worse"

    @property
    def passed(self) -> bool:
        return not (self.gates and self.decision == "worse")


@dataclass(frozen=True)
class Regression:
    run: str
    baseline: str
    task: str
    paired: bool
    #: Plain sentences about how the runs were matched (shown in the summary).
    notes: tuple[str, ...]
    differences: tuple[Difference, ...]
    ci: float = 0.95

    @property
    def passed(self) -> bool:
        return all(d.passed for d in self.differences)


def _recomputable(name: str, samples: Samples) -> bool:
    """Whether samples.jsonl holds what `name` is computed from (attention, the held-out circuit runs)."""
    if name.startswith("attn_"):
        return samples.sharpness is not None
    if name == "control_acc_drop":
        return len(samples.heldout_ids) > 0 and bool(np.isfinite(samples.heldout_control).all())
    return _RECOMPUTE[name][0] == "all" or len(samples.heldout_ids) > 0


def _n_bins(run: Run) -> int:
    probe = run.config.get("probe")
    value = probe.get("n_bins") if isinstance(probe, Mapping) else None
    return int(value) if isinstance(value, int) and value > 0 else calibration.DEFAULT_N_BINS


def _sizes(samples: Samples, which: str) -> int:
    return len(samples.question_ids) if which == "all" else len(samples.heldout_ids)


def _resampled(statistic: Callable[[Samples, np.ndarray, int], float], samples: Samples, rows: np.ndarray,
               n_bins: int) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # A resample may make a statistic undefined (a constant series): bootstrap_ci leaves it out and says so.
        warnings.simplefilter("ignore", statistics.UndefinedStatisticWarning)
        return np.asarray([statistic(samples, row, n_bins) for row in rows], dtype=float)


def _difference(name: str, run: Samples, base: Samples, paired: bool, n_bins: tuple[int, int], gates: bool,
                n_bootstrap: int, seed: int, ci: float) -> Difference:
    which, statistic = _RECOMPUTE[name]
    n_run, n_base = _sizes(run, which), _sizes(base, which)
    everything_run, everything_base = np.arange(n_run), np.arange(n_base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", statistics.UndefinedStatisticWarning)
        value_run = statistic(run, everything_run, n_bins[0])
        value_base = statistic(base, everything_base, n_bins[1])
    if paired:
        def resampled_difference(rows: np.ndarray) -> np.ndarray:
            return _resampled(statistic, run, rows, n_bins[0]) - _resampled(statistic, base, rows, n_bins[1])
    else:
        # Independent resamples of the run (from its own generator) against bootstrap_ci's of the baseline.
        run_rng = np.random.default_rng([seed, 1])

        def resampled_difference(rows: np.ndarray) -> np.ndarray:
            run_rows = run_rng.integers(0, n_run, size=(len(rows), n_run))
            return _resampled(statistic, run, run_rows, n_bins[0]) - _resampled(statistic, base, rows, n_bins[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", statistics.UndefinedStatisticWarning)
        low, high = statistics.bootstrap_ci(resampled_difference, n_base, n_bootstrap=n_bootstrap, seed=seed, ci=ci,
                                            what=f"{name} difference")
    return Difference(name, value_run, value_base, value_run - value_base, low, high, paired, gates)


def _unmatched(run: Run, base: Run, run_samples: Samples, base_samples: Samples) -> list[str]:
    """Why the two runs did not score the same samples (empty: they did)."""
    reasons = []
    for key in ("dataset", "split"):
        if run.config.get(key) != base.config.get(key):
            reasons.append(f"the runs read different {key}s ({run.config.get(key)!r}, baseline "
                           f"{base.config.get(key)!r})")
    if run.tasks != base.tasks:
        reasons.append(f"the runs are of different tasks ({run.tasks[0]!r}, baseline {base.tasks[0]!r})")
    ids, base_ids = set(run_samples.question_ids), set(base_samples.question_ids)
    if len(ids) != len(run_samples) or len(base_ids) != len(base_samples):
        reasons.append("question ids repeat within a run, so samples cannot be matched")
    elif ids != base_ids:
        reasons.append(f"the runs scored different samples ({len(run_samples)}, baseline {len(base_samples)}; "
                       f"{len(ids & base_ids)} question ids shared)")
    return reasons


def regression(run: str | Path | Run, baseline: str | Path | Run, *,
               gate_metrics: Sequence[str] = DEFAULT_GATE_METRICS, n_bootstrap: int = statistics.DEFAULT_N_BOOTSTRAP,
               seed: int = 0, ci: float = 0.95) -> Regression:
    """run - baseline for every comparable metric both runs report (see the module docstring)."""
    run = run if isinstance(run, Run) else load_run(run)
    base = baseline if isinstance(baseline, Run) else load_run(baseline)
    for one in (run, base):
        if len(one.tasks) != 1:
            raise PolicyError(f"{one.results_path} holds {len(one.tasks)} tasks; a baseline comparison needs a run "
                              "folder of one task (what `vrp-eval run --output DIR` writes)")
    task, base_task = run.tasks[0], base.tasks[0]
    unknown = [m for m in gate_metrics if m not in COMPARABLE]
    if unknown:
        close = difflib.get_close_matches(unknown[0], COMPARABLE, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PolicyError(f"cannot gate regressions on {unknown[0]!r}: {hint}comparable metrics are "
                          f"{', '.join(COMPARABLE)}")
    run_samples, base_samples = run.samples(), base.samples()
    reasons = _unmatched(run, base, run_samples, base_samples)
    paired = not reasons
    heldout_paired = paired and set(run_samples.heldout_ids) == set(base_samples.heldout_ids)
    if paired:
        run_samples = _aligned(run_samples, base_samples)
        notes = [(f"paired: both runs scored the same {len(base_samples)} samples; every bootstrap resample draws "
                 "the same question ids from both runs")]
        if not heldout_paired:
            notes.append("the held-out halves of the circuit runs differ (another seed?), so the causal drops "
                         "compare unpaired")
    else:
        notes = ["unpaired: " + "; ".join(reasons) + ". Each run is resampled independently, so the CIs are wider "
                 "and a difference may come from the samples as much as from the model"]
    run_metrics, base_metrics = run.results["results"][task], base.results["results"][base_task]
    differences = []
    for name in COMPARABLE:
        reported = all(name in m and not math.isnan(_number(m[name])) for m in (run_metrics, base_metrics))
        usable = all(_recomputable(name, samples) for samples in (run_samples, base_samples))
        if not (reported and usable):
            if name in gate_metrics:
                raise PolicyError(f"cannot gate regressions on {name!r}: it is not reported by both runs "
                                  f"({run.results_path}, {base.results_path}); leave it out of --regression-metrics")
            continue
        pair = paired if _RECOMPUTE[name][0] == "all" else heldout_paired
        differences.append(_difference(name, run_samples, base_samples, pair, (_n_bins(run), _n_bins(base)),
                                       name in gate_metrics, n_bootstrap, seed, ci))
    return Regression(str(run.results_path), str(base.results_path), task, paired, tuple(notes), tuple(differences),
                      ci)


def _aligned(run: Samples, base: Samples) -> Samples:
    """`run`'s rows in the baseline's question-id order (and its held-out rows in the baseline's held-out
    order when both halves hold the same ids), so that row i is the same sample in both runs."""
    position = {qid: i for i, qid in enumerate(run.question_ids)}
    index = np.asarray([position[qid] for qid in base.question_ids], dtype=int)
    held_position = {qid: i for i, qid in enumerate(run.heldout_ids)}
    if set(held_position) == set(base.heldout_ids):
        held = np.asarray([held_position[qid] for qid in base.heldout_ids], dtype=int)
        heldout = (base.heldout_ids, run.heldout_clean[held], run.heldout_corrupted[held], run.heldout_control[held])
    else:
        heldout = (run.heldout_ids, run.heldout_clean, run.heldout_corrupted, run.heldout_control)
    return Samples(base.question_ids, run.confidences[index], run.scores[index],
                   None if run.sharpness is None else run.sharpness[index], *heldout)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

@dataclass
class GateReport:
    """What `check` found: the bounds, the regression (or None), and their Markdown / JUnit forms."""

    results: str
    model: str
    bounds: list[BoundCheck] = field(default_factory=list)
    regression: Regression | None = None

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.bounds) and (self.regression is None or self.regression.passed)

    @property
    def failures(self) -> list[str]:
        out = [f"{b.task}: {b.bound} ({b.bound.decide}): {b.reason}" for b in self.bounds if not b.passed]
        if self.regression is not None:
            out += [f"{d.metric} got worse than the baseline: difference {format_ci(d.difference, d.ci_low, d.ci_high, 4)}"
                    for d in self.regression.differences if not d.passed]
        return out

    def to_markdown(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"## vrp-eval gate {verdict}: {self.model}", "", f"Results: `{self.results}`", ""]
        if self.bounds:
            lines += ["### Policy bounds", "", "| | task | bound | decided by | value [95% CI] | why |",
                      "|---|---|---|---|---|---|"]
            for b in self.bounds:
                mark = "pass" if b.passed else "**FAIL**"
                lines.append(f"| {mark} | {b.task} | `{b.bound}` | {b.bound.decide} | "
                             f"{format_ci(b.value, b.ci_low, b.ci_high, 4)} | {b.reason} |")
            lines.append("")
        if self.regression is not None:
            r = self.regression
            pct = f"{100 * r.ci:g}%"
            lines += [f"### Against the baseline `{r.baseline}`", "", *(f"- {n}" for n in r.notes), "",
                      f"| | metric | run | baseline | run - baseline [{pct} CI] | decision | gates |",
                      "|---|---|---|---|---|---|---|"]
            for d in r.differences:
                mark = "pass" if d.passed else "**FAIL**"
                lines.append(f"| {mark} | {d.metric} | {format_ci(d.run, digits=4)} | {format_ci(d.baseline, digits=4)}"
                             f" | {format_ci(d.difference, d.ci_low, d.ci_high, 4)} | {d.decision} | "
                             f"{'yes' if d.gates else 'no'} |")
            lines.append("")
        return "\n".join(lines)

    def to_junit(self) -> str:
        """JUnit XML: a <testsuite> of the bounds and one of the gated regressions, a <testcase> each,
        <failure> for the failing ones (what GitHub, GitLab and Jenkins test reports read)."""
        suites = ElementTree.Element("testsuites", name="vrp-eval gate")
        cases: list[tuple[str, list[tuple[str, str, str | None, str]]]] = []
        if self.bounds:
            cases.append(("vrp-eval gate: policy bounds", [
                (f"vrp_eval.gate.{b.task}", f"{b.bound} ({b.bound.decide})", None if b.passed else b.reason,
                 f"{b.bound.metric} = {format_ci(b.value, b.ci_low, b.ci_high, 4)}") for b in self.bounds]))
        if self.regression is not None:
            r = self.regression
            cases.append(("vrp-eval gate: regression against the baseline", [
                (f"vrp_eval.gate.{r.task}.baseline", f"{d.metric} not worse than the baseline",
                 None if d.passed else f"{d.metric} got worse: difference {format_ci(d.difference, d.ci_low, d.ci_high, 4)}",
                 f"{d.metric}: {d.decision}, difference {format_ci(d.difference, d.ci_low, d.ci_high, 4)}")
                for d in r.differences if d.gates]))
        total = failed = 0
        for name, rows in cases:
            failures = sum(message is not None for _, _, message, _ in rows)
            total, failed = total + len(rows), failed + failures
            suite = ElementTree.SubElement(suites, "testsuite", name=name, tests=str(len(rows)),
                                           failures=str(failures), errors="0", skipped="0", time="0")
            for classname, case_name, message, output in rows:
                case = ElementTree.SubElement(suite, "testcase", classname=classname, name=case_name, time="0")
                if message is not None:
                    failure = ElementTree.SubElement(case, "failure", message=message, type="GateFailure")
                    failure.text = message
                ElementTree.SubElement(case, "system-out").text = output
        suites.set("tests", str(total))
        suites.set("failures", str(failed))
        suites.set("errors", "0")
        ElementTree.indent(suites)
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(suites, encoding="unicode") + "\n"

    def write(self, *, summary: str | Path | None = None, junit: str | Path | None = None,
              step_summary: bool = True) -> list[Path]:
        """Write the Markdown summary and the JUnit file where asked; append the summary to
        $GITHUB_STEP_SUMMARY when that is set (a GitHub Actions job) and `step_summary`."""
        written = []
        for path, text in ((summary, self.to_markdown()), (junit, self.to_junit())):
            if path is not None:
                path = Path(path)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
                written.append(path)
        github = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary and github:
            with open(github, "a", encoding="utf-8") as out:
                out.write(self.to_markdown() + "\n")
            written.append(Path(github))
        return written


def check(results: str | Path | Mapping | Run, policy: str | Path | Mapping | Policy | None = None, *,
          baseline: str | Path | Run | None = None, gate_metrics: Sequence[str] = DEFAULT_GATE_METRICS,
          n_bootstrap: int = statistics.DEFAULT_N_BOOTSTRAP, seed: int = 0) -> GateReport:
    """Gate `results` (a run folder, a results file, a loaded Run or a results object) on `policy` (a
    YAML path, a mapping or a Policy) and/or against `baseline` (a run folder or results file with
    samples.jsonl beside it). PolicyError / ResultsError / CompareError for inputs that cannot be used."""
    if policy is None and baseline is None:
        raise PolicyError("nothing to check: give a policy (--policy POLICY.yaml), a baseline (--baseline RUN), "
                          "or both")
    if isinstance(results, Mapping):
        from vrp_eval.results import validate_results

        obj, source, run = validate_results(dict(results)), "results", None
    else:
        run = results if isinstance(results, Run) else load_run(results)
        obj, source = run.results, str(run.results_path)
    report = GateReport(source, str(obj["config"].get("model_name")))
    if policy is not None:
        if not isinstance(policy, Policy):
            policy = parse_policy(policy) if isinstance(policy, Mapping) else load_policy(policy)
        report.bounds = check_bounds(obj, policy, source)
    if baseline is not None:
        if run is None:
            raise PolicyError("a baseline comparison needs the run's samples: pass its run folder or results.json "
                              "path, not a results object")
        report.regression = regression(run, baseline, gate_metrics=gate_metrics, n_bootstrap=n_bootstrap, seed=seed)
    return report
