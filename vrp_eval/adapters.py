"""Model-family adapters: everything the probe needs to know about a VLM family, found by config class.

The engine never branches on a model's name. It asks the adapter for the decoder layers, the image
token id, the position groups of a processed batch (from the expanded input ids, never from
offsets), how to phrase a prompt, and whether the prefix attends bidirectionally (PaliGemma).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vrp_eval.errors import VrpError

# lmms-eval's VQAv2 / OK-VQA prompts end with this line; our default prompt uses it too so that
# `vrp-eval run` and `lmms-eval --model vrp` score the very same token sequences.
from vrp_eval.options import DEFAULT_POST_PROMPT  # noqa: F401 (re-exported; its home is the options table)

GROUPS = ("image", "text", "last", "all")


class AdapterError(VrpError, ValueError):
    """A model that vrp-eval cannot probe as it is, with what to do about it."""


class FamilyAdapter:
    """Generic adapter for any `AutoModelForImageTextToText` model; families override the details."""

    family = "generic"
    config_classes: tuple[str, ...] = ()
    bidirectional_prefix = False

    def __init__(self, model: nn.Module, processor: Any):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._layers = self._find_decoder_layers()

    # --- structure -------------------------------------------------------------------------------
    def _find_decoder_layers(self) -> nn.ModuleList:
        for path in ("model.language_model.layers", "language_model.layers",
                     "model.language_model.model.layers", "language_model.model.layers",
                     "model.text_model.layers", "model.layers"):
            module: Any = self.model
            for part in path.split("."):
                module = getattr(module, part, None)
                if module is None:
                    break
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                return module
        raise AdapterError(
            f"cannot find the decoder layers of {type(self.model).__name__}: looked for "
            "`model.language_model.layers` (transformers 5 layout) and older layouts. "
            "Write a FamilyAdapter subclass for this family and register it with `register_adapter`."
        )

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self._layers

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def language_model(self) -> nn.Module:
        for path in ("model.language_model", "language_model"):
            module: Any = self.model
            for part in path.split("."):
                module = getattr(module, part, None)
            if module is not None:
                return module
        raise AdapterError(f"cannot find the language model of {type(self.model).__name__}")

    @property
    def text_config(self):
        config = self.model.config
        return getattr(config, "text_config", None) or config

    @property
    def image_token_id(self) -> int:
        config = self.model.config
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if value is not None:
                return int(value)
        value = getattr(self.processor, "image_token_id", None)
        if value is not None:
            return int(value)
        raise AdapterError(
            f"{type(config).__name__} names no image token id (`image_token_id` / "
            "`image_token_index`): vrp-eval needs it to find the image positions."
        )

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        if ids is None:
            ids = self.tokenizer.eos_token_id
        return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]

    # --- prompts and batches ---------------------------------------------------------------------
    def build_prompt(self, question: str) -> str:
        """The model's own prompt for one image and `question` (generation prompt included)."""
        template = getattr(self.processor, "chat_template", None)
        if template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"{image_token}\n{question}"

    def encode(self, images: Sequence[Any], prompts: Sequence[str], answers: Sequence[str] | None = None):
        """Processor outputs for a left-padded batch; with `answers`, the answer tokens and EOS are
        appended and `labels` mark them (everything else -100)."""
        if answers is None:
            return self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
        eos = self.tokenizer.eos_token
        texts = [f"{p}{self.answer_separator}{a}{eos}" for p, a in zip(prompts, answers)]
        batch = self.processor(images=list(images), text=texts, return_tensors="pt", padding=True)
        labels = torch.full_like(batch["input_ids"], -100)
        for row, answer in enumerate(answers):
            n = len(self.tokenizer(f"{self.answer_separator}{answer}{eos}", add_special_tokens=False)["input_ids"])
            labels[row, -n:] = batch["input_ids"][row, -n:]
        batch["labels"] = labels
        return batch

    answer_separator = " "

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.image_token_id

    def position_groups(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean (batch, seq) masks for the groups `image`, `text`, `last`, `all` (padding excluded)."""
        valid = attention_mask.bool()
        image = self.image_mask(input_ids) & valid
        last = torch.zeros_like(valid)
        # Left padding: the last prompt position is the last column; handle right padding too.
        last_index = valid.shape[1] - 1 - valid.flip(1).int().argmax(1)
        last[torch.arange(valid.shape[0]), last_index] = True
        text = valid & ~image & ~last
        return {"image": image, "text": text, "last": last, "all": valid}

    def image_grid(self, batch, row: int) -> tuple[int, int]:
        """(rows, columns) of the image-token grid of sample `row` (for spatial signals)."""
        n = int(self.image_mask(batch["input_ids"][row]).sum())
        side = int(round(n ** 0.5))
        if side * side != n:
            return (1, n)
        return (side, side)

    def model_inputs(self, batch) -> dict[str, Any]:
        """The keyword arguments the model's forward takes from a processor batch."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "num_layers": self.num_layers, "image_token_id": self.image_token_id,
                "bidirectional_prefix": self.bidirectional_prefix}


class LlavaAdapter(FamilyAdapter):
    family = "llava"
    config_classes = ("LlavaConfig", "LlavaNextConfig", "LlavaOnevisionConfig", "VipLlavaConfig")


class PaliGemmaAdapter(FamilyAdapter):
    """PaliGemma: image tokens + BOS + prompt form a prefix with full (bidirectional) attention."""

    family = "paligemma"
    config_classes = ("PaliGemmaConfig",)
    bidirectional_prefix = True

    def build_prompt(self, question: str) -> str:
        return f"{self.processor.image_token}answer en {question}"

    def encode(self, images, prompts, answers=None):
        if answers is None:
            return self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
        # The processor's `suffix` marks the answer with token_type_ids = 1 (causal part, labels).
        return self.processor(images=list(images), text=list(prompts), suffix=[f"{a}" for a in answers],
                              return_tensors="pt", padding=True)


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL: 3-D rotary positions and a variable number of image tokens per image."""

    family = "qwen2vl"
    config_classes = ("Qwen2VLConfig", "Qwen2_5_VLConfig")
    answer_separator = ""

    def image_grid(self, batch, row: int) -> tuple[int, int]:
        merge = getattr(self.processor.image_processor, "merge_size", 2)
        _, height, width = (int(x) for x in batch["image_grid_thw"][row])
        return (height // merge, width // merge)


_ADAPTERS: list[type[FamilyAdapter]] = [LlavaAdapter, PaliGemmaAdapter, Qwen2VLAdapter]


def register_adapter(adapter: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Register an adapter for more config classes (usable as a class decorator)."""
    _ADAPTERS.insert(0, adapter)
    return adapter


def adapter_for(model: nn.Module, processor: Any) -> FamilyAdapter:
    """The adapter for `model`, found by its config class; the generic adapter otherwise."""
    config_name = type(model.config).__name__
    for adapter in _ADAPTERS:
        if config_name in adapter.config_classes:
            return adapter(model, processor)
    return FamilyAdapter(model, processor)
