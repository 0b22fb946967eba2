"""Model-family adapters: everything the probe needs to know about a model family, found by config class.

The engine never branches on a model's name. It asks the adapter for the decoder layers, the final
norm and LM head (`head_logits`), where the embeddings enter the language model (`hook_embeddings`),
the image token id, the position groups of a processed batch (from the expanded input ids, never
from offsets), the layout of its positional inputs (`batch_dim`, `select_rows`), how to phrase a
prompt and label an answer, and whether the prefix attends bidirectionally (PaliGemma).

Adding a family is one `FamilyAdapter` subclass that overrides what differs (registered with
`register_adapter`, or listed in `_ADAPTERS`) and, for a shipped tiny model, its `vrp_eval.zoo` entry.
Text-only causal LMs get `TextAdapter`, whose `image` group is the prompt's subject sentence.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from vrp_eval.errors import VrpError

# lmms-eval's VQAv2 / OK-VQA prompts end with this line; our default prompt uses it too so that
# `vrp-eval run` and `lmms-eval --model vrp` score the very same token sequences.
from vrp_eval.options import DEFAULT_POST_PROMPT  # noqa: F401 (re-exported; its home is the options table)

#: The position groups every adapter's `position_groups` returns.
GROUPS = ("image", "text", "last", "all")
#: What ends a text model's subject sentence, unless told otherwise (`TextAdapter`).
SUBJECT_END = "."


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

    def check_layers(self, layers: Iterable[int] | None) -> list[int]:
        """`layers` as sorted unique decoder-layer indices (None: every layer); ValueError naming the
        range when one is out of it."""
        chosen = list(range(self.num_layers)) if layers is None else sorted({int(l) for l in layers})
        bad = [l for l in chosen if not 0 <= l < self.num_layers]
        if bad:
            raise ValueError(f"layers {bad} out of range: this model has decoder layers 0..{self.num_layers - 1}")
        return chosen

    @property
    def final_norm(self) -> nn.Module:
        """The language model's norm after its last decoder layer."""
        language_model = self.language_model
        for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
            module = getattr(language_model, name, None)
            if isinstance(module, nn.Module):
                return module
        raise AdapterError(f"cannot find the final norm of {type(language_model).__name__} (looked for "
                           "`norm`, `final_layernorm`, `ln_f`): the logit lens needs it")

    def head_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Next-token logits (..., V) from last-decoder-layer states (..., D): the final norm, the LM
        head and the family's final-logit softcap (Gemma 2). `dtype`: the head's output is cast to it
        before the softcap (None: kept as it is)."""
        logits = self.model.get_output_embeddings()(self.final_norm(hidden))
        if dtype is not None:
            logits = logits.to(dtype)
        softcap = getattr(self.text_config, "final_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def hook_embeddings(self, scope, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """In `scope` (a `vrp_eval.hooks.HookScope`), call `edit(embeds)` on the embeddings entering
        the language model (B, T, D), image features already merged in; a tensor it returns replaces
        them. A VLM's outer model hands its language model `inputs_embeds`."""
        def hook(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                return None
            new = edit(embeds)
            if new is None:
                return None
            kwargs = dict(kwargs)
            kwargs["inputs_embeds"] = new
            return args, kwargs

        scope.on_input(self.language_model, hook)

    # --- prompts and batches ---------------------------------------------------------------------
    def build_prompt(self, question: str) -> str:
        """The model's own prompt for one image and `question` (generation prompt included)."""
        template = getattr(self.processor, "chat_template", None)
        if template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"{image_token}\n{question}"

    def _process(self, images: Sequence[Any], texts: Sequence[str], **kwargs: Any):
        """The processor on a left-padded batch of (image, text) pairs."""
        return self.processor(images=list(images), text=list(texts), return_tensors="pt", padding=True, **kwargs)

    def encode(self, images: Sequence[Any], prompts: Sequence[str], answers: Sequence[str] | None = None):
        """Processor outputs for a left-padded batch; with `answers`, the answer tokens and EOS are
        appended and `labels` mark them (everything else -100)."""
        if answers is None:
            return self._process(images, prompts)
        eos = self.tokenizer.eos_token
        texts = [f"{p}{self.answer_separator}{a}{eos}" for p, a in zip(prompts, answers)]
        batch = self._process(images, texts)
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
        side = round(n ** 0.5)
        if side * side != n:
            return (1, n)
        return (side, side)

    def model_inputs(self, batch) -> dict[str, Any]:
        """The keyword arguments the model's forward takes from a processor batch."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def batch_dim(self, value: torch.Tensor) -> int:
        """The batch dimension of a tensor the language model passes its decoder layers. Multimodal
        rotary position ids (Qwen2-VL and kin: (3 or 4, B, T) long) carry it second; the rest first."""
        return 1 if value.ndim == 3 and value.shape[0] in (3, 4) and value.dtype == torch.long else 0

    def _select_value(self, key: str, value: Any, batch, index: torch.Tensor) -> Any:
        """The rows `index` of one entry of an encoded batch (entries without a batch dimension as they are)."""
        if torch.is_tensor(value) and value.shape[:1] == batch["input_ids"].shape[:1]:
            return value[index]
        return value

    def select_rows(self, batch, rows: list[int]):
        """The samples `rows` of an encoded batch, equal to a fresh encoding of them (columns that are
        padding in every selected row are dropped)."""
        index = torch.tensor(rows)
        out = {key: self._select_value(key, value, batch, index) for key, value in batch.items()}
        keep = out["attention_mask"].bool().any(0)
        first = int(keep.int().argmax())
        for key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "labels"):
            if key in out and torch.is_tensor(out[key]) and out[key].dim() == 2:
                out[key] = out[key][:, first:]
        return type(batch)(out) if hasattr(batch, "convert_to_tensors") else out


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
            return self._process(images, prompts)
        # The processor's `suffix` marks the answer with token_type_ids = 1 (causal part, labels).
        return self._process(images, prompts, suffix=[f"{a}" for a in answers])


class Qwen2VLAdapter(FamilyAdapter):
    """Qwen2-VL: 3-D rotary positions and a variable number of image tokens per image."""

    family = "qwen2vl"
    config_classes = ("Qwen2VLConfig", "Qwen2_5_VLConfig")
    answer_separator = ""

    def image_grid(self, batch, row: int) -> tuple[int, int]:
        merge = getattr(self.processor.image_processor, "merge_size", 2)
        _, height, width = (int(x) for x in batch["image_grid_thw"][row])
        return (height // merge, width // merge)

    def _select_value(self, key: str, value: Any, batch, index: torch.Tensor) -> Any:
        if key == "pixel_values":  # every image's patches in one flat tensor: image i has prod(grid_thw[i])
            chunks = value.split(batch["image_grid_thw"].prod(-1).tolist())
            return torch.cat([chunks[r] for r in index.tolist()])
        return super()._select_value(key, value, batch, index)


class TextAdapter(FamilyAdapter):
    """A decoder-only text LM (`AutoModelForCausalLM`); the `image` group is the subject sentence.

    The subject is the prompt's first sentence (the context the question is about, as ROME corrupts
    the subject tokens of a fact): each row's positions up to its first token whose text ends with
    `subject_end`, special tokens excluded. A causal LM embeds its token ids inside its base model,
    so the embeddings entering the language model are the output of its input-embedding module."""

    family = "text"

    def __init__(self, model: nn.Module, tokenizer: Any, subject_end: str = SUBJECT_END):
        super().__init__(model, tokenizer)
        if not subject_end:
            raise ValueError("subject_end must be a non-empty string (the text that ends the subject sentence)")
        self.subject_end = subject_end
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        self._end_ids = torch.tensor([i for i, token in enumerate(vocab)
                                      if token and token.rstrip().endswith(subject_end)], dtype=torch.long)
        if not len(self._end_ids):
            raise AdapterError(f"no token of {type(self.tokenizer).__name__} ends with {subject_end!r}: "
                               "pass the text that ends the subject sentence as subject_end")
        self._special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)

    @property
    def language_model(self) -> nn.Module:
        return self.model.base_model

    @property
    def image_token_id(self) -> int:
        raise AdapterError("a text-only model has no image token; its `image` group is the subject sentence")

    def hook_embeddings(self, scope, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        scope.on_output(self.model.get_input_embeddings(), lambda module, args, output: edit(output))

    def build_prompt(self, question: str) -> str:
        return question  # lm-eval's context string is already the whole prompt

    def _process(self, images: Sequence[Any], texts: Sequence[str], **kwargs: Any):
        """The tokenizer on a left-padded batch; the images are ignored."""
        return self.tokenizer(list(texts), return_tensors="pt", padding=True, **kwargs)

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The subject: each row's positions up to its first sentence end, special tokens excluded."""
        ends = torch.isin(input_ids, self._end_ids.to(input_ids.device))
        before_end = ends.int().cumsum(-1) - ends.int() == 0  # up to and including the first end
        found = ends.any(-1, keepdim=True)
        return before_end & found & ~torch.isin(input_ids, self._special_ids.to(input_ids.device))

    def position_groups(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        groups = super().position_groups(input_ids, attention_mask)
        groups["image"] &= ~groups["last"]  # a prompt that is one sentence: the last position is its own group
        groups["text"] = groups["all"] & ~groups["image"] & ~groups["last"]
        groups["subject"] = groups["image"]
        return groups

    def image_grid(self, batch, row: int) -> tuple[int, int]:
        """A sentence is one row of tokens."""
        groups = self.position_groups(batch["input_ids"][row:row + 1], batch["attention_mask"][row:row + 1])
        return (1, int(groups["image"].sum()))


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
