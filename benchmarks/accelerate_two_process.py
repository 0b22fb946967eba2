"""`lmms-eval --model vrp` in one process vs `accelerate launch --num_processes 2 --cpu`.

Each process scores its shard; the run-wide choices (the circuit window on the discovery half) go
through `run_probe(reduce=...)`; rank 0 aggregates every sample. This script runs both on the same
samples, prints every metric side by side with the largest difference, and the wall-time ratio.

    python benchmarks/accelerate_two_process.py [--model tiny-llava] [--limit 48] [--probe "signals=..."]

Offline; without zoo weights it builds a random-init tiny LLaVA (numbers are then meaningless but
must still agree).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


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


def _run(launcher: list[str], model: str, args: argparse.Namespace, out: Path) -> tuple[dict, float]:
    command = [*launcher, "--model", "vrp", "--model_args", f"pretrained={model},device=cpu,{args.probe}".rstrip(","),
               "--tasks", args.task, "--limit", str(args.limit), "--batch_size", str(args.batch_size),
               "--output_path", str(out), "--verbosity", "WARNING"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if run.returncode != 0 or "Error during evaluation" in run.stdout:
        sys.exit(f"{' '.join(command)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    (path,) = out.glob("**/*_results.json")
    results = json.loads(path.read_text())["results"][args.task]
    return {k.split(",")[0]: v for k, v in results.items() if "_stderr" not in k and k != "alias"}, seconds


def _difference(a, b) -> float:
    if isinstance(a, list) or isinstance(b, list):
        return 0.0 if a == b else math.inf
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) and math.isnan(b):
            return 0.0
        return abs(a - b)
    return 0.0 if a == b else math.inf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--task", default="vrp_synth")
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--probe", default="n_noise=2,n_calibration=16,n_bootstrap=200",
                        help="extra model_args (probe options)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = _model(args.model, scratch)
        one, t_one = _run([str(BIN / "lmms-eval")], model, args, scratch / "one")
        two, t_two = _run([str(BIN / "accelerate"), "launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmms_eval"],
                          model, args, scratch / "two")
    width = max(map(len, one))
    print(f"{'metric'.ljust(width)}  {'1 process':>22}  {'2 processes':>22}  |diff|")
    worst = 0.0
    for name in one:
        diff = _difference(one[name], two.get(name))
        worst = max(worst, diff)
        print(f"{name.ljust(width)}  {one[name]!s:>22}  {two.get(name)!s:>22}  {diff:.2e}")
    print(f"\nlargest difference: {worst:.3e}   wall time 2 processes / 1 process: {t_two / t_one:.2f} "
          f"({t_two:.1f} s / {t_one:.1f} s, {args.limit} samples)")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
