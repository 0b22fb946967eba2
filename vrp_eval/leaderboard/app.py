"""The vrp-eval reliability leaderboard (a Gradio 6 Space).

Reads a results dataset of `<org>/<model>/results_<timestamp>.json` files (written by `vrp-eval push`)
from the Hub with `snapshot_download`, or from a local folder:

    VRP_RESULTS_REPO=my-org/vrp-results python app.py      # endpoint: HF_ENDPOINT (default huggingface.co)
    VRP_RESULTS_DIR=runs/ python app.py                     # every *.json below the folder

Files that are not valid vrp-eval results are skipped and listed in a note above the table. Of several runs
of one model (name, revision, dtype) on one task, the newest by `config.created_at` (a UTC time once read)
is shown. Rows are ranked within each task by accuracy - ECE (see RANKING).

Everything a results file says reaches the visitor as text: the model column is HTML built here (a link
only to https://huggingface.co/<Hub id>), markdown gets `_markdown_text`, and the other components
(table cells, choices, plots) show their values as text. The page loads nothing from other hosts.
"""
from __future__ import annotations

import html
import math
import os
import re
import string
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import gradio as gr
import pandas as pd

from vrp_eval.results import METRICS, ResultsError, dataset_label, read_results

TITLE = "VLM Reliability Leaderboard"
#: Leaderboard columns share the SPEC vocabulary with results files and lmms-eval metrics.
INFO_COLUMNS = ["rank", "model", "task", "dataset", "n_samples", "model_family", "params_b", "model_size"]
#: What the default order ranks by (RANKING says why).
SCORE = "accuracy_minus_ece"
METRIC_COLUMNS = [SCORE, "accuracy", "ece", "ece_ci", "mce", "ace", "brier", "attn_conf_r", "attn_acc_r",
                  "attn_overconf_r", "causal_acc_drop", "control_acc_drop", "circuit_layers", "integration_layer"]
PROVENANCE_COLUMNS = ["model_dtype", "model_sha", "vrp_eval_version", "created_at"]
COLUMNS = INFO_COLUMNS + METRIC_COLUMNS + PROVENANCE_COLUMNS
#: Always shown: a row means nothing without them.
FIXED_COLUMNS = ["rank", "model"]
#: Shown until the visitor picks others.
DEFAULT_COLUMNS = ["task", "dataset", "n_samples", "model_size", SCORE, "accuracy", "ece", "ece_ci", "brier",
                   "attn_conf_r", "attn_overconf_r", "causal_acc_drop", "circuit_layers", "created_at"]
#: The better direction of the columns that have one, marked in their headers. The others describe a model
#: (where its circuit lies, how attention and confidence move together, how large it is) and are better
#: neither way.
BETTER = {SCORE: "↑", "accuracy": "↑", "ece": "↓", "mce": "↓", "ace": "↓", "brier": "↓",
          "attn_acc_r": "↑", "attn_overconf_r": "↓"}
#: Headers that are not the column's vocabulary name.
LABELS = {SCORE: "accuracy − ece", "model_size": "model size", "params_b": "params (B)",
          "created_at": "created_at (UTC)"}
#: Scores equal to this many decimals share a rank: closer than that is float noise, not a difference.
SCORE_DIGITS = 4
SIZE_BUCKETS = [("<1B", 1e9), ("1-4B", 4e9), ("4-10B", 10e9), ("10-30B", 30e9), (">30B", math.inf)]
UNKNOWN = "unknown"
#: A Hub repo id: the only thing a model cell links to (https://huggingface.co/<id>).
HUB_ID = re.compile(r"(?!.*(?:--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
#: Longest free-form value (a probe setting) the detail view shows before cutting it.
SHOWN_LENGTH = 200
#: A run without `created_at` counts as older than any run with one.
NEVER = datetime.min.replace(tzinfo=timezone.utc)

RANKING = """
## How the table is ranked

Within each task, rows are ranked by **accuracy − ece** (higher first). Scores equal to 4 decimals share a
rank; a row without accuracy or ECE gets none and comes last. Click a header to sort by that column instead:
↑ marks a column where higher is better, ↓ one where lower is better, and a column without an arrow describes
a model without being better either way.

**Why not ECE alone.** ECE measures only how far confidence is from accuracy. A model that is almost always
wrong *and says so* (confidence near 0) has an ECE near 0: ranked by ECE alone, a useless model comes first.
The Brier score of the confidences does not escape this: a model that is always wrong with confidence 0.05
scores 0.0025, far better than a perfectly calibrated model that is right 70% of the time (0.21).

**Why accuracy − ece.** Both are fractions of the same samples: the share of answers that are right, and the
average gap between what the model claims and what it achieves. Subtracting charges one point of accuracy for
each point of miscalibration, so calibration can lower a score but never lift it above the accuracy: a
useless model cannot come first, and of two equally accurate models the better calibrated one ranks higher.
The score is absolute, so adding a model never reorders the others (a rank average of accuracy and ECE would,
and would put an always-wrong, unconfident model in the middle of the field). What it does not measure is
whether confidence tells right answers from wrong ones: a model that always states its average accuracy has
an ECE near 0. The reliability diagram (Model detail) and `attn_acc_r` show that.
"""

ABOUT = """
## What is measured

vrp-eval scores vision-language models on **reliability**, not only accuracy (the VLM Reliability
Probe). Every column is a name from the shared vocabulary used in results files, lmms-eval metrics
and `evaluate` outputs.

| column | definition |
|---|---|
| `rank` | the place within the task by `accuracy − ece` (see *How the table is ranked*) |
| `accuracy − ece` | accuracy minus ECE: the ranking score (higher is better) |
| `dataset` | the run's data: a Hub dataset id or a path, or the task name for a task that reads local files (an lmms-eval `dataset_path: parquet` task), whose YAML names the files |
| `n_samples` | number of evaluated samples |
| `model size` | parameter-count bucket (`unknown` when the results file gives no `model_num_parameters`) |
| `accuracy` | mean per-sample score (VQA soft accuracy, exact match or option match) |
| `ece` | expected calibration error: 15 equal-width confidence bins, L1, weighted by bin count (lower is better); `ece_ci` is a seeded bootstrap 95% CI |
| `mce` | maximum calibration error: the largest bin gap |
| `ace` | adaptive ECE over equal-mass bins |
| `brier` | mean squared difference between confidence and score |
| `attn_conf_r` | Pearson r between attention sharpness (1 - normalised entropy of the answer position's attention over image tokens) and confidence |
| `attn_acc_r` | Pearson r between attention sharpness and the score |
| `attn_overconf_r` | Pearson r between attention sharpness and overconfidence max(0, confidence - score) |
| `causal_acc_drop` | relative accuracy change when the image-position hidden states inside the causal circuit are corrupted, on held-out samples (acc_corrupted / acc_clean - 1; more negative = more causal) |
| `control_acc_drop` | the same corruption in an equal-width window outside the circuit; a real circuit drops far more than its control |
| `circuit_layers` | the decoder-layer window [first, last] whose attention knockout from text to image positions hurts accuracy most (chosen on a discovery half) |
| `integration_layer` | the first layer where restoring the last position recovers more than restoring the image positions |
| `created_at (UTC)` | when the run was made; of several runs of one model (revision, dtype) on a task, the newest is shown |

Confidence is the product of the generated answer's token probabilities unless the probe settings
say otherwise. Sharper attention predicting confident *wrong* answers (high `attn_overconf_r`, near
zero `attn_acc_r`) is the warning sign this board is built to show.
""" + RANKING + """
## Citation

```bibtex
@software{vrp_eval,
  title  = {vrp-eval: the VLM Reliability Probe},
  author = {{vrp-eval contributors}},
  year   = {2025},
  url    = {https://github.com/vrp-eval/vrp-eval}
}
```
"""

SUBMIT = """
## Submit a model

This board shows the results files in the Hub dataset `{repo}`; `vrp-eval push` writes them.

1. Measure the model (a Hub id or a local folder) with vrp-eval:

   ```bash
   pip install vrp-eval
   vrp-eval run --model ORG/MODEL --dataset vrp-synth --output runs/my-model
   ```

   or run a `vrp_*` task in lmms-eval with the `vrp` backend, keeping the samples log:

   ```bash
   lmms-eval --model vrp --model_args pretrained=ORG/MODEL --tasks vrp_vqav2_lite --output_path results/ --log_samples
   ```

2. Check what would be uploaded (the file is validated; nothing is sent):

   ```bash
   vrp-eval push runs/my-model/results.json --repo {repo} --dry-run
   ```

3. Push it. The token comes from `HF_TOKEN`, from the variable named by `--token-env VAR`, or from
   `hf auth login`, and needs write access to the dataset:

   ```bash
   vrp-eval push runs/my-model/results.json --repo {repo}
   ```

An lmms-eval results file is pushed as it is, its `--log_samples` file beside it:
`vrp-eval push results/ORG__MODEL/<date>_results.json --repo {repo}` (`--lmms-task` picks one of several
`vrp_*` tasks). Without write access to `{repo}`, push to a dataset of your own (`--repo YOU/vrp-results`) and
ask in the Community tab of `{repo}` for the file to be added. The file lands at
`<org>/<model>/results_<UTC time>.json`, and pushing the same results again uploads nothing. Of several runs
of one model on one task, this board shows the newest (by `created_at`). `vrp-eval card RESULTS --push` opens
a pull request that adds the numbers to the model's card.
"""


@dataclass
class Leaderboard:
    """Valid results (newest per model, revision, dtype and task) and the files that were skipped."""

    results: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    problem: str = ""


def load_leaderboard(source: str | Path | None, cache_dir: str | Path | None = None) -> Leaderboard:
    """Read every results file under a local folder, or in a Hub dataset repo (via snapshot_download)."""
    board = Leaderboard()
    if not source:
        board.problem = "No results source: set VRP_RESULTS_REPO (a Hub dataset) or VRP_RESULTS_DIR (a folder)."
        return board
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(str(source), repo_type="dataset", allow_patterns=["*.json"],
                                            endpoint=os.environ.get("HF_ENDPOINT") or None,
                                            cache_dir=cache_dir))
        except Exception as error:  # noqa: BLE001 - an unreachable Hub must leave an empty board, not a crashed Space
            board.problem = f"Could not download `{source}`: {type(error).__name__}: {error}"
            return board
    newest: dict[tuple, dict] = {}
    for path in sorted(folder.rglob("*.json")):
        relative = path.relative_to(folder).as_posix()
        try:
            obj = read_results(path)
        except ResultsError as error:
            board.skipped.append(f"{relative}: {str(error).replace(str(path), '').lstrip(': ')}")
            continue
        obj["_file"] = relative
        config = obj["config"]
        for task in obj["results"]:
            key = (config["model_name"], config["model_sha"], config["model_dtype"], task)
            # times, not text: read_results gives every created_at as ISO UTC, whatever form the file held
            if key not in newest or _created(obj) > _created(newest[key]):
                newest[key] = obj
    board.results = list({id(obj): obj for obj in newest.values()}.values())
    return board


def _created(obj: dict) -> datetime:
    created = obj["config"].get("created_at")
    return datetime.fromisoformat(created) if created else NEVER


def size_bucket(num_parameters) -> str:
    if not _number(num_parameters) or num_parameters <= 0:
        return UNKNOWN
    return next(name for name, upper in SIZE_BUCKETS if num_parameters < upper)


def _number(value, digits: int = 4):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return round(value, digits) if isinstance(value, float) else value


def _markdown_text(value, limit: int | None = None) -> str:
    """`value` as literal text inside Gradio markdown.

    Every ASCII punctuation character becomes a numeric character reference, which markdown shows as
    that character but never parses: no tag, image, link, autolink (`www.`, `a@b`, `http:`), emphasis,
    code span, table cell or LaTeX delimiter can start. Control characters become spaces.
    """
    text = str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return "".join(f"&#{ord(ch)};" if ch in string.punctuation else " " if unicodedata.category(ch) == "Cc" else ch
                   for ch in text)


def _model_cell(name: str) -> str:
    """The model column's HTML: the escaped name, linked to its Hub page when it is a Hub id."""
    if HUB_ID.fullmatch(name):
        return f'<a href="https://huggingface.co/{name}" target="_blank" rel="noopener noreferrer">{html.escape(name)}</a>'
    return html.escape(name)


def _cell_text(cell: str) -> str:
    """The name back from a `_model_cell` (plots show names as text, not HTML)."""
    return html.unescape(re.sub(r"<[^>]*>", "", cell))


def _layers(value) -> str:
    return f"{value[0]}-{value[1]}" if isinstance(value, list) and len(value) == 2 else ""


def results_frame(board: Leaderboard) -> pd.DataFrame:
    """One row per (results file, task), SPEC metric names as columns, ranked within each task (`rank_frame`)."""
    rows = []
    for obj in board.results:
        config = obj["config"]
        for task, metrics in obj["results"].items():
            low, high = _number(metrics.get("ece_ci_low")), _number(metrics.get("ece_ci_high"))
            params = config.get("model_num_parameters")
            row = {
                "model": _model_cell(config["model_name"]), "task": task,
                "dataset": dataset_label(config["dataset"], task),
                "model_family": config.get("model_family") or UNKNOWN,
                "params_b": _number(params / 1e9, 2) if _number(params) else None, "model_size": size_bucket(params),
                "ece_ci": f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "",
                "circuit_layers": _layers(metrics.get("circuit_layers")),
                "model_dtype": config["model_dtype"], "model_sha": config["model_sha"][:10],
                "vrp_eval_version": config["vrp_eval_version"],
                "created_at": str(config.get("created_at", ""))[:19],
            }
            for name in METRICS:
                if name not in row:
                    row[name] = _number(metrics.get(name))
            rows.append(row)
    return rank_frame(pd.DataFrame(rows, columns=COLUMNS))


def rank_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with its ranking score (accuracy - ECE) and rank within each task, sorted by task and rank.

    Scores equal to SCORE_DIGITS decimals share a rank (1, 2, 2, 4), shown in order of accuracy; a row
    without accuracy or ECE has no score and no rank and comes last in its task.
    """
    frame = frame.copy()
    frame[SCORE] = (pd.to_numeric(frame["accuracy"]) - pd.to_numeric(frame["ece"])).round(SCORE_DIGITS)
    frame["rank"] = frame.groupby("task")[SCORE].rank(method="min", ascending=False)
    return (frame.sort_values(["task", "rank", "accuracy"], ascending=[True, True, False], na_position="last",
                              kind="stable")
            .reset_index(drop=True))


def header(column: str) -> str:
    """A column's header: its name (or LABELS entry) and the arrow of its better direction, if it has one."""
    label = LABELS.get(column, column)
    return f"{label} {BETTER[column]}" if column in BETTER else label


def _shown(columns) -> list[str]:
    return [c for c in COLUMNS if c in FIXED_COLUMNS or c in (columns or [])]


def shown_frame(frame: pd.DataFrame, columns) -> pd.DataFrame:
    """The FIXED_COLUMNS and the picked `columns`, in table order, under their headers."""
    return frame[_shown(columns)].rename(columns=header)


def datatypes(columns) -> list[str]:
    """The Dataframe datatypes of `shown_frame(frame, columns)`: the model cell is HTML built by `_model_cell`."""
    return ["html" if c == "model" else "number" if c in METRICS or c in ("rank", "params_b", SCORE) else "str"
            for c in _shown(columns)]


def filter_choices(frame: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """The tasks, model families and model sizes present, for the filter boxes."""
    sizes = set(frame["model_size"])
    return (sorted(frame["task"].unique()), sorted(frame["model_family"].unique()),
            [name for name, _ in SIZE_BUCKETS if name in sizes] + ([UNKNOWN] if UNKNOWN in sizes else []))


def filter_frame(frame: pd.DataFrame, tasks, families, sizes) -> pd.DataFrame:
    keep = (frame["task"].isin(tasks or []) & frame["model_family"].isin(families or [])
            & frame["model_size"].isin(sizes or []))
    return frame[keep].reset_index(drop=True)


def _entry_key(obj: dict, task: str) -> str:
    config = obj["config"]
    return f"{config['model_name']} · {task} · {config['model_dtype']} · {config['model_sha'][:7]}"


def detail_views(board: Leaderboard, key: str | None):
    """Markdown summary, reliability diagram, IE curves and knockout (circuit) frames for one entry."""
    empty = (pd.DataFrame(columns=["confidence", "accuracy", "series"]),
             pd.DataFrame(columns=["layer", "ie", "group"]), pd.DataFrame(columns=["window_start", "drop", "window"]))
    for obj in board.results:
        for task in obj["results"]:
            if _entry_key(obj, task) == key:
                return (_summary(obj, task), *_pictures(obj.get("details", {}).get(task, {})))
    return ("Pick a model above.", *empty)


def _code(value, limit: int | None = None) -> str:
    return f"<code>{_markdown_text(value, limit)}</code>"


def _summary(obj: dict, task: str) -> str:
    config, metrics = obj["config"], obj["results"][task]
    integration = _number(metrics.get("integration_layer"))
    lines = [f"### {_markdown_text(config['model_name'])} on {_code(task)}", "",
             (f"circuit layers **{_layers(metrics.get('circuit_layers')) or 'n/a'}**, "
              f"control layers {_layers(metrics.get('control_layers')) or 'n/a'}, "
              f"integration layer **{'n/a' if integration is None else integration}**"), "",
             "| metric | value | 95% CI |", "|---|---|---|"]
    for name, value in metrics.items():
        if name.endswith(("_ci_low", "_ci_high")) or isinstance(value, list):
            continue
        low, high = _number(metrics.get(f"{name}_ci_low")), _number(metrics.get(f"{name}_ci_high"))
        shown = _number(value, digits=12)
        lines.append(f"| {_code(name)} | {'n/a' if shown is None else f'{shown:.4g}'} | "
                     f"{f'[{low}, {high}]' if low is not None and high is not None else ''} |")
    lines += ["", (f"**Provenance**: revision {_code(config['model_sha'])}, dtype {_code(config['model_dtype'])}, "
                   f"dataset {_code(config['dataset'])} ({_markdown_text(config['split'])}, "
                   f"revision {_code(config.get('dataset_revision') or 'n/a')}), "
                   f"vrp-eval {_markdown_text(config['vrp_eval_version'])}, "
                   f"created {_markdown_text(config.get('created_at') or 'n/a')}, file {_code(obj['_file'])}.")]
    if config.get("probe"):
        lines.append("Probe settings: " + ", ".join(_code(f"{k}={v}", SHOWN_LENGTH) for k, v in config["probe"].items()))
    return "\n".join(lines)


def _pictures(details: dict):
    """Plot frames from a validated `details` entry (`null` parts give empty pictures)."""
    bins = [b for b in details.get("reliability_bins") or []
            if b["count"] and _number(b["mean_confidence"]) is not None and _number(b["mean_score"]) is not None]
    reliability = pd.DataFrame(
        [{"confidence": b["mean_confidence"], "accuracy": b["mean_score"], "series": "model"} for b in bins]
        + [{"confidence": x, "accuracy": x, "series": "perfect calibration"} for x in (0.0, 1.0)],
        columns=["confidence", "accuracy", "series"])
    curves = pd.DataFrame(
        [{"layer": layer, "ie": value, "group": group}
         for group, curve in (details.get("ie_curves") or {}).items()
         for layer, value in enumerate(curve) if _number(value) is not None],
        columns=["layer", "ie", "group"])
    windows = details.get("knockout_curve") or []
    width = len(str(max((e["window"][1] for e in windows), default=0)))
    knockout = pd.DataFrame(
        [{"window_start": entry["window"][0], "drop": _number(entry.get("drop")),
          "window": _window_label(entry["window"], width)} for entry in windows],
        columns=["window_start", "drop", "window"])
    return reliability, curves, knockout


def _window_label(window: list[int], width: int) -> str:
    # zero-padded so that the bar plot, which orders its categories as text, shows them in layer order
    return f"{window[0]:0{width}d}-{window[1]:0{width}d}"


def scatter_frame(frame: pd.DataFrame) -> pd.DataFrame:
    points = frame.dropna(subset=["ece", "causal_acc_drop"]).copy()
    points["model"] = points["model"].map(_cell_text)
    return points[["model", "task", "model_family", "ece", "causal_acc_drop"]]


def _scatter_limits(points: pd.DataFrame) -> dict:
    """Axes from 0 to a little past the data, so no point sits on the frame."""
    if points.empty:
        return {}
    high = float(points["ece"].max()) * 1.15 or 1.0
    low, top = float(points["causal_acc_drop"].min()), float(points["causal_acc_drop"].max())
    return {"x_lim": [0, high], "y_lim": [min(low * 1.15, -0.05), max(top, 0.0) + 0.05]}


def _note(board: Leaderboard) -> str:
    lines = [f"**{_markdown_text(board.problem)}**"] if board.problem else []
    if board.skipped:
        lines.append(f"**Skipped {len(board.skipped)} file(s) that are not valid vrp-eval results:**\n")
        lines += [f"- **{_markdown_text(path)}**: {_markdown_text(reason)}"
                  for path, reason in (line.split(": ", 1) for line in board.skipped)]
    return "\n".join(lines)


def submit_text(source: str | Path | None) -> str:
    """The Submit tab for a board that reads `source`: its own repo in the commands when that is a Hub id."""
    repo = str(source) if source and HUB_ID.fullmatch(str(source)) and not Path(source).is_dir() else "ORG/vrp-results"
    return SUBMIT.format(repo=repo)


def build_demo(results_dir_or_repo: str | Path | None = None, *, cache_dir: str | Path | None = None) -> gr.Blocks:
    """The leaderboard app for a local results folder or a Hub dataset repo id (default: from the environment)."""
    source = results_dir_or_repo or os.environ.get("VRP_RESULTS_DIR") or os.environ.get("VRP_RESULTS_REPO")
    board = load_leaderboard(source, cache_dir=cache_dir)
    frame = results_frame(board)
    tasks, families, sizes = filter_choices(frame)
    entries = [_entry_key(obj, task) for obj in board.results for task in obj["results"]]
    optional = [c for c in COLUMNS if c not in FIXED_COLUMNS]

    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}\nCalibration, attention-confidence coupling and causal circuits of "
                    f"vision-language models, measured with vrp-eval. {len(board.results)} result file(s). "
                    "Ranked within each task by accuracy − ECE (About says why); ↑ / ↓ mark the better direction.")
        note = _note(board)
        gr.Markdown(note, visible=bool(note), elem_id="skipped-note", latex_delimiters=[])
        with gr.Tabs():
            with gr.Tab("Leaderboard"):
                with gr.Row():
                    task_filter = gr.CheckboxGroup(tasks, value=tasks, label="task")
                    family_filter = gr.CheckboxGroup(families, value=families, label="model family")
                    size_filter = gr.CheckboxGroup(sizes, value=sizes, label="model size")
                column_picker = gr.CheckboxGroup([(header(c), c) for c in optional], value=DEFAULT_COLUMNS,
                                                 label="columns (rank and model are always shown)",
                                                 elem_id="column-picker")
                table = gr.Dataframe(shown_frame(frame, DEFAULT_COLUMNS), datatype=datatypes(DEFAULT_COLUMNS),
                                     show_search="filter", pinned_columns=len(FIXED_COLUMNS),
                                     interactive=False, wrap=False, elem_id="leaderboard-table",
                                     label="results (click a header to sort)")
                controls = [task_filter, family_filter, size_filter, column_picker]

                def shown(tasks, families, sizes, columns) -> gr.Dataframe:
                    # the datatypes travel with the columns: the model column must stay HTML, numbers numbers
                    return gr.Dataframe(shown_frame(filter_frame(frame, tasks, families, sizes), columns),
                                        datatype=datatypes(columns))

                for box in controls:
                    box.change(shown, controls, table, api_name="filter" if box is task_filter else False)
            with gr.Tab("Model detail"):
                entry = gr.Dropdown(entries, value=entries[0] if entries else None, label="model · task · dtype · revision")
                summary, reliability, curves, knockout = detail_views(board, entries[0] if entries else None)
                summary_md = gr.Markdown(summary, elem_id="model-summary", latex_delimiters=[])
                with gr.Row():
                    reliability_plot = gr.LinePlot(reliability, x="confidence", y="accuracy", color="series",
                                                   title="Reliability diagram", x_lim=[0, 1], y_lim=[0, 1],
                                                   x_title="mean confidence", y_title="mean score")
                    curves_plot = gr.LinePlot(curves, x="layer", y="ie", color="group",
                                              title="Indirect effect of restoring each layer", y_title="IE")
                knockout_plot = gr.BarPlot(knockout, x="window", y="drop", tooltip=["window", "drop"],
                                           title="Circuit search: accuracy drop when image attention is knocked out",
                                           x_title="knocked-out layers", y_title="accuracy drop")

                def detail(key: str | None):
                    return detail_views(board, key)

                entry.change(detail, entry, [summary_md, reliability_plot, curves_plot, knockout_plot],
                             api_name="detail")
            with gr.Tab("ECE vs causal drop"):
                points = scatter_frame(frame)
                gr.ScatterPlot(points, x="ece", y="causal_acc_drop", color="model_family", **_scatter_limits(points),
                               tooltip=["model", "task", "ece", "causal_acc_drop"],
                               title="Calibration error against causal accuracy drop",
                               x_title="ECE (lower is better)", y_title="causal accuracy drop", elem_id="ece-vs-drop")
            with gr.Tab("Submit"):
                gr.Markdown(submit_text(source), elem_id="submit-text")
            with gr.Tab("About"):
                gr.Markdown(ABOUT, elem_id="about-text")
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.launch()
