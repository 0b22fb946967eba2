"""Speed of the causal-tracing restoration sweep: vrp_eval.tracing.trace_batch against a naive loop.

The naive loop is what the prior tools do: one full model forward pass (vision tower included) per
(layer, group) and noise sample, with plain hooks: the corrupted embeddings, and layer l's output at
the group's positions replaced by the clean run's. Both sides compute p_clean, p_corrupted and the
IE of every decoder layer x {image, text, last}; the script asserts that they agree within 1e-5 and
reports the wall-clock ratio and the forward passes per sample.

    .venv/bin/python benchmarks/bench_tracing.py                 # both models, 1 thread
    .venv/bin/python benchmarks/bench_tracing.py --models tiny --threads 2

Models: `tiny` is tiny-llava-sized (8 decoder layers, width 64, 36 image tokens; the trained zoo
weights when they are installed, random init otherwise); `large` is a random-init LLaVA-architecture
model with 24 decoder layers, width 512 and 256 image tokens (64 x 64 images, patch 4).
Results go to benchmarks/results/tracing.json.
"""
from __future__ import annotations

import argparse
import json
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
SPECS = {
    "tiny": TinySpec(),
    "large": TinySpec(num_layers=24, hidden_size=512, intermediate_size=1024, num_heads=8, vision_layers=1,
                      vision_hidden=64, patch_size=4, image_size=64),
}
TOLERANCE = 1e-5


def build(name: str) -> LoadedModel:
    if name == "tiny":
        from vrp_eval.loading import ModelLoadError, load_model

        try:
            return load_model("tiny-llava", device="cpu")
        except ModelLoadError:  # the zoo weights are not built yet: the same architecture, random init
            pass
    model, processor = build_tiny("llava", WORDS, SPECS[name], seed=0)
    return LoadedModel(model=model, processor=processor, adapter=adapter_for(model, processor),
                       model_name=f"random-llava-{name}", model_path="", model_sha="", dtype="float32")


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


def bench(name: str, n_samples: int, n_noise: int, repeats: int) -> dict:
    loaded = build(name)
    adapter = loaded.adapter
    size = adapter.processor.image_processor.crop_size["height"]
    batch = adapter.encode(images(n_samples, size), [adapter.build_prompt(q) for q in QUESTIONS[:n_samples]])
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        logits = loaded.model(**adapter.model_inputs(batch)).logits[:, -1]
    targets = logits.argmax(-1).tolist()
    sigma = estimate_sigma(loaded, [batch])
    settings = TraceSettings(kind="gaussian", scale=3.0, n_noise=n_noise, seed=0)

    trace_batch(loaded, batch, targets, settings, sigma)  # warm-up
    fast_times, naive_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fast = trace_batch(loaded, batch, targets, settings, sigma)
        fast_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        p_clean, p_corrupted, ie, naive_passes = naive_trace(loaded, batch, targets, settings, sigma)
        naive_times.append(time.perf_counter() - start)

    diff = max(abs(r.p_clean - float(p_clean[i])) for i, r in enumerate(fast))
    diff = max(diff, max(abs(r.p_corrupted_samples[k] - float(p_corrupted[k, i]))
                         for i, r in enumerate(fast) for k in range(n_noise)))
    diff = max(diff, max(abs(r.ie[g][l] - float(ie[g][l, i])) for i, r in enumerate(fast)
                         for g in TRACE_GROUPS for l in range(adapter.num_layers)))
    assert diff <= TOLERANCE, f"{name}: the fast sweep differs from the naive loop by {diff:.2e}"
    largest_effect = max(abs(v) for r in fast for g in TRACE_GROUPS for v in r.ie[g])
    fast_s, naive_s = min(fast_times), min(naive_times)
    result = {
        "model": loaded.model_name, "decoder_layers": adapter.num_layers,
        "width": adapter.text_config.hidden_size, "image_tokens": int(groups["image"][0].sum()),
        "sequence_length": int(batch["input_ids"].shape[1]), "samples": n_samples, "noise_samples": n_noise,
        "groups": list(TRACE_GROUPS), "naive_s": naive_s, "fast_s": fast_s, "speedup": naive_s / fast_s,
        "naive_forward_passes_per_sample": naive_passes,
        "fast_forward_passes_per_sample": fast[0].cost.forward_passes,
        "max_abs_diff": diff, "largest_abs_ie": largest_effect, "repeats": repeats,
    }
    print(f"{name:>5}: L={result['decoder_layers']} d={result['width']} image tokens={result['image_tokens']} "
          f"T={result['sequence_length']} B={n_samples} K={n_noise} | naive {naive_s:.2f}s "
          f"({naive_passes:.0f} passes/sample) | fast {fast_s:.2f}s "
          f"({result['fast_forward_passes_per_sample']:.1f} pass-equivalents/sample) | "
          f"speedup {result['speedup']:.2f}x | max |diff| {diff:.1e}", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "large"], choices=sorted(SPECS))
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--noise", type=int, default=2, help="K noise samples")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "tracing.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = [bench(name, args.samples, args.noise, args.repeats) for name in args.models]
    report = {"benchmark": "tracing", "threads": args.threads, "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.machine(), "device": "cpu",
              "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
