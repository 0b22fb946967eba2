"""Batched greedy answers with the probabilities a calibration analysis needs.

Confidence (SPEC 3): the product of the generated answer's token probabilities, EOS excluded, read
from the raw logits (not from the logits processors' output). Also the first-token probability, the
length-normalised (geometric-mean) confidence and, for multiple choice, the softmax over the option
letters at the first answer position.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vrp_eval.errors import VrpError
from vrp_eval.loading import LoadedModel


class ModelOutputError(VrpError, FloatingPointError):
    """The model produced numbers no confidence can be computed from (NaN or infinite logits)."""



@dataclass
class AnswerOutput:
    text: str
    token_ids: list[int]
    token_probs: list[float]
    first_token_id: int
    first_token_prob: float
    option_probs: dict[str, float] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def confidence(self) -> float:
        """Product of the answer tokens' probabilities (EOS excluded); the first token's if empty."""
        if not self.token_probs:
            return self.first_token_prob
        return float(math.exp(sum(math.log(max(p, 1e-300)) for p in self.token_probs)))

    @property
    def confidence_length_norm(self) -> float:
        if not self.token_probs:
            return self.first_token_prob
        return float(self.confidence ** (1.0 / len(self.token_probs)))


def option_token_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    """The single token id of each option letter as the model would write it first."""
    ids = []
    for letter in letters:
        tokens = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"option letter {letter!r} tokenizes to nothing")
        ids.append(tokens[0])
    return ids


@torch.no_grad()
def generate_answers(
    loaded: LoadedModel,
    batch,
    *,
    max_new_tokens: int = 8,
    option_letters: Sequence[Sequence[str]] | None = None,
) -> list[AnswerOutput]:
    """Greedy answers for an encoded (left-padded) batch from `loaded.adapter.encode`."""
    model, adapter = loaded.model, loaded.adapter
    inputs = {k: (v.to(loaded.device) if torch.is_tensor(v) else v) for k, v in adapter.model_inputs(batch).items()}
    out = model.generate(
        **inputs, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
        return_dict_in_generate=True, pad_token_id=adapter.tokenizer.pad_token_id,
        eos_token_id=adapter.eos_token_ids, num_beams=1, temperature=None, top_p=None, top_k=None,
    )
    prompt_len = inputs["input_ids"].shape[1]
    generated = out.sequences[:, prompt_len:]
    logprobs = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, steps, V)
    if not torch.isfinite(logprobs[:, 0]).all():
        raise ModelOutputError(
            "the model produced NaN or infinite logits for the first answer token; try dtype=float32 "
            "or check the weights (records computed so far are kept)"
        )
    eos = set(adapter.eos_token_ids)
    results: list[AnswerOutput] = []
    for row in range(generated.shape[0]):
        ids, probs = [], []
        for step, token in enumerate(generated[row].tolist()):
            if token in eos or token == adapter.tokenizer.pad_token_id:
                break
            ids.append(token)
            probs.append(float(logprobs[row, step, token].exp()))
        first = int(generated[row, 0])
        option_probs = None
        if option_letters is not None and option_letters[row]:
            letters = list(option_letters[row])
            letter_ids = option_token_ids(adapter.tokenizer, letters)
            dist = logprobs[row, 0, letter_ids].softmax(-1)
            option_probs = {letter: float(p) for letter, p in zip(letters, dist)}
        results.append(AnswerOutput(
            text=adapter.tokenizer.decode(ids, skip_special_tokens=True).strip(),
            token_ids=ids, token_probs=probs, first_token_id=first,
            first_token_prob=float(logprobs[row, 0, first].exp()), option_probs=option_probs,
        ))
    return results
