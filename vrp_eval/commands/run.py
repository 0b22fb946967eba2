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

from vrp_eval.probe import DEFAULT_SIGNALS, SIGNALS
from vrp_eval.zoo import DEFAULT_MODEL


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'0-3,7' -> (0, 1, 2, 3, 7)."""
    if not text:
        return None
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            first, last = (int(x) for x in part.split("-", 1))
            layers.extend(range(first, last + 1))
        elif part:
            layers.append(int(part))
    return tuple(layers)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="Hub id, local save_pretrained folder, or zoo name (default: %(default)s)")
    parser.add_argument("--dataset", default="vrp-synth",
                        help="vrp-synth | vrp-synth-mc | a local parquet/json/save_to_disk path | a Hub dataset id")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.add_argument("--device-map", default=None, help="passed to from_pretrained (e.g. auto)")
    parser.add_argument("--revision", default=None, help="Hub revision of the model")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--output", default=None, help="output folder (default: runs/<model>-<date>)")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--confidence", default="product", choices=["product", "first_token", "length_norm", "option"])
    parser.add_argument("--n-bins", type=int, default=15)
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--on-bad-image", default="error", choices=["error", "skip"])
    parser.add_argument("--task-name", default=None, help="name of the task in results.json (default: from the dataset)")
    probe = parser.add_argument_group("probe engine")
    probe.add_argument("--signals", default=",".join(DEFAULT_SIGNALS),
                       help=f"comma-separated, from {', '.join(SIGNALS)} (default: %(default)s; "
                            "consistency samples K answers and is off by default)")
    probe.add_argument("--layers", default=None,
                       help="decoder layers to trace, e.g. '0-7' or '2,4,6-9' (default: all)")
    probe.add_argument("--window", type=int, default=None, help="knockout window width (default: ceil(L/4))")
    probe.add_argument("--noise", default="gaussian", choices=["gaussian", "mean", "zero"])
    probe.add_argument("--noise-scale", type=float, default=3.0, help="k: gaussian std = k * sigma")
    probe.add_argument("--n-noise", type=int, default=5, help="K noise samples per input")
    probe.add_argument("--n-calibration", type=int, default=64, help="samples used to estimate sigma")
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


def write_pictures(output: Path, title: str, metrics: dict[str, Any], details: dict[str, Any],
                   records: list[Any]) -> list[Path]:
    """The reliability diagram and, when the engine ran, the trace heatmap, IE curves and scatter."""
    from vrp_eval import plots

    written = [plots.reliability_diagram(details["reliability_bins"], metrics["ece"], output / "reliability.png",
                                         title=title)]
    if details.get("ie_curves"):
        written.append(plots.trace_heatmap(details["ie_curves"], output / "trace_heatmap.png", title=title))
        written.append(plots.ie_curves(details["ie_curves"], output / "ie_curves.png",
                                       integration_layer=metrics.get("integration_layer"),
                                       circuit=metrics.get("circuit_layers"), title=title))
    if records and all(getattr(r, "sharpness", None) is not None for r in records):
        written.append(plots.sharpness_scatter([r.sharpness for r in records], [r.confidence for r in records],
                                               [r.score for r in records], output / "sharpness_confidence.png",
                                               title=title))
    return written


def _from_lmms(args: argparse.Namespace) -> int:
    from vrp_eval.lmms_results import read_lmms_results
    from vrp_eval.results import build_results, write_results

    run = read_lmms_results(args.from_lmms, task=args.lmms_task)
    output = Path(args.output or Path(args.from_lmms).with_suffix("").as_posix() + "-vrp")
    output.mkdir(parents=True, exist_ok=True)
    write_results(build_results(config=run.config, task=run.task, metrics=run.metrics, details=run.details),
                  output / "results.json")
    (output / "samples.jsonl").write_text("".join(r.to_json() + "\n" for r in run.records))
    pictures = write_pictures(output, f"{run.config.get('model_name')} on {run.task}", run.metrics, run.details,
                              run.records)
    print(format_summary(str(run.config.get("model_name")), run.task, run.metrics))
    print(f"\nwrote {output / 'results.json'}, {output / 'samples.jsonl'}, " + ", ".join(str(p) for p in pictures))
    return 0


def main(args: argparse.Namespace) -> int:
    from vrp_eval import __version__
    from vrp_eval.data import DataError
    from vrp_eval.loading import ModelLoadError, load_model
    from vrp_eval.probe import ProbeSettings, run_probe
    from vrp_eval.results import ResultsError, build_results, write_results

    if args.from_lmms:
        try:
            return _from_lmms(args)
        except (ValueError, OSError) as error:
            print(f"vrp-eval run: {error}", file=sys.stderr)
            return 2
    if args.limit is not None and args.limit <= 0:
        print(f"vrp-eval run: --limit must be a positive number of samples, got {args.limit}", file=sys.stderr)
        return 2
    try:
        settings = ProbeSettings(
            dataset=args.dataset, split=args.split, limit=args.limit, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, confidence=args.confidence, n_bins=args.n_bins,
            n_bootstrap=args.n_bootstrap, seed=args.seed, on_bad_image=args.on_bad_image,
            signals=tuple(x.strip() for x in args.signals.split(",") if x.strip()),
            layers=parse_layers(args.layers), window=args.window, noise=args.noise, noise_scale=args.noise_scale,
            n_noise=args.n_noise, n_calibration=args.n_calibration,
        )
    except ValueError as error:
        print(f"vrp-eval run: {error}", file=sys.stderr)
        return 2
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = Path(args.output or f"runs/{Path(args.model).name}-{stamp}")
    try:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                            revision=args.revision, trust_remote_code=args.trust_remote_code)
        report = run_probe(loaded, settings, output_dir=output, overwrite=args.overwrite)
    except (ModelLoadError, DataError, ValueError, FloatingPointError) as error:
        print(f"vrp-eval run: {error}", file=sys.stderr)
        if (output / "pass1.partial.jsonl").exists():
            print(f"vrp-eval run: the samples finished so far are kept in {output}; run the same command again "
                  "to resume", file=sys.stderr)
        return 2
    task = args.task_name or _task_name(args.dataset)
    config = {
        "model_name": loaded.model_name, "model_sha": loaded.model_sha, "model_dtype": loaded.dtype,
        "model_family": loaded.family, "model_num_parameters": loaded.num_parameters(),
        "vrp_eval_version": __version__, "dataset": args.dataset, "split": args.split, "task": task,
        "probe": settings.to_dict(), "versions": _versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        results = build_results(config=config, task=task, metrics=report.metrics, details=report.details)
    except ResultsError as error:
        print(f"vrp-eval run: {error}", file=sys.stderr)
        return 2
    write_results(results, output / "results.json")
    pictures = write_pictures(output, f"{loaded.model_name} on {task}", report.metrics, report.details,
                              report.records)
    print(format_summary(loaded.model_name, task, report.metrics))
    if report.skipped:
        print(f"skipped {len(report.skipped)} samples whose image did not decode: {report.skipped[:10]}")
    print(f"\nwrote {output / 'results.json'}, {output / 'samples.jsonl'}, " + ", ".join(str(p) for p in pictures))
    return 0
