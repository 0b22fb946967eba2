"""Gradient saliency over the image tokens (docs/signals.md, "Which signal predicts errors").

Per sample, input x gradient on the embeddings entering the language model (the point where the
tracing corruption acts, `adapter.hook_embeddings`): for image position i,

    a_i = | e_i . d log p(t* | prompt) / d e_i |

where t* is the clean greedy answer's first token at the last prompt position. The per-sample signal
is the saliency's concentration over the n image tokens, 1 - H(a / sum a) / log n, in [0, 1]: 0 when
every image token matters equally, 1 when one token carries all of it; the same normalisation as
attention sharpness, so the two read alike.

Cost: one forward and one backward pass (counted as 3 forward-pass equivalents). `torch.autograd.grad`
asks for the embeddings' gradient only, so no parameter gradient is accumulated and the model is left
as it was.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vrp_eval.hooks import HookScope

#: Forward-pass equivalents of one saliency: a forward and a backward (about two forwards).
SALIENCY_PASSES = 3.0


@dataclass
class Saliency:
    concentration: float | None  # None: no image token, or a gradient of exactly zero everywhere
    total: float  # sum of |input x gradient| over the image tokens
    n_image_tokens: int


def concentration(weights: torch.Tensor) -> float | None:
    """1 - H(w / sum w) / log n for non-negative weights over n >= 2 tokens; None if they sum to 0."""
    n = weights.numel()
    total = float(weights.sum())
    if n < 2 or not total > 0.0:
        return None
    p = weights.double() / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return 1.0 - entropy / math.log(n)


def gradient_saliency(loaded, batch, target_ids: Sequence[int]) -> list[Saliency]:
    """Input x gradient saliency of each sample's `target_ids[row]` over its image tokens."""
    adapter, model = loaded.adapter, loaded.model
    rows = batch["input_ids"].shape[0]
    if len(target_ids) != rows:
        raise ValueError(f"{len(target_ids)} target ids for a batch of {rows}")
    image = adapter.position_groups(batch["input_ids"], batch["attention_mask"])["image"].to(loaded.device)
    taken: list[torch.Tensor] = []

    def leaf(embeds: torch.Tensor) -> torch.Tensor | None:
        if taken or tuple(embeds.shape[:2]) != tuple(image.shape):
            return None
        taken.append(embeds.detach().requires_grad_(True))
        return taken[0]

    with torch.enable_grad(), HookScope() as scope:
        adapter.hook_embeddings(scope, leaf)
        logits = model(**loaded.model_inputs(batch), logits_to_keep=1, use_cache=False).logits[:, -1]
        if not taken:
            raise RuntimeError(f"{type(adapter).__name__}: no embeddings reached the language model, so there "
                               "is nothing to take a gradient of (is hook_embeddings right for this family?)")
        targets = torch.as_tensor(list(target_ids), device=logits.device).view(-1, 1)
        log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).gather(-1, targets).sum()
        (grad,) = torch.autograd.grad(log_p, taken[0])
    wide = torch.promote_types(grad.dtype, torch.float32)
    attribution = (taken[0].detach().to(wide) * grad.to(wide)).sum(-1).abs()  # (B, T)
    out = []
    for row in range(rows):
        weights = attribution[row][image[row]]
        out.append(Saliency(concentration=concentration(weights), total=float(weights.sum()),
                            n_image_tokens=int(weights.numel())))
    return out
