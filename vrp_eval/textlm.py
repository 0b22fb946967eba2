"""Text-only causal language models in the probe engine: the text signals, examples and loader name.

The probe engine (generation, interventions, tracing, attention sharpness, `probe.run_probe`) speaks
to a model through its adapter. For a text-only model (`vrp_eval.adapters.TextAdapter`) the
adapter's `image` position group is the *subject*: the prompt's first sentence (the context the
question is about), as ROME corrupts the subject tokens of a fact. So, unchanged:

    causal trace     noise on the subject embeddings; restore each layer at subject / text / last
    knockout circuit the window of layers where blocking attention to the subject hurts most
    causal_acc_drop  the subject hidden states corrupted inside that window, answers again
    sharpness        entropy of the answer-predicting attention row over the subject tokens

and every record, aggregate and SPEC metric name means what it means for a VLM with "image" read as
"subject". The subject ends at the first token whose text ends with `subject_end` (default "."),
found from the token ids like the image tokens of a VLM; every position before it (special tokens
excluded) belongs to it.

    loaded = load_model("tiny-text-llama")          # or load_text_model(folder): text_only=True
    report = run_probe(loaded, ProbeSettings(signals=TEXT_SIGNALS), examples=text_examples(rows))
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from vrp_eval.adapters import TextAdapter  # noqa: F401 (its documented name here)
from vrp_eval.data import PromptedExample
from vrp_eval.loading import LoadedModel, load_model
from vrp_eval.zoo import zoo_path

#: The probe signals that mean something without an image (the spatial ones need an image grid).
TEXT_SIGNALS = ("attention", "tracing", "circuit", "logit_lens")
#: The zoo's text model, shipped beside the VLMs (built by `vrp_eval.zoo.build_text`).
TINY_TEXT_LLAMA = zoo_path("tiny-text-llama")

# The probe engine reads an image per example before it encodes a batch; a text adapter ignores it.
_NO_IMAGE = Image.new("RGB", (1, 1))


def load_text_model(model_id: str | Path, **kwargs: Any) -> LoadedModel:
    """`load_model(model_id, text_only=True, ...)`: a text-only causal LM with its `TextAdapter`.
    `model_id`: a local `save_pretrained` folder, `tiny-text-llama`, or a Hub id (in the local cache
    when offline); `kwargs`: `load_model`'s (device, dtype, revision, trust_remote_code, subject_end)."""
    return load_model(model_id, text_only=True, **kwargs)


def text_example(question_id: Any, prompt: str, answer: str | None, meta: dict[str, Any] | None = None
                 ) -> PromptedExample:
    """A short-answer example whose prompt is `prompt` (lm-eval's context), without an image, scored
    by exact match against `answer` (None: unscored, 0)."""
    return PromptedExample(question_id=question_id, question=prompt, image=_NO_IMAGE, kind="exact",
                       answers=[answer] if answer is not None else [], meta=dict(meta or {}), prompt=prompt)
