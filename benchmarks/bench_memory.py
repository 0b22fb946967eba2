"""Peak memory of the clean prompt forward with sharpness capture, against plain SDPA and eager.

    .venv/bin/python benchmarks/bench_memory.py            # 24 layers, width 512, 256 image tokens, batch 8
    .venv/bin/python benchmarks/bench_memory.py --layers 4 --width 128 --batch 2   # quick look

Variants (same random-init LLaVA-architecture model, same left-padded batch, same forward call):
  sdpa       plain forward, SDPA attention (the baseline)
  sharpness  the same forward inside `attention_hooks(adapter, SharpnessRecorder)`, then `signals()`
  eager      eager attention with `output_attentions=True` (what tools that read attention maps do)

How memory is measured on the CPU, and why: tracemalloc does not see torch's allocations, and
`ru_maxrss` is a high-water mark of the whole process, which building the model already sets.
Each variant runs in its own subprocess, which builds the model, runs the variant once to warm up,
then resets the kernel's resident-set high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0)
and runs the variant again: peak = VmHWM after the run - VmRSS before it, i.e. what the forward adds
on top of weights and inputs. glibc is run with a fixed `MALLOC_MMAP_THRESHOLD_` (64 KiB), so every
tensor buffer is its own mmap and is returned to the kernel when freed: RSS then follows live
memory, and a freed-but-cached heap cannot hide (or inflate) a peak. On CUDA (`--device cuda`),
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` is used instead.
Ratios compare the forward's own peak (activations + outputs); the whole-process ratio, weights
included, is printed beside it. The KV cache is off by default (`use_cache=False`), which gives the
strictest ratio; `--use-cache` keeps it, as generate's prompt pass does, and then the cache (2 x L x
B x T x width floats) dominates every variant. Wall times are printed for orientation only (shared
CPU; not a speed claim).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("sdpa", "sharpness", "eager")
WORDS = ["what", "color", "is", "the", "circle", "square", "red", "green", "blue", "yes", "no", "left", "right", "0", "1", "2", "3"]
QUESTIONS = ["what color is the circle?", "is the square left of the circle?", "what color is the square?",
             "is there a red circle?", "what?", "is the circle green or blue?", "how many squares?",
             "is the blue square right of the red circle?"]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from sklearn.cluster import DBSCAN  # noqa: F401  (the cluster count's import, in every variant: equal baselines)

    from vrp_eval.adapters import adapter_for
    from vrp_eval.attention import SharpnessRecorder
    from vrp_eval.hooks import attention_hooks
    from vrp_eval.zoo.build import TinySpec, build_tiny

    torch.set_num_threads(args.threads)
    spec = TinySpec(num_layers=args.layers, hidden_size=args.width, intermediate_size=args.width * 11 // 4,
                    num_heads=args.heads, vision_layers=2, vision_hidden=64, patch_size=args.patch,
                    image_size=args.image_size)
    model, processor = build_tiny("llava", WORDS, spec, seed=0)
    model.to(args.device)
    adapter = adapter_for(model, processor)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8))
              for _ in range(args.batch)]
    prompts = [adapter.build_prompt(QUESTIONS[i % len(QUESTIONS)]) for i in range(args.batch)]
    batch = adapter.encode(images, prompts)
    inputs = {k: v.to(args.device) for k, v in adapter.model_inputs(batch).items()}
    n_image = int(adapter.position_groups(batch["input_ids"], batch["attention_mask"])["image"][0].sum())
    if args.variant == "eager":
        adapter.language_model.set_attn_implementation("eager")

    def run():
        with torch.no_grad():
            if args.variant == "sdpa":
                out = model(**inputs, use_cache=args.use_cache)
            elif args.variant == "eager":
                out = model(**inputs, use_cache=args.use_cache, output_attentions=True)
            else:
                recorder = SharpnessRecorder.for_batch(adapter, batch)
                with attention_hooks(adapter, recorder):
                    out = model(**inputs, use_cache=args.use_cache)
                out = (out, recorder.signals())
        return out

    cuda = args.device.startswith("cuda")
    run()  # warm-up: one-time allocations (kernels, lazy imports, caches) are not the forward's
    gc.collect()
    peaks, seconds = [], []
    for _ in range(args.repeats):
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")
        start = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        seconds.append(time.perf_counter() - start)
        peaks.append(peak - before)
        del out
    base = torch.cuda.memory_allocated() if cuda else _status_kib("VmRSS") * 1024
    return {"variant": args.variant, "forward_peak_bytes": max(peaks), "baseline_bytes": base,
            "process_peak_bytes": base + max(peaks), "seconds": min(seconds),
            "seq_len": int(inputs["input_ids"].shape[1]), "n_image_tokens": n_image}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--use-cache", action="store_true",
                        help="keep the KV cache, as generate's prompt pass does (it dominates the forward's peak)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return 0
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        sys.exit("this benchmark measures CPU memory through /proc/self/clear_refs (Linux); use --device cuda elsewhere")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    forwarded = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
                 ("layers", "width", "heads", "image_size", "patch", "batch", "threads", "repeats", "device")]
    forwarded += ["--use-cache"] if args.use_cache else []
    results = {}
    for variant in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--variant", variant], env=env, check=False,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = 1024 * 1024
    base = results["sdpa"]
    ratios = {
        "sharpness_vs_sdpa": results["sharpness"]["forward_peak_bytes"] / base["forward_peak_bytes"],
        "eager_vs_sdpa": results["eager"]["forward_peak_bytes"] / base["forward_peak_bytes"],
        "sharpness_vs_sdpa_process": results["sharpness"]["process_peak_bytes"] / base["process_peak_bytes"],
        "eager_vs_sdpa_process": results["eager"]["process_peak_bytes"] / base["process_peak_bytes"],
    }
    config = {k: getattr(args, k) for k in ("layers", "width", "heads", "image_size", "patch", "batch",
                                              "threads", "repeats", "device", "use_cache")}
    config.update(seq_len=base["seq_len"], n_image_tokens=base["n_image_tokens"],
                  method="VmHWM - VmRSS per subprocess, MALLOC_MMAP_THRESHOLD_=65536" if args.device == "cpu"
                  else "torch.cuda.max_memory_allocated")
    print(f"LLaVA-architecture, {args.layers} layers, width {args.width}, {base['n_image_tokens']} image tokens, "
          f"sequence {base['seq_len']}, batch {args.batch}, device {args.device}, KV cache {'kept' if args.use_cache else 'off'}")
    print(f"{'variant':<10} {'forward peak MiB':>17} {'process peak MiB':>17} {'wall s':>8}")
    for name, r in results.items():
        print(f"{name:<10} {r['forward_peak_bytes'] / mib:>17.1f} {r['process_peak_bytes'] / mib:>17.1f} {r['seconds']:>8.2f}")
    print(f"sharpness capture / plain SDPA: {ratios['sharpness_vs_sdpa']:.3f}x (target <= 1.3x); "
          f"eager output_attentions / plain SDPA: {ratios['eager_vs_sdpa']:.2f}x "
          f"(whole process: {ratios['sharpness_vs_sdpa_process']:.3f}x and {ratios['eager_vs_sdpa_process']:.2f}x)")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"config": config, "variants": results, "ratios": ratios}, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
