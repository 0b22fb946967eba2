"""A tiny LLaVA with a planted circuit: image information reaches the answer only through attention
in decoder layers CIRCUIT = (4, 5) of 8.

Construction: every attention output projection (o_proj) outside the window is zero and frozen, so
attention there writes nothing into the residual stream; MLPs and norms act per position. A non-image
position can therefore depend on the image only through the attention of layers 4 and 5, whatever
the other weights are. The model is then trained briefly on "what color is the square ?" over
solid-colour images, so it does use the image. During training, image attention is knocked out at
random in layer 4 or in layer 5 (never both), so each layer alone carries the colour: a knockout
window that covers only one of them leaves the answer intact, and the one window that covers both,
(4, 5), is the circuit a correct engine must return.

    python tests/assets/planted_circuit.py tests/assets/planted-llava   # train and save (1-3 min on 2 cores)

The shipped folder tests/assets/planted-llava was built with that command (seed 0).
"""
from __future__ import annotations

import random
import sys

import numpy as np
import torch
from PIL import Image

NUM_LAYERS = 8
CIRCUIT = (4, 5)
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
QUESTION = "what color is the square ?"
WORDS = ["what", "color", "is", "the", "circle", "square", "red", "green", "blue", "yellow", "yes", "no", "left", "right", "0", "1", "2", "3"]


def spec():
    from vrp_eval.zoo.build import TinySpec

    return TinySpec(num_layers=NUM_LAYERS, hidden_size=64, intermediate_size=128, num_heads=4, vision_layers=1,
                    vision_hidden=32, patch_size=8, image_size=32)


def make_image(color: str, rng: np.random.Generator) -> Image.Image:
    """A noisy square canvas of one colour (the image is the square)."""
    pixels = np.array(COLORS[color], dtype=float) + rng.normal(0, 25, size=(32, 32, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))


def examples(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    return [(make_image(c, rng), c) for c in (names[i % len(names)] for i in rng.permutation(n))]


def plant(model) -> None:
    """Zero and freeze o_proj outside the circuit."""
    layers = model.model.language_model.layers
    for index, layer in enumerate(layers):
        if CIRCUIT[0] <= index <= CIRCUIT[1]:
            continue
        for parameter in layer.self_attn.o_proj.parameters():
            parameter.data.zero_()
            parameter.requires_grad_(False)


def build(steps: int = 150, seed: int = 0, batch_size: int = 32, log: bool = False):
    """(model, processor) of the trained planted model."""
    from vrp_eval.adapters import adapter_for
    from vrp_eval.hooks import attention_hooks
    from vrp_eval.intervention import AttentionKnockout
    from vrp_eval.zoo.build import build_tiny

    torch.manual_seed(seed)
    random.seed(seed)
    model, processor = build_tiny("llava", WORDS, spec(), seed=seed)
    plant(model)
    adapter = adapter_for(model, processor)
    prompt = adapter.build_prompt(QUESTION)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.train()
    data = examples(steps * batch_size, seed)
    for step in range(steps):
        chunk = data[step * batch_size:(step + 1) * batch_size]
        batch = adapter.encode([im for im, _ in chunk], [prompt] * len(chunk), answers=[c for _, c in chunk])
        groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
        choice = random.random()
        hooks = []
        if choice < 0.5:  # knock out one circuit layer: each must carry the colour alone
            layer = CIRCUIT[0] if choice < 0.25 else CIRCUIT[1]
            hooks.append(AttentionKnockout([layer], groups["all"] & ~groups["image"], groups["image"]))
        with attention_hooks(adapter, *hooks):
            loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log and step % 25 == 0:
            print(step, loss.item(), flush=True)
    model.eval()
    return model, processor


if __name__ == "__main__":
    import time

    start = time.time()
    torch.set_num_threads(2)
    model, processor = build(log=True)
    print(f"trained in {time.time() - start:.1f}s")
    if len(sys.argv) > 1:
        model.save_pretrained(sys.argv[1])
        processor.save_pretrained(sys.argv[1])
