"""Speed of the causal-tracing restoration sweep: the naive loop, the engine of 2026-12-01 and today's
`trace_batch`, next to the floor (the least work any exact restoration sweep can do).

    .venv/bin/python benchmarks/bench_tracing.py                          # the whole grid, 1 thread
    .venv/bin/python benchmarks/bench_tracing.py --layers 8 16            # a part of it (merged into the JSON)
    .venv/bin/python benchmarks/bench_tracing.py --layers 8 --tokens 36 --no-naive   # a second

Models: random-init LLaVA architecture of small width (width 128, intermediate 256, 4 heads, a
1-layer CLIP tower, patch 4) with L in {8, 16, 32} decoder layers and 36, 256 or 576 image tokens
(24, 64, 96 px images: 576 is LLaVA-1.5's count, 32 x 576 its shape), plus the trained zoo
tiny-llava (L=8, width 64, 36 image tokens) when it is installed. A left-padded batch of 2 prompts,
gaussian embedding noise k = 3, K = 2 noise samples, every decoder layer x {image, text, last}.

Sides, all in this process on the same batch:
  naive       one full model forward (vision tower included) per (noise sample, layer, group), plain
              hooks: what the prior tools do;
  from_image  `trace_batch(..., _from_image=True)`: the engine of 2026-12-01 (every replay starts at
              the first image position, the corrupted run replays every position);
  engine      `trace_batch`: the corrupted run replays from the first image position over the clean
              keys/values, the image group only the tail after the image;
  floor       1 + K [n/T + (L-1)/2 (2 n_tail + 1)/T] forward-pass equivalents per sample (T prompt
              positions, n from the first image position, n_tail after the image; averaged over the
              batch's rows on its padded length), costed in seconds at the measured time of one
              plain forward pass.
The script asserts that the engine's p_clean, p_corrupted and IE agree with the naive loop and with
`from_image` within 1e-5. It also times the trace of 8 default-run batches (`vrp-eval run`'s
settings: tiny-llava, batches of 16 vrp-synth prompts, K = 5), engine against `from_image`.
Results go to benchmarks/results/tracing.json (entries of other shapes already there are kept).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vrp_eval.adapters import adapter_for
from vrp_eval.intervention import (
    EmbeddingCorruption,
    RestoreHiddenStates,
    estimate_sigma,
)
from vrp_eval.loading import LoadedModel
from vrp_eval.tracing import TRACE_GROUPS, TraceSettings, trace_batch
from vrp_eval.zoo.build import TinySpec, build_tiny

WORDS = ["what", "color", "is", "the", "circle", "square", "red", "green", "blue", "yes", "no", "left", "right", "0", "1", "2", "3"]
QUESTIONS = ["what color is the circle left of the square?", "is the square red?", "what color is the square?",
             "is the circle left of the square?"]
LAYERS = (8, 16, 32)
IMAGE_TOKENS = (36, 256, 576)
PATCH = 4
TOLERANCE = 1e-5


def spec(num_layers: int, image_tokens: int) -> TinySpec:
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise ValueError(f"{image_tokens} image tokens is not a square grid")
    return TinySpec(num_layers=num_layers, hidden_size=128, intermediate_size=256, num_heads=4, vision_layers=1,
                    vision_hidden=64, patch_size=PATCH, image_size=side * PATCH)


def build(num_layers: int, image_tokens: int) -> LoadedModel:
    model, processor = build_tiny("llava", WORDS, spec(num_layers, image_tokens), seed=0)
    return LoadedModel(model=model, processor=processor, adapter=adapter_for(model, processor),
                       model_name=f"random-llava-L{num_layers}-{image_tokens}", model_path="", model_sha="",
                       dtype="float32")


def images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@torch.no_grad()
def naive_trace(loaded, batch, targets, settings: TraceSettings, sigma):
    """p_corrupted (K, B) and IE {group: (L, B)}: one full forward per (noise sample, layer, group)."""
    adapter, model = loaded.adapter, loaded.model
    inputs = adapter.model_inputs(batch)
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    rows, target = torch.arange(len(targets)), torch.tensor(targets)
    passes = 0

    def p_target():
        nonlocal passes
        passes += 1
        return model(**inputs, use_cache=False).logits[:, -1].float().softmax(-1)[rows, target]

    clean = {}
    handles = [layer.register_forward_hook(lambda m, a, out, i=i: clean.__setitem__(i, out))
               for i, layer in enumerate(adapter.decoder_layers)]
    p_clean = p_target()
    for handle in handles:
        handle.remove()
    num_layers = adapter.num_layers
    n_noise = settings.noise_samples()
    p_corrupted = torch.zeros(n_noise, len(targets))
    restored = {g: torch.zeros(n_noise, num_layers, len(targets)) for g in TRACE_GROUPS}
    for k in range(n_noise):
        with EmbeddingCorruption(adapter, groups["image"], settings.kind, settings.scale, sigma.embedding["image"],
                                 seed=settings.seed, noise_index=k):
            p_corrupted[k] = p_target()
            for group in TRACE_GROUPS:
                for layer in range(num_layers):
                    with RestoreHiddenStates(adapter, layer, groups[group], clean[layer]):
                        restored[group][k, layer] = p_target()
    ie = {g: (restored[g] - p_corrupted[:, None]).mean(0) for g in TRACE_GROUPS}
    return p_clean, p_corrupted, ie, passes  # each batch pass carries every sample


def floor_passes(groups: dict[str, torch.Tensor], num_layers: int, n_noise: int) -> float:
    """1 + K [n/T + (L-1)/2 (2 n_tail + 1)/T] per sample, averaged over the rows, T the padded length:
    the clean pass, the corrupted run from the first image position (the positions before it are
    clean), and per restored layer the layers after it over the positions the restoration changes
    (image: the tail after the image, whose prefix is then clean; text: the tail; last: 1)."""
    length = groups["all"].shape[1]
    columns = torch.arange(length)
    image_start = torch.where(groups["image"], columns, length).amin(1).double()
    image_end = torch.where(groups["image"], columns, -1).amax(1).double()
    n, n_tail = length - image_start, length - 1 - image_end
    per_row = 1 + n_noise * (n / length + (num_layers - 1) / 2 * (2 * n_tail + 1) / length)
    return float(per_row.mean())


def max_diff(results, p_clean, p_corrupted, ie, n_noise: int, num_layers: int) -> float:
    diff = max(abs(r.p_clean - float(p_clean[i])) for i, r in enumerate(results))
    diff = max(diff, max(abs(r.p_corrupted_samples[k] - float(p_corrupted[k][i]))
                         for i, r in enumerate(results) for k in range(n_noise)))
    return max(diff, max(abs(r.ie[g][l] - float(ie[g][l][i])) for i, r in enumerate(results)
                         for g in TRACE_GROUPS for l in range(num_layers)))


def timed(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench(loaded: LoadedModel, n_samples: int, n_noise: int, repeats: int, naive: bool) -> dict:
    adapter = loaded.adapter
    num_layers = adapter.num_layers
    size = adapter.processor.image_processor.crop_size["height"]
    batch = adapter.encode(images(n_samples, size), [adapter.build_prompt(q) for q in QUESTIONS[:n_samples]])
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    inputs = adapter.model_inputs(batch)
    with torch.no_grad():
        logits = loaded.model(**inputs).logits[:, -1]
    targets = logits.argmax(-1).tolist()
    sigma = estimate_sigma(loaded, [batch])
    settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=n_noise, seed=0)

    trace_batch(loaded, batch, targets, TraceSettings(kind="mean", layers=[num_layers - 1]))  # warm-up
    with torch.no_grad():
        forward_s, _ = timed(lambda: loaded.model(**inputs, use_cache=False, logits_to_keep=1), 3)
    engine_s, engine = timed(lambda: trace_batch(loaded, batch, targets, settings, sigma), repeats)
    before_s, before = timed(lambda: trace_batch(loaded, batch, targets, settings, sigma, _from_image=True), repeats)
    as_arrays = ([r.p_clean for r in before], [[r.p_corrupted_samples[k] for r in before] for k in range(n_noise)],
                 {g: [[r.ie[g][l] for r in before] for l in range(num_layers)] for g in TRACE_GROUPS})
    diff_before = max_diff(engine, *as_arrays, n_noise, num_layers)
    assert diff_before <= TOLERANCE, f"the engine differs from the from-image engine by {diff_before:.2e}"

    floor = floor_passes(groups, num_layers, n_noise)
    per = 1 / n_samples
    result = {
        "model": loaded.model_name, "decoder_layers": num_layers, "width": adapter.text_config.hidden_size,
        "image_tokens": int(groups["image"][0].sum()), "sequence_length": int(batch["input_ids"].shape[1]),
        "samples": n_samples, "noise_samples": n_noise, "groups": list(TRACE_GROUPS), "repeats": repeats,
        "forward_s_per_sample": forward_s * per,
        "from_image_s_per_sample": before_s * per, "engine_s_per_sample": engine_s * per,
        "floor_s_per_sample": floor * forward_s * per,
        "naive_passes_per_sample": 1 + n_noise * (1 + len(TRACE_GROUPS) * num_layers),
        "from_image_passes_per_sample": before[0].cost.forward_passes,
        "engine_passes_per_sample": engine[0].cost.forward_passes, "floor_passes_per_sample": floor,
        "speedup_over_from_image": before_s / engine_s,
        "engine_over_floor_passes": engine[0].cost.forward_passes / floor,
        "engine_over_floor_s": engine_s / (floor * forward_s),
        "max_abs_diff_from_image": diff_before,
        "largest_abs_ie": max(abs(v) for r in engine for g in TRACE_GROUPS for v in r.ie[g]),
    }
    line = (f"L={num_layers:>2} image={result['image_tokens']:>3} T={result['sequence_length']:>3} | "
            f"passes/sample: naive {result['naive_passes_per_sample']} from-image "
            f"{result['from_image_passes_per_sample']:.2f} engine {result['engine_passes_per_sample']:.2f} "
            f"floor {floor:.2f} (engine/floor {result['engine_over_floor_passes']:.3f}) | s/sample: from-image "
            f"{result['from_image_s_per_sample']:.3f} engine {result['engine_s_per_sample']:.3f} floor "
            f"{result['floor_s_per_sample']:.3f} | engine vs from-image {result['speedup_over_from_image']:.2f}x")
    if naive:
        naive_s, (p_clean, p_corrupted, ie, _) = timed(
            lambda: naive_trace(loaded, batch, targets, settings, sigma), 1)
        diff = max_diff(engine, p_clean, p_corrupted, ie, n_noise, num_layers)
        assert diff <= TOLERANCE, f"the engine differs from the naive loop by {diff:.2e}"
        result.update(naive_s_per_sample=naive_s * per, speedup_over_naive=naive_s / engine_s,
                      max_abs_diff_naive=diff)
        line += f" | naive {naive_s * per:.2f} s/sample, engine vs naive {naive_s / engine_s:.1f}x, |diff| {diff:.1e}"
    print(line, flush=True)
    return result


def bench_default_run(n_batches: int, repeats: int) -> dict | None:
    """The trace as `vrp-eval run` does it by default: the zoo tiny-llava, vrp-synth validation in
    batches of `batch_size`, K = `n_noise`; the engine against `from_image` over the same batches."""
    from vrp_eval.data import load_examples
    from vrp_eval.generation import generate_answers
    from vrp_eval.loading import ModelLoadError, load_model
    from vrp_eval.probe import _batches, _encode, _trace_settings
    from vrp_eval.records import ProbeSettings

    try:
        loaded = load_model("tiny-llava", device="cpu")
    except ModelLoadError:
        print("the zoo tiny-llava is not installed: default-run batches skipped", flush=True)
        return None
    settings = ProbeSettings()
    examples = load_examples("vrp-synth", "validation", limit=n_batches * settings.batch_size)
    batches = [_encode(loaded, chunk, settings) for chunk in _batches(examples, settings.batch_size)]
    targets = [[a.first_token_id for a in generate_answers(loaded, b, max_new_tokens=1)] for b in batches]
    sigma = estimate_sigma(loaded, batches[:1])
    trace = _trace_settings(settings)

    def run(from_image: bool):
        return [trace_batch(loaded, b, t, trace, sigma, _from_image=from_image) for b, t in zip(batches, targets)]

    engine_s, engine = timed(lambda: run(False), repeats)
    before_s, before = timed(lambda: run(True), repeats)
    diff = max(abs(a - c) for x, y in zip(engine, before) for r1, r2 in zip(x, y) for g in r1.ie
               for a, c in zip(r1.ie[g], r2.ie[g]))
    assert diff <= TOLERANCE, f"the engine differs from the from-image engine by {diff:.2e}"
    n = len(examples)
    result = {"model": "tiny-llava (default run)", "samples": n, "batch_size": settings.batch_size,
              "noise_samples": trace.noise_samples(),
              "from_image_s_per_sample": before_s / n, "engine_s_per_sample": engine_s / n,
              "from_image_passes_per_sample": float(np.mean([r[0].cost.forward_passes for r in before])),
              "engine_passes_per_sample": float(np.mean([r[0].cost.forward_passes for r in engine])),
              "speedup_over_from_image": before_s / engine_s, "max_abs_diff_from_image": diff}
    print(f"default run (tiny-llava, batches of {settings.batch_size}, K={result['noise_samples']}, {n} samples): "
          f"from-image {before_s / n * 1e3:.1f} ms/sample ({result['from_image_passes_per_sample']:.2f} passes), "
          f"engine {engine_s / n * 1e3:.1f} ms/sample ({result['engine_passes_per_sample']:.2f} passes), "
          f"{result['speedup_over_from_image']:.2f}x, max |diff| {diff:.1e}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", type=int, default=list(LAYERS))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(IMAGE_TOKENS), help="image tokens (squares)")
    parser.add_argument("--zoo", action=argparse.BooleanOptionalAction, default=True,
                        help="also the trained zoo tiny-llava, when installed")
    parser.add_argument("--naive", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--default-run-batches", type=int, default=8,
                        help="also the trace of this many default-run batches (0: no)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--noise", type=int, default=2, help="K noise samples")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "tracing.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    output = Path(args.output)
    kept, default_run = [], None
    if output.exists():
        previous = json.loads(output.read_text())
        kept = [r for r in previous.get("results", []) if "engine_passes_per_sample" in r]
        default_run = previous.get("default_run")
    if args.default_run_batches:
        default_run = bench_default_run(args.default_run_batches, args.repeats) or default_run
    results = []
    if args.zoo:
        from vrp_eval.loading import ModelLoadError, load_model

        try:
            results.append(bench(load_model("tiny-llava", device="cpu"), args.samples, args.noise, args.repeats,
                                 args.naive))
        except ModelLoadError:
            print("the zoo tiny-llava is not installed: skipped", flush=True)
    for num_layers in args.layers:
        for image_tokens in args.tokens:
            results.append(bench(build(num_layers, image_tokens), args.samples, args.noise, args.repeats, args.naive))
    new = {r["model"] for r in results}
    merged = sorted([r for r in kept if r["model"] not in new] + results,
                    key=lambda r: (r["model"] != "tiny-llava", r["decoder_layers"], r["image_tokens"]))
    report = {"benchmark": "tracing", "threads": args.threads, "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "device": "cpu",
              "default_run": default_run, "results": merged}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
