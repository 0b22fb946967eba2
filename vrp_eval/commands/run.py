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

from vrp_eval.zoo import DEFAULT_MODEL


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


def _task_name(dataset: str) -> str:
    stem = Path(dataset).name if Path(dataset).exists() else dataset.split("/")[-1]
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


def main(args: argparse.Namespace) -> int:
    from vrp_eval import __version__
    from vrp_eval.data import DataError
    from vrp_eval.loading import ModelLoadError, load_model
    from vrp_eval.plots import reliability_diagram
    from vrp_eval.probe import ProbeSettings, run_probe
    from vrp_eval.results import build_results, write_results

    if args.limit is not None and args.limit <= 0:
        print(f"vrp-eval run: --limit must be a positive number of samples, got {args.limit}", file=sys.stderr)
        return 2
    settings = ProbeSettings(
        dataset=args.dataset, split=args.split, limit=args.limit, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, confidence=args.confidence, n_bins=args.n_bins,
        n_bootstrap=args.n_bootstrap, seed=args.seed, on_bad_image=args.on_bad_image,
    )
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = Path(args.output or f"runs/{Path(args.model).name}-{stamp}")
    try:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map,
                            revision=args.revision, trust_remote_code=args.trust_remote_code)
        report = run_probe(loaded, settings, output_dir=output, overwrite=args.overwrite)
    except (ModelLoadError, DataError, ValueError, FloatingPointError) as error:
        print(f"vrp-eval run: {error}", file=sys.stderr)
        return 2
    task = args.task_name or _task_name(args.dataset)
    config = {
        "model_name": loaded.model_name, "model_sha": loaded.model_sha, "model_dtype": loaded.dtype,
        "model_family": loaded.family, "model_num_parameters": loaded.num_parameters(),
        "vrp_eval_version": __version__, "dataset": args.dataset, "split": args.split, "task": task,
        "probe": settings.to_dict(), "versions": _versions(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    results = build_results(config=config, task=task, metrics=report.metrics, details=report.details)
    write_results(results, output / "results.json")
    reliability_diagram(report.details["reliability_bins"], report.metrics["ece"], output / "reliability.png",
                        title=f"{loaded.model_name} on {task}")
    print(format_summary(loaded.model_name, task, report.metrics))
    if report.skipped:
        print(f"skipped {len(report.skipped)} samples whose image did not decode: {report.skipped[:10]}")
    print(f"\nwrote {output / 'results.json'}, {output / 'samples.jsonl'}, {output / 'reliability.png'}")
    return 0
