"""Speed of three stages of `vrp-eval run` against the way of 2026-12-01, on the zoo tiny-llava:
the knockout stage (every knockout window stacked in one generation, against one generation per
window), the clean prompt pass (the answer's own prefill recorded for the trace, the logit lens
and the probing features by `CleanCapture`, against answering and then a clean forward of its own)
and the held-out pass (the circuit's and the control window's corruptions in one generation,
against one generation each).

    .venv/bin/python benchmarks/bench_probe_passes.py                  # ~1 min, 1 thread
    .venv/bin/python benchmarks/bench_probe_passes.py --batches 2 --repeats 1   # seconds

As in a default run: vrp-synth validation in batches of 16, the discovery half of each batch, every
window of ceil(L/4) layers (7 windows of 2 on the 8-layer model), greedy answers of up to 8 tokens,
up to 4 x 16 rows per stacked generation (`KNOCKOUT_BATCHES`, as a run; `--max-rows` to vary);
with `--dataset vrp-synth-mc` the options are scored by likelihood instead. Both sides run over the
same batches in this script (best of `--repeats`, interleaved); the script asserts that they give the
same answers and probabilities, exactly. The clean-pass stage answers each whole batch (greedy, up
to 8 tokens) and asserts that both ways give the same answers and the same last-position states
(within float32 round-off). The held-out stage corrupts the held-out half of each batch in the
default run's circuit (4, 5) and control window (6, 7) (gaussian, scale 3, sigma from the first
batch; with the sharpness recorder, as a run does) and asserts the same answers. Results go to
benchmarks/results/probe_passes.json.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from vrp_eval.attention import SharpnessRecorder
from vrp_eval.data import load_examples
from vrp_eval.generation import generate_answers
from vrp_eval.intervention import estimate_sigma
from vrp_eval.loading import load_model
from vrp_eval.probe import _batches, _choices, _encode
from vrp_eval.records import ProbeSettings, half_of
from vrp_eval.tracing import (
    KNOCKOUT_BATCHES,
    CleanCapture,
    clean_run,
    corrupted_answers_per_window,
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

    # The clean prompt pass: answer, then a clean forward of its own (2026-12-01), or record the
    # answer's own prefill. Whole batches, as pass 1 answers them.
    batches = [_encode(loaded, chunk, settings) for chunk in _batches(examples, settings.batch_size)]
    n_all = sum(b["input_ids"].shape[0] for b in batches)

    def separate():
        out = []
        for batch in batches:
            answers = generate_answers(loaded, batch, max_new_tokens=settings.max_new_tokens)
            out.append((answers, clean_run(loaded, batch).last_position_states()))
        return out

    def captured():
        out = []
        for batch in batches:
            with CleanCapture(loaded, batch) as capture:
                answers = generate_answers(loaded, batch, max_new_tokens=settings.max_new_tokens)
            out.append((answers, capture.run.last_position_states()))
        return out

    captured()  # warm-up
    (captured_s, separate_s), (one, two) = timed_pair(captured, separate, args.repeats)
    for (answers_a, states_a), (answers_b, states_b) in zip(one, two):
        assert [(a.text, a.token_probs) for a in answers_a] == [(b.text, b.token_probs) for b in answers_b]
        # float32 round-off: generation numbers a left-padded row's positions from its first token
        assert float((states_a - states_b).abs().max()) < 1e-4
    clean = {"model": "tiny-llava", "dataset": args.dataset, "batch_size": settings.batch_size, "samples": n_all,
             "threads": args.threads, "repeats": args.repeats, "separate_s_per_sample": separate_s / n_all,
             "captured_s_per_sample": captured_s / n_all, "speedup": separate_s / captured_s,
             "max_state_difference": max(float((a[1] - b[1]).abs().max()) for a, b in zip(one, two))}
    print(f"answer + clean pass ({n_all} samples): answer then a clean forward {separate_s / n_all * 1e3:.1f} ms/sample, "
          f"the answer's prefill recorded {captured_s / n_all * 1e3:.1f} ms/sample, {clean['speedup']:.2f}x, "
          f"same answers, states within {clean['max_state_difference']:.1e}", flush=True)

    # The held-out pass: circuit and control window, one generation each (2026-12-01) or stacked.
    sigma = estimate_sigma(loaded, batches[:1])
    heldout = []
    for chunk in _batches(examples, settings.batch_size):
        rows = [i for i, e in enumerate(chunk) if half_of(e.question_id, settings.seed) == "heldout"]
        heldout.append((_encode(loaded, [chunk[i] for i in rows], settings), _choices(settings, [chunk[i] for i in rows])))
    n_heldout = sum(b["input_ids"].shape[0] for b, _ in heldout)

    def corrupt(one_at_a_time: bool):
        return [corrupted_answers_per_window(
            loaded, batch, [(4, 5), (6, 7)], "gaussian", 3.0, sigma, settings.seed, max_new_tokens=settings.max_new_tokens,
            choices=choices, observers=lambda b: [SharpnessRecorder.for_batch(loaded.adapter, b)],
            _one_at_a_time=one_at_a_time) for batch, choices in heldout]

    corrupt(False)  # warm-up
    (stacked_h, separate_h), (one_h, two_h) = timed_pair(lambda: corrupt(False), lambda: corrupt(True), args.repeats)
    same_h = all((x.text, x.token_probs, x.option_probs) == (y.text, y.token_probs, y.option_probs)
                 for a, b in zip(one_h, two_h) for wa, wb in zip(a, b) for x, y in zip(wa, wb))
    assert all((x.text, x.token_ids) == (y.text, y.token_ids)
               for a, b in zip(one_h, two_h) for wa, wb in zip(a, b) for x, y in zip(wa, wb))
    held = {"model": "tiny-llava", "dataset": args.dataset, "batch_size": settings.batch_size,
            "heldout_samples": n_heldout, "windows": [[4, 5], [6, 7]], "threads": args.threads, "repeats": args.repeats,
            "separate_s_per_sample": separate_h / n_heldout, "stacked_s_per_sample": stacked_h / n_heldout,
            "speedup": separate_h / stacked_h, "identical": same_h}
    print(f"held-out corruptions ({n_heldout} samples): one generation per window {separate_h / n_heldout * 1e3:.1f} "
          f"ms/sample, stacked {stacked_h / n_heldout * 1e3:.1f} ms/sample, {held['speedup']:.2f}x, same answers"
          f"{' (probabilities bit-identical)' if same_h else ''}", flush=True)

    output = Path(args.output)
    report = json.loads(output.read_text()) if output.exists() else {}
    report.setdefault("heldout", {})[args.dataset] = held
    report.setdefault("knockout", {})[args.dataset] = result
    report.setdefault("clean_pass", {})[args.dataset] = clean
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
