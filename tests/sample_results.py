"""Three realistic results objects (hand-built through `build_results`) for the hub and leaderboard tests.

The headline numbers follow SPEC.md's published table (LLaVA-1.5-7B, PaliGemma-3B, Qwen2-VL-7B);
bins and curves are made deterministically from them so each model's pictures differ.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from vrp_eval.results import build_results

TASK = "vrp_vqav2_val_lite"

MODELS = [
    # name, family, parameters, layers, accuracy, ece, attn_conf_r, causal drop, circuit, created_at
    ("llava-hf/llava-1.5-7b-hf", "llava", 7_063_427_072, 32, 0.62, 0.21, 0.74, -0.58, (16, 24), "2025-06-01T10:00:00+00:00"),
    ("google/paligemma-3b-mix-224", "paligemma", 2_923_335_408, 18, 0.55, 0.14, 0.68, -0.41, (12, 18), "2025-06-02T11:30:00+00:00"),
    ("Qwen/Qwen2-VL-7B-Instruct", "qwen2vl", 8_291_375_616, 28, 0.71, 0.18, 0.71, -0.52, (20, 28), "2025-06-03T09:15:00+00:00"),
]


def _bins(accuracy: float, ece: float, n: int, n_bins: int = 15) -> list[dict]:
    bins = []
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        mid = (lo + hi) / 2
        count = round(n * math.exp(-((mid - (accuracy + ece)) ** 2) / 0.05) / 6)
        score = max(0.0, min(1.0, mid - ece * (0.5 + mid)))  # overconfident: score below confidence
        bins.append({"lo": lo, "hi": hi, "count": count, "mean_confidence": mid if count else None,
                     "mean_score": score if count else None})
    return bins


def _ie_curves(n_layers: int, circuit: tuple[int, int]) -> dict[str, list[float]]:
    first, last = circuit
    image = [round(0.8 / (1 + math.exp(layer - (first + last) / 2)), 4) for layer in range(n_layers)]
    last_pos = [round(0.8 / (1 + math.exp(-(layer - (first + last) / 2))), 4) for layer in range(n_layers)]
    text = [round(0.05 + 0.02 * math.sin(layer), 4) for layer in range(n_layers)]
    return {"image": image, "text": text, "last": last_pos}


def sample_results() -> list[dict]:
    out = []
    for name, family, params, layers, acc, ece, r, drop, circuit, created in MODELS:
        n = 500
        width = circuit[1] - circuit[0]
        knockout = []
        for start in range(0, layers - width + 1, 2):
            overlap = max(0, min(start + width, circuit[1]) - max(start, circuit[0])) / max(width, 1)
            knockout.append({"window": [start, start + width], "accuracy": round(acc * (1 + drop * overlap), 4),
                             "drop": round(drop * overlap, 4)})
        metrics = {
            "accuracy": acc, "accuracy_ci_low": acc - 0.04, "accuracy_ci_high": acc + 0.04,
            "n_samples": n, "mean_confidence": acc + ece,
            "ece": ece, "ece_ci_low": ece - 0.03, "ece_ci_high": ece + 0.03,
            "mce": min(1.0, 2.1 * ece), "ace": ece * 0.95, "brier": 0.18 + ece / 2,
            "attn_conf_r": r, "attn_conf_r_ci_low": r - 0.05, "attn_conf_r_ci_high": r + 0.04,
            "attn_conf_r_p": 1e-12, "attn_conf_r_rho": r - 0.02,
            "attn_acc_r": 0.03, "attn_acc_r_ci_low": -0.06, "attn_acc_r_ci_high": 0.12, "attn_acc_r_p": 0.5,
            "attn_overconf_r": 0.72, "attn_overconf_r_ci_low": 0.66, "attn_overconf_r_ci_high": 0.77,
            "causal_acc_drop": drop, "causal_acc_drop_ci_low": drop - 0.06, "causal_acc_drop_ci_high": drop + 0.06,
            "control_acc_drop": -0.04, "control_acc_drop_ci_low": -0.09, "control_acc_drop_ci_high": 0.01,
            "circuit_layers": list(circuit), "control_layers": [min(circuit[1] + 1, layers - 1 - width), layers - 1],
            "integration_layer": (circuit[0] + circuit[1]) // 2,
            "spearman_untested_extra": float("nan"),  # a metric that could not be computed
        }
        details = {"reliability_bins": _bins(acc, ece, n), "ie_curves": _ie_curves(layers, circuit),
                   "knockout_curve": knockout, "p_clean": 0.81, "p_corrupted": 0.22}
        config = {
            "model_name": name, "model_sha": hashlib.sha1(name.encode()).hexdigest(), "model_dtype": "bfloat16",
            "model_family": family, "model_num_parameters": params, "vrp_eval_version": "0.1.0",
            "dataset": "lmms-lab/LMMs-Eval-Lite", "dataset_revision": "a" * 40, "split": "lite",
            "probe": {"limit": n, "n_bins": 15, "confidence": "product", "noise_k": 3.0, "seed": 0},
            "versions": {"python": "3.11.2", "transformers": "5.23.0", "torch": "2.14.1"},
            "created_at": created,
        }
        out.append(build_results(config=config, task=TASK, metrics=metrics, details=details))
    return out


# --- an lmms-eval run of a vrp_* task, as lmms-eval 0.7.3 lays it out on disk ------------------------

LMMS_TASK = "vrp_synth"


def write_lmms_run(folder: Path, *, model: str = "llava-hf/llava-1.5-7b-hf", date: str | float = "20261202_051009",
                   timezone: str | None = None, n: int = 16) -> Path:
    """`<date>_results.json` + `<date>_samples_vrp_synth.jsonl` of `lmms-eval --model vrp --tasks vrp_synth
    --limit n --log_samples`; returns the results file.

    As lmms-eval 0.7.3 writes them: `date` is `YYYYMMDD_HHMMSS` in the zone of `--timezone` (recorded in
    `config.resolved_cli_args` when `timezone` is given, left out as a Python-API run leaves it), the data is
    `dataset_path: parquet` with absolute `data_files`, and `n-samples` has the task's size and the limit.
    Every logged response ends with the sample's vrp-eval record (a vrp-eval 0.1 samples log). Sample i is
    right when i is even, with confidence 0.3 + 0.15 (i mod 5): a hand-checkable accuracy of 1/2.
    """
    from vrp_eval.lmms import PAYLOAD_FORMAT, encode_response
    from vrp_eval.probe import ProbeSettings

    stem = date if isinstance(date, str) else "20240101_000000"
    settings = ProbeSettings(dataset=LMMS_TASK, split="validation", limit=n).to_dict()
    model_info = {"model_name": model, "model_sha": hashlib.sha1(model.encode()).hexdigest(), "model_dtype": "float32",
                  "model_family": "llava", "vrp_eval_version": "0.1.0"}
    lines = []
    for i in range(n):
        confidence = 0.3 + 0.15 * (i % 5)
        answer = "red" if i % 2 == 0 else "blue"
        record = {"question_id": i, "question": "what colour is the square?", "answer": answer,
                  "score": float(i % 2 == 0), "confidence": confidence, "confidence_product": confidence,
                  "confidence_first_token": confidence, "confidence_length_norm": confidence,
                  "token_probs": [confidence], "reference": "red", "kind": "vqa"}
        payload = {"format": PAYLOAD_FORMAT, "version": 1, "task": LMMS_TASK, "doc_id": i, "model": model_info,
                   "settings": settings, "state": {"windows": [], "circuit": None, "control": None},
                   "record": record}
        lines.append(json.dumps({"doc_id": i, "filtered_resps": [encode_response(answer, payload)]}))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}_samples_{LMMS_TASK}.jsonl").write_text("\n".join(lines) + "\n")
    config = {"model": "vrp", "model_args": f"pretrained={model}", "limit": n}
    if timezone is not None:
        config["resolved_cli_args"] = {"timezone": timezone, "tasks": LMMS_TASK, "limit": n}
    results = {
        "results": {LMMS_TASK: {"alias": LMMS_TASK, "accuracy,none": 0.5, "accuracy_stderr,none": "N/A",
                                "n_samples,none": n}},
        "configs": {LMMS_TASK: {"task": LMMS_TASK, "dataset_path": "parquet", "test_split": "validation",
                                "dataset_kwargs": {"data_files": {
                                    "validation": "/home/someone/.venv/lib/vrp_eval/tasks/vrp_synth/validation.parquet"}}}},
        "n-samples": {LMMS_TASK: {"original": 1000, "effective": n}},
        "config": config, "lmms_eval_version": "0.7.3", "date": date,
    }
    path = folder / f"{stem}_results.json"
    path.write_text(json.dumps(results, indent=2))
    return path
