"""Text-only causal language models in the probe engine: a loader and a `TextAdapter`.

The probe engine (generation, interventions, tracing, attention sharpness, `probe.run_probe`) speaks
to a model through its `FamilyAdapter`. For a text-only model the adapter's `image` position group is
the *subject*: the prompt's first sentence (the context the question is about), as ROME corrupts the
subject tokens of a fact. So, unchanged:

    causal trace     noise on the subject embeddings; restore each layer at subject / text / last
    knockout circuit the window of layers where blocking attention to the subject hurts most
    causal_acc_drop  the subject hidden states corrupted inside that window, answers again
    sharpness        entropy of the answer-predicting attention row over the subject tokens

and every record, aggregate and SPEC metric name means what it means for a VLM with "image" read as
"subject". The subject ends at the first token whose text ends with `subject_end` (default "."),
found from the token ids like the image tokens of a VLM; every position before it (special tokens
excluded) belongs to it.

    loaded = load_text_model("vrp_eval/zoo/tiny-text-llama")
    report = run_probe(loaded, ProbeSettings(signals=TEXT_SIGNALS), examples=text_examples(rows))
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vrp_eval.adapters import AdapterError, FamilyAdapter
from vrp_eval.data import Example
from vrp_eval.loading import (
    DTYPES,
    LoadedModel,
    ModelLoadError,
    _weights_sha,
    resolve_model,
)

#: The probe signals that mean something without an image (the spatial ones need an image grid).
TEXT_SIGNALS = ("attention", "tracing", "circuit", "logit_lens")
#: The zoo's text model, shipped beside the VLMs (built by `vrp_eval.zoo.build_text`).
TINY_TEXT_LLAMA = Path(__file__).resolve().parent / "zoo" / "tiny-text-llama"

# The probe engine reads an image per example before it encodes a batch; a text adapter ignores it.
_NO_IMAGE = Image.new("RGB", (1, 1))


class TextAdapter(FamilyAdapter):
    """A decoder-only text LM (`AutoModelForCausalLM`); the `image` group is the subject sentence.

    The engine corrupts "what enters the language model" as `inputs_embeds` (a VLM's outer model
    embeds the prompt and hands its base model embeddings). A causal LM passes its base model
    token ids instead, so the adapter installs, for the model's lifetime, a pre-hook on the base
    model that embeds the ids itself: the same `embed_tokens(input_ids)` the base model would run,
    so outputs are unchanged, and the engine's embedding hooks see `inputs_embeds`."""

    family = "text"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, subject_end: str = "."):
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
        self._embed_hook = self.language_model.register_forward_pre_hook(self._embed_ids, with_kwargs=True)

    def _embed_ids(self, module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None or kwargs.get("input_ids") is None:
            return None
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = module.get_input_embeddings()(kwargs.pop("input_ids"))
        return args, kwargs

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.base_model

    @property
    def image_token_id(self) -> int:
        raise AdapterError("a text-only model has no image token; its `image` group is the subject sentence")

    def build_prompt(self, question: str) -> str:
        return question  # lm-eval's context string is already the whole prompt

    def encode(self, images: Sequence[Any], prompts: Sequence[str], answers: Sequence[str] | None = None):
        """Tokenizer outputs for a left-padded batch (images are ignored); with `answers`, the
        answer and EOS are appended and `labels` mark them."""
        if answers is None:
            return self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        eos = self.tokenizer.eos_token
        batch = self.tokenizer([f"{p}{self.answer_separator}{a}{eos}" for p, a in zip(prompts, answers)],
                               return_tensors="pt", padding=True)
        labels = torch.full_like(batch["input_ids"], -100)
        for row, answer in enumerate(answers):
            n = len(self.tokenizer(f"{self.answer_separator}{answer}{eos}", add_special_tokens=False)["input_ids"])
            labels[row, -n:] = batch["input_ids"][row, -n:]
        batch["labels"] = labels
        return batch

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

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "num_layers": self.num_layers, "subject_end": self.subject_end,
                "bidirectional_prefix": self.bidirectional_prefix}


def load_text_model(model_id: str | Path, *, device: str | None = None, dtype: str = "auto",
                    revision: str | None = None, trust_remote_code: bool = False,
                    subject_end: str = ".") -> LoadedModel:
    """A text-only causal LM (`AutoModelForCausalLM` + `AutoTokenizer`) with its `TextAdapter`.
    `model_id`: a local `save_pretrained` folder, `tiny-text-llama`, or a Hub id (in the local cache
    when offline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    model_id = str(model_id)
    if model_id == TINY_TEXT_LLAMA.name:
        source, local = str(TINY_TEXT_LLAMA), str(TINY_TEXT_LLAMA)
    else:
        source, local = resolve_model(model_id, revision)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], attn_implementation="sdpa",
                                                     **common)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except OSError as error:
        raise ModelLoadError(f"cannot load text model {model_id!r} ({error.__class__.__name__}: {error}); pass "
                             "a local save_pretrained folder, tiny-text-llama, or a Hub id in the local cache") from None
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    sha = _weights_sha(Path(local)) if local else (getattr(model.config, "_commit_hash", None) or "unknown")
    return LoadedModel(model=model, processor=tokenizer, adapter=TextAdapter(model, tokenizer, subject_end),
                       model_name=model_id, model_path=source, model_sha=sha,
                       dtype=str(next(model.parameters()).dtype).replace("torch.", ""))


@dataclasses.dataclass
class TextExample(Example):
    """An `Example` whose prompt is a given string (lm-eval's context); no image."""

    prompt: str = ""

    def prompt_text(self, post_prompt: str, mc_scoring: str = "likelihood") -> str:
        return self.prompt


def text_example(question_id: Any, prompt: str, answer: str | None, meta: dict[str, Any] | None = None
                 ) -> TextExample:
    """A short-answer example scored by exact match against `answer` (None: unscored, 0)."""
    return TextExample(question_id=question_id, question=prompt, image=_NO_IMAGE, kind="exact",
                       answers=[answer] if answer is not None else [], meta=dict(meta or {}), prompt=prompt)
