"""Batched greedy answers with the probabilities a calibration analysis needs.

Confidence (SPEC 3): the product of the generated answer's token probabilities, EOS excluded, read
from the raw logits (not from the logits processors' output). Also the first-token probability, the
length-normalised (geometric-mean) confidence and, for multiple choice, the softmax over the option
letters at the first answer position (`generate_answers`, letter scoring) or over the options'
log-likelihoods (`option_answers`, likelihood scoring, as lm-eval's multiple-choice tasks score).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vrp_eval.data import OPTION_LETTERS
from vrp_eval.errors import VrpError
from vrp_eval.loading import LoadedModel
from vrp_eval.options import DEFAULTS


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
    option_index: int | None = None  # likelihood scoring: the index of the chosen option

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
    max_new_tokens: int = DEFAULTS["max_new_tokens"],
    option_letters: Sequence[Sequence[str]] | None = None,
) -> list[AnswerOutput]:
    """Greedy answers for an encoded (left-padded) batch from `loaded.adapter.encode`."""
    model, adapter = loaded.model, loaded.adapter
    inputs = loaded.model_inputs(batch)
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


def _option_token_ids(tokenizer, option: str) -> list[int]:
    """The tokens of an option's text as the model writes it as the answer (no special tokens)."""
    ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"option {option!r} tokenizes to nothing; give every choice some text")
    return list(ids)


class _ForceTokens:
    """A logits processor that makes greedy generation write `targets[:, step]` (B, S)."""

    def __init__(self, targets: torch.Tensor, prompt_len: int):
        self.targets, self.prompt_len = targets, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = self.targets[:, step].to(scores.device)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, forced[:, None], 0.0)


def _eos_padded(adapter, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, S): each row's tokens, padded with EOS to the longest row (what `_ForceTokens` writes)."""
    targets = torch.full((len(rows), max(len(row) for row in rows)), adapter.eos_token_ids[0], dtype=torch.long)
    for r, row in enumerate(rows):
        targets[r, :len(row)] = torch.tensor(row)
    return targets


def _raw_logprobs(loaded: LoadedModel, inputs: dict[str, Any], steps: int, targets: torch.Tensor | None
                  ) -> torch.Tensor:
    """(B, steps, V) log-probabilities from the raw logits of `steps` generation steps, writing
    `targets` when given (greedy otherwise). Through `generate`, so hooks, caches and position ids
    are exactly those of answering."""
    from transformers import LogitsProcessorList

    adapter = loaded.adapter
    processors = LogitsProcessorList([_ForceTokens(targets, inputs["input_ids"].shape[1])]) if targets is not None else None
    out = loaded.model.generate(
        **inputs, do_sample=False, max_new_tokens=steps, min_new_tokens=steps, output_logits=True,
        return_dict_in_generate=True, pad_token_id=adapter.tokenizer.pad_token_id, eos_token_id=adapter.eos_token_ids,
        num_beams=1, temperature=None, top_p=None, top_k=None, logits_processor=processors,
    )
    logits = torch.stack(out.logits, dim=1)
    logprobs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # float32 at least
    if not torch.isfinite(logprobs[:, 0]).all():
        raise ModelOutputError(
            "the model produced NaN or infinite logits for the first answer token; try dtype=float32 "
            "or check the weights (records computed so far are kept)"
        )
    return logprobs


@torch.no_grad()
def option_answers(loaded: LoadedModel, batch, choices: Sequence[Sequence[str]]) -> list[AnswerOutput]:
    """Multiple choice by likelihood, for an encoded (left-padded) batch: each option's text is
    scored as the answer, log p(option) = the sum of its tokens' log-probabilities (lm-eval's `acc`);
    the answer is the option with the largest (the first on ties), its confidence the softmax over
    the options' log-likelihoods. Single-token options all read the first answer position of one
    generation step; each longer option adds one forced generation. Hooks active around the call
    (knockouts, corruptions, attention recorders) apply as they do to greedy answering."""
    adapter = loaded.adapter
    inputs = loaded.model_inputs(batch)
    if len(choices) != inputs["input_ids"].shape[0]:
        raise ValueError(f"{len(choices)} option lists for a batch of {inputs['input_ids'].shape[0]} samples")
    ids = [[_option_token_ids(adapter.tokenizer, option) for option in row] for row in choices]
    if any(not row for row in ids):
        raise ValueError("a multiple-choice sample without options")
    first = _raw_logprobs(loaded, inputs, 1, None)[:, 0]  # (B, V): shared by every option's first token
    token_logprobs: list[list[list[float]]] = [
        [[float(first[r, option[0]])] for option in row] for r, row in enumerate(ids)]
    for j in range(max(len(row) for row in ids)):
        longer = [r for r, row in enumerate(ids) if j < len(row) and len(row[j]) > 1]
        if not longer:
            continue
        # Rows without a long j-th option write their first option's first token (ignored).
        targets = _eos_padded(adapter, [row[j] if r in longer else row[0][:1] for r, row in enumerate(ids)])
        logprobs = _raw_logprobs(loaded, inputs, targets.shape[1], targets)
        for r in longer:
            option = ids[r][j]
            token_logprobs[r][j] = [float(logprobs[r, s, option[s]]) for s in range(len(option))]
    results = []
    for r, row in enumerate(choices):
        lls = torch.tensor([sum(values) for values in token_logprobs[r]], dtype=torch.float64)
        probs = (lls - lls.max()).exp()
        probs = probs / probs.sum()
        pred = int(torch.argmax(lls))
        chosen = token_logprobs[r][pred]
        results.append(AnswerOutput(
            text=str(row[pred]), token_ids=list(ids[r][pred]), token_probs=[math.exp(v) for v in chosen],
            first_token_id=int(ids[r][pred][0]), first_token_prob=math.exp(chosen[0]),
            option_probs={letter: float(p) for letter, p in zip(OPTION_LETTERS, probs)}, option_index=pred,
        ))
    return results



@torch.no_grad()
def continuation_loglikelihoods(loaded: LoadedModel, batch, continuations: Sequence[str]) -> list[tuple[float, bool]]:
    """lm-eval's log-likelihood request for an encoded (left-padded) batch: per row, (the sum of
    the continuation's token log-probabilities as the answer, whether greedy decoding writes exactly
    those tokens). The continuation is tokenised as `option_answers` tokenises an option."""
    adapter = loaded.adapter
    inputs = loaded.model_inputs(batch)
    if len(continuations) != inputs["input_ids"].shape[0]:
        raise ValueError(f"{len(continuations)} continuations for a batch of {inputs['input_ids'].shape[0]} samples")
    ids = [_option_token_ids(adapter.tokenizer, text) for text in continuations]
    targets = _eos_padded(adapter, ids)
    logprobs = _raw_logprobs(loaded, inputs, targets.shape[1], targets)
    out = []
    for r, row in enumerate(ids):
        picked = logprobs[r, torch.arange(len(row)), torch.tensor(row)]
        greedy = bool((logprobs[r, :len(row)].argmax(-1).cpu() == torch.tensor(row)).all())
        out.append((float(picked.sum()), greedy))
    return out
