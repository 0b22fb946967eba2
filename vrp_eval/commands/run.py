"""`vrp-eval run`: probe a model on a dataset and write results.json, samples.jsonl and pictures.

With no arguments it evaluates the shipped tiny-llava on vrp-synth validation, offline.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import sys
from pathlib import Path
from typing import Any

from vrp_eval.errors import VrpError
from vrp_eval.options import OPTIONS, add_arguments
from vrp_eval.zoo import DEFAULT_MODEL


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub id, local save_pretrained folder, or zoo name (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. auto)")
    parser.add_argument("--revision", default=None, help="Hub revision of the model")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--output", default=None, help="output folder (default: runs/<model>-<date>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again: delete this folder's earlier run (results, samples, partial files, "
                             "pictures) instead of resuming it")
    parser.add_argument("--task-name", default=None, help="name of the task in results.json (default: from the dataset)")
    add_arguments(parser.add_argument_group("probe options (the same names work as lmms-eval / lm-eval model_args)"))
    parser.add_argument("--from-lmms", default=None, metavar="RESULTS_JSON",
                        help="build the report from an lmms-eval results file (+ its --log_samples file) "
                             "instead of running a model")
    parser.add_argument("--lmms-task", default=None, help="with --from-lmms: which vrp_* task of the file")


def _task_name(dataset: str) -> str:
    path = Path(dataset)
    stem = (path.stem if path.is_file() else path.name) if path.exists() else dataset.split("/")[-1]
    return "vrp_" + stem.replace("vrp-", "").replace("-", "_").replace(".", "_").lower()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("vrp-eval", "torch", "transformers", "datasets", "evaluate", "lmms-eval", "huggingface_hub", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def format_summary(model: str, task: str, metrics: dict[str, Any]) -> str:
    """A readable table of the aggregate metrics."""
    rows = []
    for key, value in metrics.items():
        if key.endswith(("_ci_low", "_ci_high")):
            continue
        if isinstance(value, float):
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            text = "nan" if math.isnan(value) else f"{value:.4f}"
            if isinstance(low, float) and isinstance(high, float) and not math.isnan(low):
                text += f"  [{low:.4f}, {high:.4f}]"
        else:
            text = str(value)
        rows.append((key, text))
    width = max(len(k) for k, _ in rows)
    lines = [f"vrp-eval  model={model}  task={task}", "-" * (width + 30)]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


#: What `vrp-eval run` writes beside the probe's own files (`probe.RUN_FILES`).
RESULTS_FILE = "results.json"
PICTURES = ("reliability.png", "trace_heatmap.png", "ie_curves.png", "sharpness_confidence.png", "risk_coverage.png")


def write_pictures(output: Path, title: str, metrics: dict[str, Any], details: dict[str, Any],
                   records: list[Any]) -> list[Path]:
    """The reliability diagram and, when the engine ran, the trace heatmap, IE curves and scatter."""
    from vrp_eval import plots

    written = [plots.reliability_diagram(details["reliability_bins"], metrics["ece"], output / PICTURES[0],
                                         title=title)]
    if details.get("ie_curves"):
        written.append(plots.trace_heatmap(details["ie_curves"], output / PICTURES[1], title=title))
        written.append(plots.ie_curves(details["ie_curves"], output / PICTURES[2],
                                       integration_layer=metrics.get("integration_layer"),
                                       circuit=metrics.get("circuit_layers"), title=title))
    if records and all(getattr(r, "sharpness", None) is not None for r in records):
        written.append(plots.sharpness_scatter([r.sharpness for r in records], [r.confidence for r in records],
                                               [r.score for r in records], output / PICTURES[3],
                                               title=title))
    if details.get("signal_comparison"):
        written.append(plots.risk_coverage_curves(details["signal_comparison"], output / PICTURES[4], title=title))
    return written


def format_report(model: str, task: str, metrics: dict[str, Any], details: dict[str, Any]) -> str:
    """The summary table, then the signal comparison when the run has one."""
    text = format_summary(model, task, metrics)
    if details.get("signal_comparison"):
        from vrp_eval.signal_comparison import format_signal_table

        text += "\n\n" + format_signal_table(details["signal_comparison"])
    return text


def cpu_threads() -> int:
    """The CPUs this process may use less those other processes keep busy (the 1-minute load average),
    at least 1. torch's default (every physical core) oversubscribes a shared machine: a default run
    took 91 s wall and 143 s CPU with 2 threads beside two busy processes on 2 cores, 77.5 s wall and
    77 s CPU with 1."""
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cpus, round(cpus - busy)))


def limit_cpu_threads() -> int:
    """torch's CPU threads, capped at `cpu_threads()` (never raised); a user's OMP_NUM_THREADS or
    MKL_NUM_THREADS wins. Returns the thread count in use."""
    import os

    import torch

    if not os.environ.get("OMP_NUM_THREADS") and not os.environ.get("MKL_NUM_THREADS"):
        torch.set_num_threads(max(1, min(torch.get_num_threads(), cpu_threads())))
    return torch.get_num_threads()


def _from_lmms(args: argparse.Namespace) -> int:
    from vrp_eval.lmms_results import read_lmms_results
    from vrp_eval.results import build_results, write_results

    output = Path(args.output or Path(args.from_lmms).with_suffix("").as_posix() + "-vrp")
    prepare_output(output, args.overwrite, resumable=False)
    run = read_lmms_results(args.from_lmms, task=args.lmms_task)
    output.mkdir(parents=True, exist_ok=True)
    write_results(build_results(config=run.config, task=run.task, metrics=run.metrics, details=run.details),
                  output / "results.json")
    (output / "samples.jsonl").write_text("".join(r.to_json() + "\n" for r in run.records))
    pictures = write_pictures(output, f"{run.config.get('model_name')} on {run.task}", run.metrics, run.details,
                              run.records)
    print(format_report(str(run.config.get("model_name")), run.task, run.metrics, run.details))
    print(f"\nwrote {output / 'results.json'}, {output / 'samples.jsonl'}, " + ", ".join(str(p) for p in pictures))
    return 0


class OutputError(VrpError, ValueError):
    """The output folder cannot take this run; the message says why and what to do."""


def prepare_output(folder: Path, overwrite: bool, *, resumable: bool) -> None:
    """Check, before any work, that `folder` can hold this run's files and holds no other run's.

    `--overwrite` deletes every file an earlier run wrote there (and nothing else), so results,
    samples and pictures of two runs never sit side by side. Without it, a folder with an earlier
    run is refused, except an earlier `vrp-eval run` where the run itself can check and resume it
    (`resumable`: the probe compares its run key, model and settings, before reusing anything)."""
    from vrp_eval.probe import RUN_FILES

    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output {folder} is a file, not a folder: choose a folder path")
    ours = [p for p in folder.iterdir() if p.name in (*RUN_FILES, RESULTS_FILE, *PICTURES)] if folder.is_dir() else []
    if ours and overwrite:
        for path in ours:
            path.unlink()
    elif ours and not (resumable and (folder / "run_key.json").is_file()):  # only the probe's own runs resume
        raise OutputError(f"--output {folder} already holds another run ({', '.join(sorted(p.name for p in ours))}); "
                          "choose a new folder, or pass --overwrite to replace that run")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".vrp-eval-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"--output {folder} cannot be written ({error.strerror or error}): "
                          "choose a folder you can write to") from None


def main(args: argparse.Namespace) -> int:
    from vrp_eval.data import load_examples
    from vrp_eval.loading import check_device, load_model
    from vrp_eval.probe import ProbeSettings, check_examples, run_probe
    from vrp_eval.records import model_block
    from vrp_eval.results import build_results, write_results

    if args.from_lmms:
        return _from_lmms(args)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = Path(args.output or f"runs/{Path(args.model).name}-{stamp}")
    # Everything that can be checked without the model, before it is loaded: options, device,
    # output folder, the dataset's schema. Errors propagate to the CLI (one line, exit code 2).
    settings = ProbeSettings(**{opt.name: getattr(args, opt.name) for opt in OPTIONS if opt.cli})
    check_device(args.device)
    limit_cpu_threads()
    prepare_output(output, args.overwrite, resumable=True)
    examples = load_examples(settings.dataset, settings.split, settings.limit)
    check_examples(examples, settings)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                        revision=args.revision, trust_remote_code=args.trust_remote_code)
    try:
        report = run_probe(loaded, settings, output_dir=output, overwrite=args.overwrite, examples=examples)
    except VrpError as error:
        if (output / "pass1.partial.jsonl").exists():
            error.add_note(f"the samples finished so far are kept in {output}; once the problem above is fixed, "
                           "the same command resumes from them")
        raise
    task = args.task_name or _task_name(settings.dataset)
    config = {
        **model_block(loaded), "dataset": settings.dataset, "split": settings.split, "task": task,
        "probe": settings.to_dict(), "versions": _versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    results = build_results(config=config, task=task, metrics=report.metrics, details=report.details)
    write_results(results, output / RESULTS_FILE)
    pictures = write_pictures(output, f"{loaded.model_name} on {task}", report.metrics, report.details,
                              report.records)
    print(format_report(loaded.model_name, task, report.metrics, report.details))
    if report.skipped:
        print(f"skipped {len(report.skipped)} samples whose image did not decode: {report.skipped[:10]}")
    print(f"\nwrote {output / RESULTS_FILE}, {output / 'samples.jsonl'}, " + ", ".join(str(p) for p in pictures))
    return 0
