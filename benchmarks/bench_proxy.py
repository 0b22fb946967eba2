"""The fast proxy of causal tracing (vrp_eval.proxy) against the exact engine (vrp_eval.tracing), side
by side on the same samples, the same noise and the same targets.

Per model (the trained zoo models; vrp-synth validation, `--samples` samples, gaussian noise k = 3):

- agreement of the per-sample IE tables (every layer x {image, text, last}): Pearson and Spearman
  over all values, per-sample Pearson (median, min), per-layer Pearson over samples, mean / max
  absolute error; for the proxy as deployed (K' = 1 noise sample) against the exact engine as
  deployed (K = 5), and like-for-like on the same single noise sample (K = 1 both);
- the circuit: the window whose last-position IE rises the most (`proxy.proxy_window`) from the
  proxy's curves and from the exact curves of the discovery half, and the knockout circuit
  (`tracing.choose_circuit`, the probe's `circuit_layers`); the integration layer of each;
- the causal accuracy drop on the held-out half at each window (`tracing.corrupted_answers`, the
  probe's `causal_acc_drop`), and the proxy's error against the knockout circuit's drop;
- wall-clock seconds of each side in the same process and their ratio, and forward-pass equivalents
  per sample (`TraceCost`).
- the candidate proxy of the knockout curve that was not shipped (`knockout_proxy_check`), on 64
  samples per model and on the planted-circuit model;
- wall clock only: a random-init 24-layer LLaVA architecture with 256 image tokens (`bench_large`).

    .venv/bin/python benchmarks/bench_proxy.py                       # ~4 min on 1 CPU thread
    .venv/bin/python benchmarks/bench_proxy.py --models tiny-llava --samples 64

Results go to benchmarks/results/proxy.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vrp_eval import statistics
from vrp_eval.adapters import DEFAULT_POST_PROMPT
from vrp_eval.data import load_examples, load_image
from vrp_eval.generation import generate_answers
from vrp_eval.hooks import AttentionHook, HookScope, attention_hooks
from vrp_eval.intervention import estimate_sigma
from vrp_eval.loading import ModelLoadError, load_model
from vrp_eval.probe import half_of, score_answer
from vrp_eval.proxy import agreement, proxy_trace_batch, proxy_window
from vrp_eval.tracing import (
    TraceSettings,
    choose_circuit,
    corrupted_answers,
    integration_layer,
    knockout_answers,
    knockout_hook,
    knockout_windows,
    trace_batch,
    window_width,
)

MODELS = ("tiny-llava", "tiny-paligemma", "tiny-qwen2vl")
EXACT_K = 5  # the probe's default n_noise
SEED = 0


def _timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - started


def _curves(traces, groups=("image", "text", "last")):
    return {g: np.mean([t.ie[g] for t in traces], 0) for g in groups}


def _summary(found: dict) -> dict:
    keep = {k: v for k, v in found.items() if k != "per_layer_pearson"}
    keep["per_layer_pearson"] = {g: [None if r is None else round(r, 3) for r in rs]
                                 for g, rs in found["per_layer_pearson"].items()}
    return keep


def bench_model(name: str, n_samples: int, batch_size: int) -> dict | None:
    try:
        loaded = load_model(name, device="cpu")
    except ModelLoadError as error:
        print(f"{name}: skipped ({error})")
        return None
    adapter = loaded.adapter
    examples = load_examples("vrp-synth", "validation", limit=n_samples)
    batches = []
    for start in range(0, len(examples), batch_size):
        part = examples[start:start + batch_size]
        batches.append((part, adapter.encode([load_image(e) for e in part],
                                             [adapter.build_prompt(e.prompt_text(DEFAULT_POST_PROMPT)) for e in part])))
    sigma = estimate_sigma(loaded, [b for _, b in batches], max_samples=64)
    targets = [[a.first_token_id for a in generate_answers(loaded, b, max_new_tokens=1)] for _, b in batches]

    runs = {"exact_k5": ("exact", EXACT_K, None, None), "exact_k1": ("exact", 1, None, None),
            "proxy_k1": ("proxy", EXACT_K, 1, "corrupted"), "proxy_k5": ("proxy", EXACT_K, None, "corrupted"),
            "proxy_mid_k1": ("proxy", EXACT_K, 1, "midpoint")}
    traces, seconds = {}, {}
    for key, (side, k, proxy_k, linearisation) in runs.items():
        settings = TraceSettings(n_noise=k, seed=SEED)
        traces[key], seconds[key] = [], 0.0
        for (_, batch), target in zip(batches, targets):
            if side == "exact":
                out, spent = _timed(trace_batch, loaded, batch, target, settings, sigma)
            else:
                out, spent = _timed(proxy_trace_batch, loaded, batch, target, settings, sigma, n_noise=proxy_k,
                                    linearisation=linearisation)
            traces[key] += out
            seconds[key] += spent
    # The same noise sample 0 on both sides (p_corrupted equal up to round-off).
    same_noise = max(abs(p.p_corrupted - e.p_corrupted) for p, e in zip(traces["proxy_k1"], traces["exact_k1"]))

    pairs = {"deployed (proxy K'=1 vs exact K=5)": ("proxy_k1", "exact_k5"),
             "same noise (K=1 both)": ("proxy_k1", "exact_k1"),
             "same noise (K=5 both)": ("proxy_k5", "exact_k5"),
             "midpoint, deployed (proxy K'=1 vs exact K=5)": ("proxy_mid_k1", "exact_k5"),
             "midpoint, same noise (K=1 both)": ("proxy_mid_k1", "exact_k1")}
    agreements = {label: _summary(agreement([t.ie for t in traces[p]], [t.ie for t in traces[e]]))
                  for label, (p, e) in pairs.items()}

    # The circuit, chosen on the discovery half; drops measured on the held-out half.
    rows = [half_of(e.question_id, SEED) for e in examples]
    discovery = [i for i, h in enumerate(rows) if h == "discovery"]
    width = window_width(adapter.num_layers)
    windows = knockout_windows(adapter.num_layers, width)
    chosen, integration = {}, {}
    for key in ("exact_k5", "proxy_k1", "proxy_mid_k1", "exact_k1"):
        curves = _curves([traces[key][i] for i in discovery])
        chosen[key] = proxy_window(curves["last"], width)
        all_curves = _curves(traces[key])
        integration[key] = integration_layer(all_curves["last"], all_curves["image"])

    knock_scores, clean_d, heldout_parts = [], [], []
    for part, batch in batches:
        disc = [j for j, e in enumerate(part) if half_of(e.question_id, SEED) == "discovery"]
        held = [j for j, e in enumerate(part) if half_of(e.question_id, SEED) == "heldout"]
        if disc:
            sub, sub_examples = adapter.select_rows(batch, disc), [part[j] for j in disc]
            clean_d += [score_answer(e, a.text) for e, a in zip(sub_examples, generate_answers(loaded, sub))]
            per_window = [[score_answer(e, a.text) for e, a in zip(sub_examples, knockout_answers(loaded, sub, w))]
                          for w in windows]
            knock_scores += list(np.array(per_window).T)
        if held:
            heldout_parts.append(([part[j] for j in held], adapter.select_rows(batch, held)))
    knockout_circuit = choose_circuit(np.array(knock_scores), windows, clean_scores=clean_d)

    def held_drop(window):
        clean, corrupted = [], []
        for part, batch in heldout_parts:
            clean += [score_answer(e, a.text) for e, a in zip(part, generate_answers(loaded, batch))]
            corrupted += [score_answer(e, a.text)
                          for e, a in zip(part, corrupted_answers(loaded, batch, window, "gaussian", 3.0, sigma, SEED))]
        return statistics.causal_drop_summary(clean, corrupted, n_bootstrap=0)["causal_acc_drop"]

    drops = {"knockout circuit": held_drop(knockout_circuit)}
    drops["exact IE rise window (K=5)"] = held_drop(chosen["exact_k5"]) if chosen["exact_k5"] else None
    drops["proxy window (K'=1)"] = held_drop(chosen["proxy_k1"]) if chosen["proxy_k1"] else None
    drops["midpoint proxy window (K'=1)"] = held_drop(chosen["proxy_mid_k1"]) if chosen["proxy_mid_k1"] else None
    passes = {key: traces[key][0].cost.forward_passes for key in runs}
    first = examples[:64]
    knockout_check = knockout_proxy_check(loaded, adapter.encode(
        [load_image(e) for e in first], [adapter.build_prompt(e.prompt_text(DEFAULT_POST_PROMPT)) for e in first]))
    result = {
        "model": name, "num_layers": adapter.num_layers, "samples": len(examples), "width": width,
        "same_noise_max_p_corrupted_diff": same_noise,
        "seconds": seconds, "forward_passes_per_sample": passes,
        "speedup_exact_k5_over_proxy_k1": seconds["exact_k5"] / seconds["proxy_k1"],
        "speedup_exact_k1_over_proxy_k1": seconds["exact_k1"] / seconds["proxy_k1"],
        "speedup_exact_k5_over_proxy_mid_k1": seconds["exact_k5"] / seconds["proxy_mid_k1"],
        "agreement": agreements,
        "windows": {"knockout_circuit": list(knockout_circuit),
                    **{f"rise_{k}": list(w) if w else None for k, w in chosen.items()}},
        "proxy_window_equals_exact_rise_window": chosen["proxy_k1"] == chosen["exact_k5"],
        "proxy_window_equals_knockout_circuit": chosen["proxy_k1"] == tuple(knockout_circuit),
        "integration_layer": integration,
        "midpoint_window_equals_exact_rise_window": chosen["proxy_mid_k1"] == chosen["exact_k5"],
        "midpoint_window_equals_knockout_circuit": chosen["proxy_mid_k1"] == tuple(knockout_circuit),
        "integration_layer_equal": integration["proxy_k1"] == integration["exact_k5"],
        "midpoint_integration_layer_equal": integration["proxy_mid_k1"] == integration["exact_k5"],
        "heldout_causal_acc_drop": drops,
        "causal_drop_error_vs_knockout": {
            label: None if drops[label] is None else drops[label] - drops["knockout circuit"]
            for label in ("exact IE rise window (K=5)", "proxy window (K'=1)", "midpoint proxy window (K'=1)")},
        "knockout_proxy_check": knockout_check,
        "mean_curves": {key: {g: np.round(v, 4).tolist() for g, v in _curves(traces[key]).items()}
                        for key in ("exact_k5", "proxy_k1", "proxy_mid_k1")},
    }
    return result


class _CaptureProbs(AttentionHook):
    """Keeps each layer's attention probabilities (in the graph) and returns them unchanged."""

    modifies = True  # the dispatcher's eager path, which materialises the probabilities

    def __init__(self):
        self.probs: dict[int, torch.Tensor] = {}

    def modify_probs(self, layer, probs):
        self.probs[layer] = probs
        return probs


def _first_token_p(loaded, inputs, targets, hooks=(), leaf=False):
    adapter = loaded.adapter
    rows, target = torch.arange(len(targets)), torch.tensor(targets)
    with HookScope() as scope:
        if leaf:  # the graph exists even when the weights need no gradient
            adapter.hook_embeddings(scope, lambda embeds: embeds.detach().requires_grad_(True))
        with attention_hooks(adapter, *hooks):
            logits = loaded.model(**inputs, use_cache=False).logits[:, -1]
    return logits.float().softmax(-1)[rows, target]


def knockout_proxy_check(loaded, batch) -> dict:
    """The candidate proxy of the knockout curve that was not shipped: the first-order change of the
    answer's first-token probability when a window's non-image queries lose the image keys,
    sum over the window's layers of (A_knocked - A) . dp/dA in the clean run (one eager forward and one
    backward), against the same change measured with `tracing.knockout_hook` (one forward per window)."""
    adapter = loaded.adapter
    inputs = loaded.model_inputs(batch)
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    targets = [a.first_token_id for a in generate_answers(loaded, batch, max_new_tokens=1)]
    capture = _CaptureProbs()
    with torch.enable_grad():
        p = _first_token_p(loaded, inputs, targets, [capture], leaf=True)
        layers = sorted(capture.probs)
        grads = torch.autograd.grad(p.sum(), [capture.probs[layer] for layer in layers])
    queries = (groups["all"] & ~groups["image"])[:, None, :, None].float()
    keys = groups["image"][:, None, None, :].float()
    per_layer = []
    for layer, grad in zip(layers, grads):
        attention = capture.probs[layer].detach()
        image_part = attention * keys
        knocked = (attention - image_part) / (1 - image_part.sum(-1, keepdim=True)).clamp_min(1e-6)
        per_layer.append((((knocked - attention) * queries) * grad).sum((1, 2, 3)))
    per_layer = torch.stack(per_layer)
    windows = knockout_windows(adapter.num_layers, window_width(adapter.num_layers))
    with torch.no_grad():
        p_clean = _first_token_p(loaded, inputs, targets)
        exact = torch.stack([_first_token_p(loaded, inputs, targets, [knockout_hook(adapter, batch, w)]) - p_clean
                             for w in windows]).numpy()
    proxy = torch.stack([per_layer[first:last + 1].sum(0) for first, last in windows]).numpy()
    return {"windows": [list(w) for w in windows],
            "exact_mean_dp": np.round(exact.mean(1).astype(float), 4).tolist(),
            "proxy_mean_dp": np.round(proxy.mean(1).astype(float), 4).tolist(),
            "exact_window": list(windows[int(exact.mean(1).argmin())]),
            "proxy_window": list(windows[int(proxy.mean(1).argmin())]),
            "pearson_per_sample_window": float(np.corrcoef(exact.ravel(), proxy.ravel())[0, 1])}


def planted_knockout_check() -> dict:
    """`knockout_proxy_check` on the planted-circuit model (tests/assets), 16 samples: the knockout
    window is (4, 5) by construction."""
    import sys

    assets = Path(__file__).resolve().parent.parent / "tests" / "assets"
    sys.path.insert(0, str(assets))
    import planted_circuit

    loaded = load_model(str(assets / "planted-llava"), device="cpu")
    data = planted_circuit.examples(16, seed=123)
    prompt = loaded.adapter.build_prompt(planted_circuit.QUESTION)
    return knockout_proxy_check(loaded, loaded.adapter.encode([image for image, _ in data], [prompt] * len(data)))


def bench_large(layers: int = 24) -> dict:
    """Wall clock only (random init: its IE means nothing): a LLaVA architecture with `layers` decoder
    layers, width 512 and 256 image tokens, a left-padded batch of 2 prompts; the exact engine at K = 5
    and K = 1 against the proxy at K' = 1."""
    from PIL import Image

    from vrp_eval.adapters import adapter_for
    from vrp_eval.loading import LoadedModel
    from vrp_eval.zoo.build import TinySpec, build_tiny

    words = ["what", "color", "is", "the", "circle", "square", "red", "green", "blue", "yes", "no"]
    spec = TinySpec(num_layers=layers, hidden_size=512, intermediate_size=1024, num_heads=8, vision_layers=1,
                    vision_hidden=64, patch_size=4, image_size=64)
    model, processor = build_tiny("llava", words, spec, seed=0)
    loaded = LoadedModel(model=model, processor=processor, adapter=adapter_for(model, processor),
                         model_name=f"random-llava-L{layers}", model_path="", model_sha="", dtype="float32")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    batch = loaded.adapter.encode(images, [loaded.adapter.build_prompt(q) for q in
                                           ("what color is the circle left of the square?", "is the square red?")])
    sigma = estimate_sigma(loaded, [batch])
    targets = [a.first_token_id for a in generate_answers(loaded, batch, max_new_tokens=1)]
    settings = TraceSettings(n_noise=1, seed=SEED)
    exact, exact_s = _timed(trace_batch, loaded, batch, targets, settings, sigma)
    exact5, exact5_s = _timed(trace_batch, loaded, batch, targets, TraceSettings(n_noise=EXACT_K, seed=SEED), sigma)
    out = {"model": loaded.model_name, "num_layers": layers, "exact_k1_seconds": exact_s,
           "exact_k1_passes": exact[0].cost.forward_passes, "exact_k5_seconds": exact5_s,
           "exact_k5_passes": exact5[0].cost.forward_passes}
    for linearisation in ("corrupted", "midpoint"):
        proxy, spent = _timed(proxy_trace_batch, loaded, batch, targets, settings, sigma, linearisation=linearisation)
        out[f"proxy_{linearisation}_seconds"] = spent
        out[f"proxy_{linearisation}_passes"] = proxy[0].cost.forward_passes
        out[f"speedup_exact_k1_over_{linearisation}"] = exact_s / spent
        out[f"speedup_exact_k5_over_{linearisation}"] = exact5_s / spent
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results/proxy.json")
    parser.add_argument("--large-layers", type=int, default=24, help="decoder layers of the timing-only model (0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = [r for r in (bench_model(m, args.samples, args.batch_size) for m in args.models) if r is not None]
    for r in results:
        print(f"\n== {r['model']} (L={r['num_layers']}, {r['samples']} samples)")
        print(f"seconds: exact K=5 {r['seconds']['exact_k5']:.2f}, exact K=1 {r['seconds']['exact_k1']:.2f}, "
              f"proxy K'=1 {r['seconds']['proxy_k1']:.2f} -> {r['speedup_exact_k5_over_proxy_k1']:.1f}x, midpoint "
              f"{r['seconds']['proxy_mid_k1']:.2f} -> {r['speedup_exact_k5_over_proxy_mid_k1']:.1f}x "
              f"(vs exact K=1: {r['speedup_exact_k1_over_proxy_k1']:.1f}x); passes/sample "
              f"{r['forward_passes_per_sample']}")
        for label, found in r["agreement"].items():
            print(f"{label}: pearson {found['pearson']:.3f}, spearman {found['spearman']:.3f}, per-sample r median "
                  f"{found['per_sample_pearson_median']:.3f} (min {found['per_sample_pearson_min']:.3f}), "
                  f"MAE {found['mean_abs_error']:.4f}, max {found['max_abs_error']:.3f}")
            print(f"  per-layer r: {found['per_layer_pearson']}")
        print(f"windows: {r['windows']}; integration layer {r['integration_layer']}")
        print(f"held-out causal_acc_drop: {r['heldout_causal_acc_drop']}; error vs knockout "
              f"{r['causal_drop_error_vs_knockout']}")
    planted = planted_knockout_check()
    print(f"\n== knockout-curve proxy (not shipped), planted circuit: {planted}")
    for r in results:
        print(f"   {r['model']}: {r['knockout_proxy_check']}")
    large = bench_large(args.large_layers) if args.large_layers else None
    if large is not None:
        print(f"\n== {large['model']} (timing only): exact K=5 {large['exact_k5_seconds']:.2f} s "
              f"({large['exact_k5_passes']:.1f} passes), K=1 {large['exact_k1_seconds']:.2f} s "
              f"({large['exact_k1_passes']:.1f}); proxy corrupted {large['proxy_corrupted_seconds']:.2f} s "
              f"({large['speedup_exact_k5_over_corrupted']:.1f}x vs K=5, {large['speedup_exact_k1_over_corrupted']:.1f}x "
              f"vs K=1), midpoint {large['proxy_midpoint_seconds']:.2f} s "
              f"({large['speedup_exact_k5_over_midpoint']:.1f}x, {large['speedup_exact_k1_over_midpoint']:.1f}x)")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": platform.machine(), "torch": torch.__version__, "threads": args.threads,
                                  "seed": SEED, "results": results, "large": large,
                                  "knockout_proxy_planted": planted}, indent=2, default=float) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
