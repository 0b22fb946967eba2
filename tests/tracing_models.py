"""Small random-init models and batches shared by the tracing and intervention tests.

A random-init tiny model answers almost uniformly and barely reads the image, which would let a
wrong restoration pass unnoticed: the LM head, the queries/keys and the image projection are
scaled up so that probabilities, attention and image effects are far from flat.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from vrp_eval.adapters import adapter_for
from vrp_eval.loading import LoadedModel
from vrp_eval.zoo.build import TinySpec, build_tiny

FAMILIES = ("llava", "paligemma", "qwen2vl")
WORDS = ["what", "color", "is", "the", "circle", "square", "red", "green", "blue", "yes", "no", "left", "right", "0", "1", "2", "3"]
QUESTIONS = ["what color is the circle left of the red square?", "what?", "is the square blue?"]
NUM_LAYERS = 4


def images(n=3, size=48, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def sharpen(model) -> None:
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        model.get_output_embeddings().weight.mul_(30.0)
        # The image embeddings: the last linear map of each family's projector / merger.
        last = [m for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ("multi_modal_projector" in name or "merger" in name)][-1]
        last.weight.mul_(8.0)


def tiny_loaded(family: str, num_layers: int = NUM_LAYERS, seed: int = 3, dtype: torch.dtype = torch.float32) -> LoadedModel:
    torch.manual_seed(0)
    model, processor = build_tiny(family, WORDS, TinySpec(num_layers=num_layers), seed=seed)
    sharpen(model)
    model.to(dtype)
    return LoadedModel(model=model, processor=processor, adapter=adapter_for(model, processor),
                       model_name=f"tiny-{family}", model_path="", model_sha="", dtype=str(dtype).removeprefix("torch."))


def encode(loaded, questions=QUESTIONS, seed=0):
    """An encoded batch; floating inputs (pixels) in the model's dtype."""
    adapter = loaded.adapter
    batch = adapter.encode(images(len(questions), seed=seed), [adapter.build_prompt(q) for q in questions])
    dtype = loaded.model.dtype
    if dtype == torch.float32:
        return batch
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def all_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
               for m in module.modules())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and two threads on a busy two-core machine spin
    against each other (measured 50x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
