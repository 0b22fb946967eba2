"""`lmms-eval --model vrp` in one process vs two real processes on the CPU (gloo).

Each process scores its shard; the run-wide choices (the noise scale's calibration samples, the
circuit window on the discovery half) are made on every process's samples (`_global_first`,
`run_probe(reduce=...)`); rank 0 aggregates every sample. This script runs both on the same samples,
checks from lmms-eval's log that two ranks ran (rank 1 announces itself; rank 0 post-processes only
its shard), prints every metric side by side with the largest difference, and the wall-time ratio.
Results go to benchmarks/results/two_process.json.

    python benchmarks/accelerate_two_process.py [--launcher accelerate|torchrun] [--limit 48]

The two-process command (docs/multi-process.md). `accelerate launch --cpu --num_processes 2` would
start one process: `--cpu` selects accelerate's single-process launcher (or mpirun, given
`--mpirun_hostfile`); `--multi_gpu` selects torch.distributed.run, and ACCELERATE_USE_CPU=true makes
each process join a gloo group on the CPU:

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m lmms_eval --model vrp ...

Offline; without zoo weights it builds a random-init tiny LLaVA (numbers are then meaningless but
must still agree).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
LAUNCHERS = {
    "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "lmms_eval"],
    "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lmms_eval"],
}
# Above this, a difference is more than the float32 noise of per-sample values computed in other
# batches (measured up to 6.6e-7; see tests/test_multiprocess.py, which holds the same comparison).
TOLERANCE = 1e-5


def _model(name: str, scratch: Path) -> str:
    from vrp_eval.zoo import is_zoo_name, zoo_path

    if not is_zoo_name(name) or (zoo_path(name) / "config.json").exists():
        return name
    import torch

    from vrp_eval.synth import vocabulary
    from vrp_eval.zoo.build import build_tiny

    torch.manual_seed(0)
    model, processor = build_tiny("llava", vocabulary(), seed=1)
    path = scratch / "random-tiny-llava"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    print(f"{name} has no weights yet: using a random-init tiny LLaVA", flush=True)
    return str(path)


def _run(launcher: list[str], model: str, args: argparse.Namespace, out: Path) -> dict:
    """One evaluation: its metrics, times, and the ranks and shard size read from lmms-eval's log."""
    command = [*launcher, "--model", "vrp", "--model_args", f"pretrained={model},device=cpu,{args.probe}".rstrip(","),
               "--tasks", args.task, "--limit", str(args.limit), "--batch_size", str(args.batch_size),
               "--output_path", str(out), "--verbosity", "INFO"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true")
    load = os.getloadavg()[0]
    start = time.perf_counter()
    # cwd: `-m lmms_eval` puts the working directory first on sys.path; run what is installed.
    run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, check=False,
                         cwd=out.parent)
    seconds = time.perf_counter() - start
    if run.returncode != 0 or "Error during evaluation" in run.stdout:
        sys.exit(f"{' '.join(command)} failed:\n{run.stdout[-5000:]}")
    (path,) = out.glob("**/*_results.json")
    saved = json.loads(path.read_text())
    metrics = {k.split(",")[0]: v for k, v in saved["results"][args.task].items() if "_stderr" not in k and k != "alias"}
    ranks = sorted({int(r) for r in re.findall(r"Running on rank (\d+) \(local rank \d+\)", run.stdout)})
    shard = re.findall(rf"Postprocessed (\d+) docs for {re.escape(args.task)}/", run.stdout)
    shown = [Path(command[0]).name, *command[1:-3], "OUT", *command[-2:]]  # no machine paths
    return {"command": "ACCELERATE_USE_CPU=true " + " ".join(shown), "metrics": metrics, "wall_s": seconds,
            "evaluation_s": float(saved["total_evaluation_time_seconds"]), "load_average_before": load,
            "ranks": ranks, "rank0_docs": int(shard[0]) if shard else None}


def _difference(a, b) -> float:
    if isinstance(a, float) and isinstance(b, float):
        return 0.0 if math.isnan(a) and math.isnan(b) else abs(a - b)
    return 0.0 if a == b else math.inf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="accelerate")
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--task", default="vrp_synth")
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--probe", default="n_noise=2,n_calibration=16,n_bootstrap=200",
                        help="extra model_args (probe options)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "two_process.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = _model(args.model, scratch)
        one = _run([str(BIN / "lmms-eval")], model, args, scratch / "one")
        two = _run(LAUNCHERS[args.launcher], model, args, scratch / "two")
    # The world size, from the log: both ranks ran, rank 0 on its shard only, and the results count all.
    shard = math.ceil(args.limit / 2)
    if one["ranks"] != [0] or two["ranks"] != [0, 1] or two["rank0_docs"] != shard \
            or two["metrics"].get("n_samples") != args.limit:
        sys.exit(f"not a two-process run: ranks {two['ranks']}, rank 0 post-processed {two['rank0_docs']} docs "
                 f"(expected {shard}), n_samples {two['metrics'].get('n_samples')}")
    print(f"world size 2 ({args.launcher}): ranks {two['ranks']}, rank 0 post-processed {shard} of {args.limit} docs")

    a, b = one["metrics"], two["metrics"]
    rows = [{"metric": name, "one_process": a.get(name), "two_processes": b.get(name),
             "abs_diff": _difference(a.get(name), b.get(name))} for name in [*a, *(k for k in b if k not in a)]]
    width = max(len(row["metric"]) for row in rows)
    print(f"{'metric'.ljust(width)}  {'1 process':>22}  {'2 processes':>22}  |diff|")
    for row in rows:
        print(f"{row['metric'].ljust(width)}  {row['one_process']!s:>22}  {row['two_processes']!s:>22}  "
              f"{row['abs_diff']:.2e}")
    worst = max(row["abs_diff"] for row in rows)
    wall, evaluation = two["wall_s"] / one["wall_s"], two["evaluation_s"] / one["evaluation_s"]
    print(f"\nlargest difference: {worst:.3e} (tolerance {TOLERANCE:g})")
    print(f"wall time 2 processes / 1 process: {wall:.2f} ({two['wall_s']:.1f} s / {one['wall_s']:.1f} s); "
          f"lmms-eval evaluation time only: {evaluation:.2f} ({two['evaluation_s']:.1f} s / {one['evaluation_s']:.1f} s); "
          f"{args.limit} samples, {os.cpu_count()} CPU cores, load average before {one['load_average_before']:.2f} / "
          f"{two['load_average_before']:.2f}")

    import torch

    report = {"benchmark": "two_process", "launcher": args.launcher, "threads_per_process": 1,
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "device": "cpu", "cpu_cores": os.cpu_count(), "model": args.model, "task": args.task,
              "limit": args.limit, "batch_size": args.batch_size, "probe": args.probe,
              "world_size": len(two["ranks"]), "rank0_docs": two["rank0_docs"],
              "commands": {"one_process": one["command"], "two_processes": two["command"]},
              "wall_s": {"one_process": one["wall_s"], "two_processes": two["wall_s"], "ratio": wall},
              "evaluation_s": {"one_process": one["evaluation_s"], "two_processes": two["evaluation_s"],
                               "ratio": evaluation},
              "load_average_before": {"one_process": one["load_average_before"],
                                      "two_processes": two["load_average_before"]},
              "largest_abs_diff": worst if math.isfinite(worst) else None, "tolerance": TOLERANCE,
              # abs_diff null: a list or count that differs (no distance)
              "metrics": [{**row, "abs_diff": row["abs_diff"] if math.isfinite(row["abs_diff"]) else None}
                          for row in rows]}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
