"""Train a tiny zoo model on the vrp-synth train split (reproducible: seeded data, init and order).

    vrp-eval train-tiny --family llava          # writes vrp_eval/zoo/tiny-llava
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vrp_eval import synth
from vrp_eval.adapters import DEFAULT_POST_PROMPT, adapter_for
from vrp_eval.zoo import ZOO
from vrp_eval.zoo.build import TinySpec, build_tiny

FAMILY_TO_NAME = {family: name for name, family in ZOO.items()}


def prompt_for(adapter, question: str, rng: random.Random) -> str:
    # Mostly lmms-eval's VQA prompt (question + the single-word instruction), sometimes the bare
    # question, so that both `vrp-eval run` and harness prompts are in distribution.
    return adapter.build_prompt(question + DEFAULT_POST_PROMPT if rng.random() < 0.8 else question)


@torch.no_grad()
def evaluate_exact(model, adapter, records: list[dict[str, Any]], batch_size: int = 64) -> float:
    """Greedy first-answer exact match against `multiple_choice_answer` (a quick training signal)."""
    model.eval()
    correct = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = adapter.encode([r["image"] for r in chunk],
                               [adapter.build_prompt(r["question"] + DEFAULT_POST_PROMPT) for r in chunk])
        out = model.generate(**adapter.model_inputs(batch), do_sample=False, max_new_tokens=4,
                             pad_token_id=adapter.tokenizer.pad_token_id, eos_token_id=adapter.eos_token_ids)
        texts = adapter.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(t.strip() == r["multiple_choice_answer"] for t, r in zip(texts, chunk))
    return correct / max(1, len(records))


def train_tiny(
    family: str,
    output_dir: str | Path | None = None,
    *,
    epochs: float = 6.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    n_train: int = 20000,
    n_eval: int = 500,
    seed: int = 0,
    spec: TinySpec | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train `family` from scratch and save it with `save_pretrained`; returns the training report."""
    if family not in FAMILY_TO_NAME:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILY_TO_NAME)}")
    if threads:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir) if output_dir else Path(__file__).parent / FAMILY_TO_NAME[family]
    spec = spec or TinySpec()
    started = time.time()
    model, processor = build_tiny(family, synth.vocabulary(), spec, seed=seed)
    adapter = adapter_for(model, processor)
    train = synth.generate("train", n=n_train)
    val = synth.generate("validation", n=n_eval)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    steps = int(math.ceil(epochs * len(train) / batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    order: list[int] = []
    model.train()
    progress = tqdm(range(steps), desc=f"train tiny-{family}", unit="step")
    losses: list[float] = []
    for step in progress:
        if len(order) < batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[:batch_size], order[batch_size:]
        chunk = [train[i] for i in idx]
        batch = adapter.encode([r["image"] for r in chunk], [prompt_for(adapter, r["question"], rng) for r in chunk],
                               answers=[r["multiple_choice_answer"] for r in chunk])
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss))
        if step % 20 == 0:
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    accuracy = evaluate_exact(model, adapter, val)
    report = {
        "family": family, "name": FAMILY_TO_NAME[family], "steps": steps, "batch_size": batch_size, "lr": lr,
        "epochs": epochs, "n_train": n_train, "seed": seed, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "val_exact_match": accuracy, "n_val": len(val), "seconds": round(time.time() - started, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "spec": {k: v for k, v in vars(spec).items() if k != "extra"},
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    (output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
