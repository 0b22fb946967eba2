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
from vrp_eval.zoo.build import FAMILIES, TinySpec, build_tiny

FAMILY_TO_NAME = {family: name for name, family in ZOO.items() if family in FAMILIES}  # the VLM families


def prompt_for(adapter, question: str, rng: random.Random) -> str:
    # Mostly lmms-eval's VQA prompt (question + the single-word instruction), sometimes the bare
    # question, so that both `vrp-eval run` and harness prompts are in distribution.
    return adapter.build_prompt(question + DEFAULT_POST_PROMPT if rng.random() < 0.8 else question)


SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids")
PAD_VALUES = {"attention_mask": 0, "labels": -100, "token_type_ids": 0, "mm_token_type_ids": 0}


def pre_encode(adapter, images, prompts, answers, chunk: int = 256) -> list[dict[str, torch.Tensor]]:
    """Run the processor once over the training set: one dict of unpadded tensors per sample."""
    items: list[dict[str, torch.Tensor]] = []
    for start in tqdm(range(0, len(prompts), chunk), desc="encode", unit="chunk"):
        batch = adapter.encode(images[start:start + chunk], prompts[start:start + chunk],
                               answers=answers[start:start + chunk])
        valid = batch["attention_mask"].bool()
        if "image_grid_thw" in batch:
            blocks = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())
        for row in range(valid.shape[0]):
            item = {k: torch.as_tensor(batch[k][row])[valid[row]] for k in SEQUENCE_KEYS if k in batch}
            if "image_grid_thw" in batch:
                item["pixel_values"], item["image_grid_thw"] = blocks[row], batch["image_grid_thw"][row]
            else:
                item["pixel_values"] = batch["pixel_values"][row]
            items.append(item)
    return items


def collate(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad pre-encoded samples into a batch equal to what the processor would have made."""
    length = max(len(item["input_ids"]) for item in items)
    batch: dict[str, torch.Tensor] = {}
    for key in SEQUENCE_KEYS:
        if key not in items[0]:
            continue
        fill = pad_id if key == "input_ids" else PAD_VALUES[key]
        rows = [torch.cat([torch.full((length - len(it[key]),), fill, dtype=it[key].dtype), it[key]]) for it in items]
        batch[key] = torch.stack(rows)
    if "image_grid_thw" in items[0]:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in items])
        batch["image_grid_thw"] = torch.stack([it["image_grid_thw"] for it in items])
    else:
        batch["pixel_values"] = torch.stack([it["pixel_values"] for it in items])
    return batch


def _to(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate_exact(model, adapter, records: list[dict[str, Any]], batch_size: int = 64) -> dict[str, float]:
    """Greedy exact match against `multiple_choice_answer`, overall and on normal / hard items."""
    model.eval()
    device = next(model.parameters()).device
    hits: dict[str, list[bool]] = {"all": [], "normal": [], "hard": []}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = adapter.encode([r["image"] for r in chunk],
                               [adapter.build_prompt(r["question"] + DEFAULT_POST_PROMPT) for r in chunk])
        out = model.generate(**_to(adapter.model_inputs(batch), device), do_sample=False, max_new_tokens=4,
                             pad_token_id=adapter.tokenizer.pad_token_id, eos_token_id=adapter.eos_token_ids)
        texts = adapter.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for text, record in zip(texts, chunk):
            hit = text.strip() == record["multiple_choice_answer"]
            hits["all"].append(hit)
            hits[record.get("difficulty", "normal")].append(hit)
    return {k: (sum(v) / len(v) if v else float("nan")) for k, v in hits.items()}


def train_tiny(
    family: str,
    output_dir: str | Path | None = None,
    *,
    epochs: float = 12.0,
    batch_size: int = 64,
    lr: float = 1e-3,
    n_train: int = 40000,
    train_start: int = 0,
    n_eval: int = 500,
    seed: int = 0,
    spec: TinySpec | None = None,
    threads: int | None = None,
    device: str = "cpu",
    max_seconds: float | None = None,
    init_from: str | Path | None = None,
    eval_every: int = 0,
) -> dict[str, Any]:
    """Train `family` from scratch (or continue from the `save_pretrained` folder or zoo name
    `init_from`, a further stage) and save it with `save_pretrained`; returns the training report.
    With `eval_every`, every that many steps the model is scored on the first 200 validation items
    and saved to `output_dir` (a checkpoint to keep if the run is stopped). The training items are
    the train split's `n_train` from index `train_start` on; `seed` changes the prompt templates, the
    order and a new model's initialisation, not the items (a further stage that should see unseen
    items gives a `train_start` past the earlier stages' ranges, recorded in each report)."""
    if family not in FAMILY_TO_NAME:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILY_TO_NAME)}")
    synth.check_start(train_start, "train_start (--train-start)")  # before any model is built or loaded
    if threads:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir) if output_dir else Path(__file__).parent / FAMILY_TO_NAME[family]
    spec = spec or TinySpec()
    started = time.time()
    stages: list[dict[str, Any]] = []
    if init_from is not None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from vrp_eval.zoo import is_zoo_name, zoo_path

        source = zoo_path(str(init_from)) if is_zoo_name(str(init_from)) else Path(init_from)
        if not (source / "config.json").exists():
            raise FileNotFoundError(f"--init-from {init_from}: no config.json in {source}; give a zoo name or a "
                                    "folder written by `vrp-eval train-tiny`")
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(source)
        previous = source / "training_report.json"
        if previous.exists():
            earlier = json.loads(previous.read_text())
            stages = earlier.pop("stages", []) + [earlier]
            spec = TinySpec(**earlier.get("spec", {}))
    else:
        model, processor = build_tiny(family, synth.vocabulary(), spec, seed=seed)
    adapter = adapter_for(model, processor)
    model.to(device)
    train = synth.generate("train", n=n_train, start=train_start)
    val = synth.generate("validation", n=n_eval)
    rng = random.Random(seed)
    items = pre_encode(adapter, [r["image"] for r in train], [prompt_for(adapter, r["question"], rng) for r in train],
                       [r["multiple_choice_answer"] for r in train])
    del train
    torch.manual_seed(seed)
    steps = math.ceil(epochs * n_train / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # Warm-up then cosine decay to zero at `total[0]`; with a time budget the total is re-estimated
    # from the measured step time, so the schedule still anneals fully before the budget runs out.
    total = [steps]

    def schedule(step: int) -> float:
        warmup = max(1, int(0.05 * total[0]))
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total[0] - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    order: list[int] = []
    model.train()
    progress = tqdm(range(steps), desc=f"train tiny-{family}", unit="step")
    losses: list[float] = []
    train_started = time.time()
    mark = [train_started, 0]
    for step in progress:
        if step >= total[0]:
            break
        if len(order) < batch_size:
            fresh = list(range(len(items)))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([items[i] for i in idx], adapter.tokenizer.pad_token_id)
        loss = model(**_to(batch, device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 20 == 0:
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            checkpoint = evaluate_exact(model, adapter, val[:200])
            model.train()
            progress.write(f"step {step + 1}: val[:200] exact match {checkpoint['all']:.3f} "
                           f"(normal {checkpoint['normal']:.3f}, hard {checkpoint['hard']:.3f}); saved to {output_dir}")
            output_dir.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
        if max_seconds is not None and step >= 50 and step % 50 == 0:
            # Re-estimated every 50 steps from the recent step time (other jobs may share the device).
            now = time.time()
            per_step = (now - mark[0]) / (step + 1 - mark[1]) if step > 50 else (now - train_started) / 51
            mark[:] = [now, step + 1]
            left = max_seconds - (now - started) - 30  # keep time to evaluate and save
            total[0] = min(steps, step + 1 + max(0, int(left / per_step)))
    model.eval()
    accuracy = evaluate_exact(model, adapter, val)
    model.to("cpu")
    report = {
        "family": family, "name": FAMILY_TO_NAME[family], "steps": steps, "steps_done": len(losses), "batch_size": batch_size, "lr": lr,
        "epochs": epochs, "n_train": n_train, "train_start": train_start, "seed": seed, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "val_exact_match": accuracy["all"], "val_exact_match_normal": accuracy["normal"],
        "val_exact_match_hard": accuracy["hard"], "device": device, "n_val": len(val), "seconds": round(time.time() - started, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "spec": {k: v for k, v in vars(spec).items() if k != "extra"},
        "init_from": str(init_from) if init_from is not None else None,
        "stages": stages,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    (output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
