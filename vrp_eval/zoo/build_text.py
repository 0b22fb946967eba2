"""The zoo's text-only model: a tiny Llama trained on vrp-synth-text, built the way the VLMs are.

Same word-level tokenizer builder (`build.build_tokenizer`, BOS added like Llama's), the real
`LlamaForCausalLM` class (4 decoder layers, width 64), trained from scratch on the text task
(`vrp_eval.synth_text`) in about a minute on one CPU thread:

    python -m vrp_eval.zoo.build_text            # writes vrp_eval/zoo/tiny-text-llama
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from vrp_eval import synth_text
from vrp_eval.zoo.build import TinySpec, _set_post_processor_bos, build_tokenizer

DEFAULT_DIR = Path(__file__).resolve().parent / "tiny-text-llama"
TEXT_SPEC = TinySpec(num_layers=4, hidden_size=64, intermediate_size=256, num_heads=4)


def build_text_llama(spec: TinySpec = TEXT_SPEC, seed: int = 0):
    """(model, tokenizer): a random-init tiny `LlamaForCausalLM` over vrp-synth-text's words."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(synth_text.vocabulary(), "llava")  # the Llama-style special tokens
    _set_post_processor_bos(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), tokenizer


def _batch(tokenizer, rows: list[dict[str, Any]]):
    prompts = [synth_text.prompt(r["context"], r["question"]) for r in rows]
    texts = [f"{p} {r['answer']}{tokenizer.eos_token}" for p, r in zip(prompts, rows)]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = torch.full_like(batch["input_ids"], -100)
    for row, r in enumerate(rows):
        n = len(tokenizer(f" {r['answer']}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"])
        labels[row, -n:] = batch["input_ids"][row, -n:]
    batch["labels"] = labels
    return batch


def _length_buckets(rows: list[dict[str, Any]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches of similar context length (less padding: about half the work)."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    batches = []
    pool = batch_size * 4
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: len(rows[i]["context"]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict[str, Any]], batch_size: int = 128) -> float:
    """Greedy exact match of the answers to `rows`."""
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = tokenizer([synth_text.prompt(r["context"], r["question"]) for r in chunk], return_tensors="pt",
                          padding=True)
        out = model.generate(**batch, do_sample=False, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(t.strip() == r["answer"] for t, r in zip(texts, chunk))
    return hits / len(rows)


def train_text_llama(output_dir: str | Path = DEFAULT_DIR, *, steps: int = 1000, batch_size: int = 64,
                     lr: float = 3e-3, n_train: int = 4000, n_eval: int = 300, seed: int = 0,
                     threads: int = 1) -> dict[str, Any]:
    """Train the tiny text Llama from scratch on vrp-synth-text (train split) and save it with
    `save_pretrained`; returns the training report (also written as training_report.json)."""
    torch.set_num_threads(threads)
    started = time.time()
    model, tokenizer = build_text_llama(seed=seed)
    train = synth_text.generate("train", n_train)
    val = synth_text.generate("validation", n_eval)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, step / steps))))
    model.train()
    losses: list[float] = []
    batches: list[list[int]] = []
    for step in range(steps):
        if not batches:
            batches = _length_buckets(train, batch_size, rng)
        loss = model(**_batch(tokenizer, [train[i] for i in batches.pop()])).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    model.eval()
    report = {
        "name": "tiny-text-llama", "steps": steps, "batch_size": batch_size, "lr": lr, "n_train": n_train,
        "seed": seed, "threads": threads, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "val_exact_match": exact_match(model, tokenizer, val), "n_val": len(val),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - started, 1),
        "spec": {k: v for k, v in vars(TEXT_SPEC).items() if k != "extra"},
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrp_eval.zoo.build_text", description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=str(DEFAULT_DIR))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(train_text_llama(args.output, steps=args.steps, seed=args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
