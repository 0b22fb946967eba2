"""Runs side by side: read run folders / results files, and the study's comparison table.

    from vrp_eval.compare import load_run, comparison_table
    table = comparison_table([load_run("runs/a"), load_run("runs/b")], sort="ece")
    print(table.to_markdown())

A *run* is what `vrp-eval run --output DIR` leaves: `DIR/results.json` (the schema of
docs/results-schema.md) and, beside it, `DIR/samples.jsonl` (one `records.SampleRecord` per line).
A results file alone is a run without samples: enough for the table and for a policy, not for a
comparison against a baseline (that one needs the samples, see `vrp_eval.gate`).

The table has one row per (run, task): model, family, parameters, samples, accuracy, ECE,
attention-confidence r and causal accuracy drop with their 95% CIs, circuit layers and integration
layer, sorted best first by one metric (its direction from `metric_table`).
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vrp_eval import metric_table
from vrp_eval.errors import VrpError
from vrp_eval.results import read_results

__all__ = [
    "COLUMNS",
    "DEFAULT_SORT",
    "CompareError",
    "ComparisonTable",
    "Run",
    "Samples",
    "comparison_table",
    "format_ci",
    "format_parameters",
    "load_run",
    "metric",
    "read_samples",
]

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
#: The metrics of the table that carry a CI, in column order, with the label a paper or card shows.
COLUMNS = {"accuracy": "Accuracy", "ece": "ECE", "attn_conf_r": "Attention-confidence r",
           "causal_acc_drop": "Causal accuracy drop"}
#: Best calibrated first: the reliability question the study asks.
DEFAULT_SORT = "ece"


class CompareError(VrpError, ValueError):
    """A run, results file or option that cannot be compared; the message says what to do."""


def metric(name: str) -> metric_table.Metric:
    """The metric table's row for `name`, or a CompareError naming the nearest metric."""
    rows = {m.name: m for m in metric_table.TABLE}
    if name not in rows:
        close = difflib.get_close_matches(name, rows, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise CompareError(f"unknown metric {name!r}: {hint}choose one of {', '.join(rows)}")
    return rows[name]


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Samples:
    """The per-sample values of a run that its metrics are recomputed from, in samples.jsonl order."""

    question_ids: tuple[Any, ...]
    confidences: np.ndarray
    scores: np.ndarray
    #: None when the run did not record attention.
    sharpness: np.ndarray | None
    #: The held-out half of the circuit runs (empty without the circuit signal).
    heldout_ids: tuple[Any, ...] = ()
    heldout_clean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heldout_corrupted: np.ndarray = field(default_factory=lambda: np.zeros(0))
    heldout_control: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.question_ids)


@dataclass(frozen=True)
class Run:
    """A results object and where it came from (with its samples.jsonl when there is one)."""

    results_path: Path
    results: dict
    samples_path: Path | None

    @property
    def tasks(self) -> list[str]:
        return list(self.results["results"])

    @property
    def config(self) -> dict:
        return self.results["config"]

    @property
    def label(self) -> str:
        return str(self.config.get("model_name"))

    def samples(self) -> Samples:
        if self.samples_path is None:
            raise CompareError(f"{self.results_path} has no {SAMPLES_FILE} beside it: per-sample comparisons need "
                               f"the run folder `vrp-eval run --output DIR` wrote, not a results file alone")
        return read_samples(self.samples_path)


def load_run(path: str | Path) -> Run:
    """A run folder (holding results.json) or a results file; CompareError / ResultsError otherwise."""
    path = Path(path)
    results_path = path / RESULTS_FILE if path.is_dir() else path
    if not results_path.is_file():
        what = f"{path} holds no {RESULTS_FILE}" if path.is_dir() else f"{path} does not exist"
        raise CompareError(f"{what}: pass a run folder written by `vrp-eval run --output DIR` or its results.json")
    results = read_results(results_path)
    samples_path = results_path.with_name(SAMPLES_FILE)
    return Run(results_path, results, samples_path if samples_path.is_file() else None)


def read_samples(path: str | Path) -> Samples:
    """The values of a samples.jsonl that the metrics are computed from."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((row["question_id"], float(row["confidence"]), float(row["score"]), row.get("sharpness"),
                             row.get("corrupted_score"), row.get("control_score")))
            except (ValueError, KeyError, TypeError) as error:
                raise CompareError(f"{path}:{number} is not a vrp-eval sample record ({error!r}); "
                                   "rerun `vrp-eval run` to rewrite the run folder") from None
    if not rows:
        raise CompareError(f"{path} holds no samples: rerun `vrp-eval run` to rewrite the run folder")
    ids, confidences, scores, sharpness, corrupted, control = zip(*rows)
    heldout = [i for i, value in enumerate(corrupted) if value is not None]
    return Samples(
        question_ids=ids, confidences=np.asarray(confidences), scores=np.asarray(scores),
        sharpness=None if any(s is None for s in sharpness) else np.asarray(sharpness, dtype=float),
        heldout_ids=tuple(ids[i] for i in heldout),
        heldout_clean=np.asarray([scores[i] for i in heldout], dtype=float),
        heldout_corrupted=np.asarray([corrupted[i] for i in heldout], dtype=float),
        heldout_control=np.asarray([np.nan if control[i] is None else control[i] for i in heldout], dtype=float),
    )


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_ci(value: Any, low: Any = None, high: Any = None, digits: int = 3) -> str:
    """`0.091 [0.068, 0.167]`; `n/a` for a metric that is missing or could not be computed."""
    if not _finite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    if _finite(low) and _finite(high):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def format_parameters(count: Any) -> str:
    """977088 -> `0.98M`, 7063427072 -> `7.06B` (the units model cards use)."""
    if not _finite(count):
        return "n/a"
    if count >= 1e9:
        return f"{count / 1e9:.2f}B"
    return f"{count / 1e6:.2f}M" if count >= 1e5 else str(int(count))


def _layers(value: Any) -> str:
    return f"{value[0]}-{value[1]}" if isinstance(value, list) and len(value) == 2 else "n/a"


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One (run, task) of the table."""

    model: str
    family: str
    parameters: Any
    task: str
    source: str
    metrics: dict

    def get(self, name: str) -> Any:
        value = self.metrics.get(name)
        return value if _finite(value) or isinstance(value, list) else None


@dataclass(frozen=True)
class ComparisonTable:
    rows: list[Row]
    sort: str

    def header(self) -> list[str]:
        return ["Model", "Family", "Parameters", "Task", "Samples",
                *(f"{label} [95% CI]" if metric(name).ci else label for name, label in COLUMNS.items()),
                "Circuit layers", "Integration layer"]

    def cells(self, row: Row) -> list[str]:
        n = row.get("n_samples")
        integration = row.get("integration_layer")
        return [row.model, row.family, format_parameters(row.parameters), row.task,
                "n/a" if n is None else str(int(n)),
                *(format_ci(row.get(name), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high"))
                  for name in COLUMNS),
                _layers(row.metrics.get("circuit_layers")),
                "n/a" if integration is None else str(int(integration))]

    def to_markdown(self) -> str:
        best = "lowest" if not metric(self.sort).higher_is_better else "highest"
        lines = [f"| {' | '.join(self.header())} |", f"|{'---|' * len(self.header())}"]
        lines += [f"| {' | '.join(self.cells(row))} |" for row in self.rows]
        lines += ["", (f"Sorted by `{self.sort}`, {best} (best) first. Brackets: 95% CIs (ECE: bootstrap; "
                      "r: Fisher z; causal drop: paired bootstrap over the held-out half). Circuit layers: the "
                      "decoder-layer window whose attention knockout drops accuracy most; integration layer: the "
                      "first layer where the last position's indirect effect exceeds the image positions'. "
                      "Written by `vrp-eval compare`.")]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        names = [c for name in COLUMNS for c in (name, f"{name}_ci_low", f"{name}_ci_high")]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["model", "family", "model_num_parameters", "task", "n_samples", *names,
                         "circuit_first", "circuit_last", "integration_layer", "source"])
        for row in self.rows:
            circuit = row.metrics.get("circuit_layers")
            circuit = circuit if isinstance(circuit, list) and len(circuit) == 2 else ["", ""]
            writer.writerow([row.model, row.family, "" if row.parameters is None else row.parameters, row.task,
                             *("" if row.get(c) is None else row.get(c) for c in ("n_samples", *names)),
                             *circuit, "" if row.get("integration_layer") is None else row.get("integration_layer"),
                             row.source])
        return out.getvalue()

    def plot(self, path: str | Path) -> Path:
        """One panel per CI metric: each row's point and 95% CI (a forest plot)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        names = [name for name in COLUMNS if name != "accuracy"]
        labels = [f"{row.model} ({row.task})" if len({r.task for r in self.rows}) > 1 else row.model
                  for row in self.rows]
        figure = Figure(figsize=(4.0 * len(names), 1.2 + 0.45 * len(self.rows)), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, len(names), sharey=True)
        positions = np.arange(len(self.rows))[::-1]
        for axis, name in zip(axes, names):
            for y, row in zip(positions, self.rows):
                value, low, high = row.get(name), row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
                if value is None:
                    continue
                error = [[value - low], [high - value]] if low is not None and high is not None else None
                axis.errorbar([value], [y], xerr=error, fmt="o", color="C0", capsize=3)
            if name != "ece":
                axis.axvline(0.0, color="0.6", linewidth=0.8)
            axis.set_title(COLUMNS[name] + (" (lower is better)" if not metric(name).higher_is_better else ""),
                           fontsize=9)
            axis.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(positions, labels, fontsize=8)
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        return path

    def write(self, folder: str | Path) -> list[Path]:
        """compare.md, compare.csv and compare.png in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "compare.md").write_text(self.to_markdown(), encoding="utf-8")
        (folder / "compare.csv").write_text(self.to_csv(), encoding="utf-8")
        return [folder / "compare.md", folder / "compare.csv", self.plot(folder / "compare.png")]


def _sort_key(name: str):
    higher = metric(name).higher_is_better

    def key(row: Row) -> tuple[int, float]:
        value = row.get(name)
        if value is None or isinstance(value, list):
            return 1, 0.0  # missing or not computed: last
        return 0, -value if higher else value

    return key


def comparison_table(runs: Iterable[Run], *, sort: str = DEFAULT_SORT, tasks: Sequence[str] | None = None
                     ) -> ComparisonTable:
    """The table over `runs` (all their tasks, or those in `tasks`), best `sort` first."""
    if metric(sort).layer_range:
        raise CompareError(f"cannot sort by {sort!r}: it is a layer range; sort by a number such as "
                           f"{DEFAULT_SORT!r} or 'causal_acc_drop'")
    rows = []
    for run in runs:
        chosen = run.tasks if not tasks else [t for t in run.tasks if t in tasks]
        for task in chosen:
            rows.append(Row(run.label, str(run.config.get("model_family") or "n/a"),
                            run.config.get("model_num_parameters"), task, str(run.results_path),
                            run.results["results"][task]))
    names = [row.model for row in rows]
    # The same model twice (two checkpoints' runs, a rerun): tell the rows apart by their run folder or file.
    rows = [row if names.count(row.model) == 1 else
            Row(f"{row.model} ({_run_name(Path(row.source))})", *_rest(row)) for row in rows]
    if not rows:
        raise CompareError(f"no run holds the task(s) {', '.join(tasks or [])}: leave out --task or name a task "
                           "the runs report")
    return ComparisonTable(sorted(rows, key=_sort_key(sort)), sort)


def _run_name(results_path: Path) -> str:
    return results_path.parent.name if results_path.name == RESULTS_FILE else results_path.stem


def _rest(row: Row) -> tuple:
    return row.family, row.parameters, row.task, row.source, row.metrics
