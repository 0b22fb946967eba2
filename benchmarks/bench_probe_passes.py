"""Speed of the knockout stage of `vrp-eval run`: every knockout window stacked in one generation
against one generation per window (the way of 2026-12-01), on the zoo tiny-llava.

    .venv/bin/python benchmarks/bench_probe_passes.py                  # ~1 min, 1 thread
    .venv/bin/python benchmarks/bench_probe_passes.py --batches 2 --repeats 1   # seconds

As in a default run: vrp-synth validation in batches of 16, the discovery half of each batch, every
window of ceil(L/4) layers (7 windows of 2 on the 8-layer model), greedy answers of up to 8 tokens,
up to 4 x 16 rows per stacked generation (`KNOCKOUT_BATCHES`, as a run; `--max-rows` to vary);
with `--dataset vrp-synth-mc` the options are scored by likelihood instead. Both sides run over the
same batches in this script (best of `--repeats`, interleaved); the script asserts that they give the
same answers and probabilities, exactly. Results go to benchmarks/results/probe_passes.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from vrp_eval.data import load_examples
from vrp_eval.loading import load_model
from vrp_eval.probe import _batches, _choices, _encode
from vrp_eval.records import ProbeSettings, half_of
from vrp_eval.tracing import (
    KNOCKOUT_BATCHES,
    knockout_answers_per_window,
    knockout_windows,
    window_width,
)


def timed_pair(first, second, repeats: int):
    """Best of `repeats` of each, the two interleaved so that a busy machine slows both alike."""
    best, out = [math.inf, math.inf], [None, None]
    for _ in range(repeats):
        for i, fn in enumerate((first, second)):
            start = time.perf_counter()
            out[i] = fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="vrp-synth")
    parser.add_argument("--batches", type=int, default=8, help="batches of 16 samples")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-rows", type=int, default=None,
                        help="rows per stacked generation (default: a run's, KNOCKOUT_BATCHES x the batch size)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "probe_passes.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model("tiny-llava", device="cpu")
    settings = ProbeSettings(dataset=args.dataset)
    examples = load_examples(args.dataset, "validation", limit=args.batches * settings.batch_size)
    max_rows = args.max_rows or KNOCKOUT_BATCHES * settings.batch_size
    windows = knockout_windows(loaded.adapter.num_layers, window_width(loaded.adapter.num_layers, settings.window))
    work = []  # (discovery sub-batch, its choices) per batch, as probe_batch builds them
    for chunk in _batches(examples, settings.batch_size):
        batch = _encode(loaded, chunk, settings)
        rows = [i for i, e in enumerate(chunk) if half_of(e.question_id, settings.seed) == "discovery"]
        work.append((loaded.adapter.select_rows(batch, rows), _choices(settings, [chunk[i] for i in rows])))
    n = sum(sub["input_ids"].shape[0] for sub, _ in work)

    def run(one_at_a_time: bool):
        return [knockout_answers_per_window(loaded, sub, windows, max_new_tokens=settings.max_new_tokens,
                                            choices=choices, max_rows=max_rows, _one_at_a_time=one_at_a_time)
                for sub, choices in work]

    run(False)  # warm-up
    (stacked_s, per_window_s), (stacked, per_window) = timed_pair(lambda: run(False), lambda: run(True), args.repeats)
    same = all((x.text, x.token_probs, x.option_probs) == (y.text, y.token_probs, y.option_probs)
               for a, b in zip(stacked, per_window) for wa, wb in zip(a, b) for x, y in zip(wa, wb))
    assert same, "the stacked knockouts answer differently from one window at a time"
    result = {"model": "tiny-llava", "dataset": args.dataset, "batch_size": settings.batch_size,
              "discovery_samples": n, "windows": len(windows), "max_rows": max_rows, "threads": args.threads,
              "repeats": args.repeats,
              "per_window_s_per_sample": per_window_s / n, "stacked_s_per_sample": stacked_s / n,
              "speedup": per_window_s / stacked_s, "identical": same}
    print(f"knockouts ({args.dataset}, {len(windows)} windows, {n} discovery samples in batches of "
          f"{settings.batch_size}): one generation per window {per_window_s / n * 1e3:.1f} ms/sample, stacked "
          f"{stacked_s / n * 1e3:.1f} ms/sample, {result['speedup']:.2f}x, identical answers", flush=True)

    output = Path(args.output)
    report = json.loads(output.read_text()) if output.exists() else {}
    report.setdefault("knockout", {})[args.dataset] = result
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
