"""Companion signals read from the answer rather than the attention (docs/signals.md): the logit-lens
margin per layer (final norm + LM head on each layer's last prompt position, `adapter.head_logits`)
and self-consistency (the share of sampled answers equal to the greedy one).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vrp_eval.options import DEFAULTS


@torch.no_grad()
def last_position_states(loaded, batch) -> torch.Tensor:
    """(B, L, d): every decoder layer's output at each sample's last prompt position, in one prompt
    forward of its own (only the last position goes through the head). Feeds the logit lens and the
    probing classifier's features; a run reads the same states from the answer's own prompt pass
    (`tracing.CleanCapture`)."""
    from vrp_eval.tracing import CleanCapture

    with CleanCapture(loaded, batch, last_only=True) as capture:
        loaded.model(**loaded.model_inputs(batch), logits_to_keep=1, use_cache=False)
    return capture.last_position_states()


#: Probing features keep at most this many numbers per layer: wider states are projected by a seeded
#: Gaussian matrix (Johnson-Lindenstrauss), which keeps a linear probe's separability up to small
#: distortion and keeps samples.jsonl small (a 7B model's 32 x 4096 states would be 1 MB per line).
PROBE_DIM = 64


def probe_features(hidden: torch.Tensor, seed: int, dim: int = PROBE_DIM) -> list[list[list[float]]]:
    """Per sample, per layer: the last-position state (B, L, d) as at most `dim` numbers (the state
    itself when d <= dim, else its seeded random projection scaled by 1/sqrt(dim)), 6 significant
    digits (a logistic probe does not see the difference; the JSON line is a third of the size)."""
    width = hidden.shape[-1]
    states = hidden.detach().float().cpu()
    if width > dim:
        generator = torch.Generator().manual_seed(int(seed))
        projection = torch.randn(width, dim, generator=generator) / dim ** 0.5
        states = states @ projection
    return [[[float(f"{v:.6g}") for v in layer] for layer in sample] for sample in states.tolist()]


@torch.no_grad()
def logit_lens_margin(loaded, batch, target_ids: Sequence[int] | Sequence[Sequence[int]],
                      hidden: torch.Tensor | None = None):
    """Per sample, per decoder layer: the logit-lens margin of `target_ids[sample]` at the last
    prompt position: final norm + lm_head on that layer's output, target logit minus the largest
    other logit. Only the last position goes through the head, in one forward pass.

    `target_ids` is one token per sample (returns [sample][layer]) or several per sample, e.g. the
    reference answer's first token and the model's own (returns [sample][target][layer]). The final
    norm makes this the standard logit lens (the companion toolkit reads the raw residual); at the
    last layer it is the model's real margin. `hidden`: `last_position_states(loaded, batch)` when the
    caller already has it."""
    if len(target_ids) != batch["input_ids"].shape[0]:
        raise ValueError(f"{len(target_ids)} target ids for a batch of {batch['input_ids'].shape[0]}")
    if hidden is None:
        hidden = last_position_states(loaded, batch)
    logits = loaded.adapter.head_logits(hidden, torch.float32)
    several = len(target_ids) > 0 and isinstance(target_ids[0], (list, tuple))
    targets = torch.as_tensor([list(t) if several else [t] for t in target_ids], device=logits.device)  # (B, K)
    margins = []
    for k in range(targets.shape[1]):
        target = targets[:, k].view(-1, 1, 1).expand(-1, logits.shape[1], 1)
        target_logit = logits.gather(-1, target).squeeze(-1)
        others = logits.scatter(-1, target, float("-inf")).amax(-1)
        margins.append(target_logit - others)  # (B, L)
    out = torch.stack(margins, dim=1).tolist()  # (B, K, L)
    return out if several else [m[0] for m in out]


def reference_token_id(adapter, example, mc_scoring: str = "likelihood") -> int | None:
    """The first token of the reference answer, as the truth margin reads it: the correct option's
    text (multiple choice scored by likelihood) or letter (scored by letter), the most frequent human
    answer after VQA normalisation (VQA data; ties: the first given), else the reference string;
    tokenised without special tokens. None when there is no reference."""
    from collections import Counter

    from vrp_eval.vqa import normalize_answer

    if example.kind == "mc":
        text = example.reference_for(mc_scoring)
    elif example.kind == "vqa" and example.answers:
        # Counted after the official VQA normalisation, so "Two" and "2" are one answer; Counter
        # keeps first-occurrence order, so a tie goes to the answer given first.
        text = Counter(normalize_answer(a) for a in example.answers).most_common(1)[0][0]
    elif example.answers:
        text = example.answers[0]
    else:
        return None
    ids = adapter.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return int(ids[0]) if ids else None


def _normalise_answer(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


@torch.no_grad()
def self_consistency(loaded, batch, k: int = DEFAULTS["consistency_k"], temperature: float = 0.7, top_p: float = 0.9,
                     seed: int = DEFAULTS["seed"], max_new_tokens: int = DEFAULTS["max_new_tokens"],
                     greedy_answers: Sequence[str] | None = None) -> list[float]:
    """Fraction of `k` sampled answers (temperature, nucleus top_p) equal to the greedy answer, per
    sample (answers compared lower-cased, whitespace-normalised). Seeded; the global RNG state is
    left as it was. Pass `greedy_answers` when the greedy run has already been done."""
    from vrp_eval.generation import generate_answers

    if k < 1:
        raise ValueError(f"self-consistency needs k >= 1 samples, got {k}")
    adapter, model = loaded.adapter, loaded.model
    if greedy_answers is None:
        greedy_answers = [a.text for a in generate_answers(loaded, batch, max_new_tokens=max_new_tokens)]
    inputs = loaded.model_inputs(batch)
    devices = [loaded.device] if loaded.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = model.generate(**inputs, do_sample=True, temperature=temperature, top_p=top_p, top_k=None,
                             num_return_sequences=k, max_new_tokens=max_new_tokens, num_beams=1,
                             pad_token_id=adapter.tokenizer.pad_token_id, eos_token_id=adapter.eos_token_ids)
    generated = out[:, inputs["input_ids"].shape[1]:]
    stop = set(adapter.eos_token_ids) | {adapter.tokenizer.pad_token_id}
    texts = []
    for sequence in generated.tolist():
        ids = []
        for token in sequence:
            if token in stop:
                break
            ids.append(token)
        texts.append(adapter.tokenizer.decode(ids, skip_special_tokens=True))
    scores = []
    for row, greedy in enumerate(greedy_answers):
        samples = texts[row * k:(row + 1) * k]
        scores.append(sum(_normalise_answer(s) == _normalise_answer(greedy) for s in samples) / k)
    return scores
