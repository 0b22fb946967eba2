"""Scoped interventions on a VLM's language model: hidden states and attention (SPEC section 1).

Every intervention is a `vrp_eval.hooks.HookScope`: a context manager that installs its hooks on
entry and removes them on exit, also when the block raises; nothing outlives its `with` block.

Hidden states (the residual stream):

    with EmbeddingCorruption(adapter, groups["image"], kind="gaussian", scale=3.0,
                             sigma=noise.embedding["image"], seed=0):
        model(**inputs)                    # image-token embeddings entering the language model noised
    with HiddenStateIntervention(adapter, layers=[4, 5], masks=groups["image"], kind="zero"):
        generate_answers(loaded, batch)    # decoder-layer outputs zeroed at the image positions
    with RestoreHiddenStates(adapter, layer=3, masks=groups["last"], clean_states=clean[3]):
        model(**inputs)                    # layer 3's output at the last position set to clean

Kinds (`KINDS`): `gaussian` adds noise of std `scale * sigma` (sigma from `estimate_sigma`: the std of
the clean states over the group's positions, per layer); `mean` replaces each position of the group
by the mean of that sample's vectors over the group's positions; `zero` sets them to 0. Gaussian
noise is drawn on the CPU from a generator seeded by (`seed`, `noise_index`), one draw per sample
of shape (positions in the group, width): a sample gets the same noise whatever batch or padding it
comes in, so batched runs equal one-at-a-time runs.

Hidden-state interventions act only on a call whose (batch, length) equals their masks: during
generation with a KV cache the later one-token steps pass through untouched (their positions lie
outside the prompt masks).

Attention (hooks on the shared dispatcher, `vrp_eval.hooks.attention_hooks`):

    with attention_hooks(adapter, AttentionKnockout(range(4, 6), non_image, image)):
        generate_answers(loaded, batch)    # non-image queries may not read image keys in layers 4-5

`AttentionKnockout`, `AttentionMixUniform` (row mixed with the uniform distribution over the same
keys) and `AttentionLogitNoise` (Gaussian noise on the pre-softmax scores).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vrp_eval.adapters import GROUPS
from vrp_eval.hooks import AttentionHook, HookScope, hidden_of, with_hidden
from vrp_eval.options import DEFAULTS, NOISE_KINDS

KINDS = NOISE_KINDS
SITES = ("output", "input")
CALIBRATION_SAMPLES = DEFAULTS["n_calibration"]  # the probe option n_calibration
_SEED_STRIDE = 1_000_003


# --------------------------------------------------------------------------------------------------
# The functional core
# --------------------------------------------------------------------------------------------------
def check_kind(kind: str, scale: float, sigma: Any) -> None:
    """Validate an intervention kind at the boundary."""
    if kind not in KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "gaussian":
        if sigma is None:
            raise ValueError("gaussian noise needs sigma (the std of the clean states): "
                             "estimate it once per run with `estimate_sigma(loaded, batches)`")
        if not math.isfinite(float(scale)) or scale < 0:
            raise ValueError(f"noise scale must be a finite number >= 0, got {scale}")


def noise_generator(seed: int, noise_index: int = 0) -> torch.Generator:
    """The CPU generator of noise sample `noise_index` (0..K-1) of a run seeded with `seed`."""
    return torch.Generator().manual_seed(int(seed) * _SEED_STRIDE + int(noise_index))


def corrupt_states(states: torch.Tensor, mask: torch.Tensor, kind: str, *, scale: float = DEFAULTS["noise_scale"],
                   sigma: float | None = None, seed: int = 0, noise_index: int = 0) -> torch.Tensor:
    """A corrupted copy of `states` (B, T, D) at the positions `mask` (B, T) (see the module doc)."""
    mask = mask.to(states.device).bool()
    out = states.clone()
    if kind == "zero":
        out[mask] = 0
    elif kind == "mean":
        weights = mask.to(states.dtype).unsqueeze(-1)
        counts = weights.sum(1).clamp_min(1)
        means = (states * weights).sum(1) / counts  # (B, D)
        out = torch.where(mask.unsqueeze(-1), means.unsqueeze(1).to(states.dtype), states)
    else:
        std = float(scale) * float(sigma)
        for row in range(states.shape[0]):
            n = int(mask[row].sum())
            if n == 0:
                continue
            # A fresh generator per row: a sample's noise does not depend on its batch neighbours.
            noise = torch.randn(n, states.shape[-1], generator=noise_generator(seed, noise_index),
                                dtype=torch.float32)
            out[row, mask[row]] = states[row, mask[row]] + (std * noise).to(states.device, states.dtype)
    return out


def _sigma_at(sigma: Any, layer: int) -> float | None:
    if sigma is None:
        return None
    if isinstance(sigma, (int, float)):
        return float(sigma)
    return float(sigma[layer])


def _as_mask(masks: torch.Tensor, what: str) -> torch.Tensor:
    masks = torch.as_tensor(masks)
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(f"{what} must be a (batch, seq) bool tensor, got {tuple(masks.shape)} {masks.dtype}; "
                         "use adapter.position_groups(input_ids, attention_mask)[group]")
    return masks


# --------------------------------------------------------------------------------------------------
# Hidden-state interventions (hook scopes)
# --------------------------------------------------------------------------------------------------
class EmbeddingCorruption(HookScope):
    """Corrupt the embeddings entering the language model at `image_mask` (where the adapter says
    they enter: `adapter.hook_embeddings`). Calls of another shape (cached generation steps) pass
    through."""

    def __init__(self, adapter, image_mask: torch.Tensor, kind: str = DEFAULTS["noise"],
                 scale: float = DEFAULTS["noise_scale"], sigma: float | None = None, seed: int = 0,
                 noise_index: int = 0):
        super().__init__()
        check_kind(kind, scale, sigma)
        self.adapter = adapter
        self.mask = _as_mask(image_mask, "image_mask")
        self.kind, self.scale, self.sigma = kind, scale, sigma
        self.seed, self.noise_index = seed, noise_index
        self.calls = 0

    def _corrupt(self, embeds: torch.Tensor) -> torch.Tensor | None:
        if tuple(embeds.shape[:2]) != tuple(self.mask.shape):
            return None
        self.calls += 1
        return corrupt_states(embeds, self.mask, self.kind, scale=self.scale, sigma=self.sigma,
                              seed=self.seed, noise_index=self.noise_index)

    def _install(self) -> None:
        self.adapter.hook_embeddings(self, self._corrupt)


class HiddenStateIntervention(HookScope):
    """Noise or ablate decoder-layer hidden states at `masks` (B, T) in `layers`.

    site="output" (default) changes each layer's output; site="input" changes the states each layer
    reads (the previous layer's output, or the language model's embeddings for layer 0).
    sigma: one float, or a per-layer sequence/tensor indexed by decoder layer (for `gaussian`).
    Each layer draws its own noise (seeded by `seed` and the layer index). `mean` averages the states
    arriving in this run: at the first intervened layer these are the clean ones; a later layer of
    the same intervention sees states already ablated below it."""

    def __init__(self, adapter, layers: Iterable[int] | None, masks: torch.Tensor, kind: str = DEFAULTS["noise"],
                 scale: float = DEFAULTS["noise_scale"], sigma: Any = None, seed: int = 0, site: str = "output",
                 noise_index: int = 0):
        super().__init__()
        check_kind(kind, scale, sigma)
        if site not in SITES:
            raise ValueError(f"unknown site {site!r}; choose one of {', '.join(SITES)}")
        self.adapter = adapter
        self.layers = adapter.check_layers(layers)
        self.mask = _as_mask(masks, "masks")
        self.kind, self.scale, self.sigma, self.seed, self.site = kind, scale, sigma, seed, site
        self.noise_index = noise_index
        self.calls = 0

    def _corrupt(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        if tuple(hidden.shape[:2]) != tuple(self.mask.shape):
            return None  # a cached generation step: its positions are outside the prompt masks
        self.calls += 1
        return corrupt_states(hidden, self.mask, self.kind, scale=self.scale, sigma=_sigma_at(self.sigma, layer),
                              seed=self.seed * 7919 + layer, noise_index=self.noise_index)

    def _output_hook(self, layer: int):
        def hook(module, args, output):
            new = self._corrupt(layer, hidden_of(output))
            return None if new is None else with_hidden(output, new)
        return hook

    def _input_hook(self, layer: int):
        def hook(module, args, kwargs):
            if args:
                new = self._corrupt(layer, args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = self._corrupt(layer, kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return hook

    def _install(self) -> None:
        for layer in self.layers:
            module = self.adapter.decoder_layers[layer]
            if self.site == "output":
                self.on_output(module, self._output_hook(layer))
            else:
                self.on_input(module, self._input_hook(layer))


class RestoreHiddenStates(HookScope):
    """Replace decoder layer `layer`'s output at `masks` by `clean_states` (B, T, D)."""

    def __init__(self, adapter, layer: int, masks: torch.Tensor, clean_states: torch.Tensor):
        super().__init__()
        self.adapter = adapter
        self.layer = adapter.check_layers([layer])[0]
        self.mask = _as_mask(masks, "masks")
        if tuple(clean_states.shape[:2]) != tuple(self.mask.shape):
            raise ValueError(f"clean_states {tuple(clean_states.shape)} do not match masks {tuple(self.mask.shape)}")
        self.clean = clean_states

    def _hook(self, module, args, output):
        hidden = hidden_of(output)
        if tuple(hidden.shape[:2]) != tuple(self.mask.shape):
            return None
        mask = self.mask.to(hidden.device).unsqueeze(-1)
        return with_hidden(output, torch.where(mask, self.clean.to(hidden.device, hidden.dtype), hidden))

    def _install(self) -> None:
        self.on_output(self.adapter.decoder_layers[self.layer], self._hook)


# --------------------------------------------------------------------------------------------------
# Attention interventions (hooks on the shared dispatcher)
# --------------------------------------------------------------------------------------------------
def _layer_set(layers: Iterable[int] | None) -> frozenset[int] | None:
    return None if layers is None else frozenset(int(l) for l in layers)


def _allowed_keys(scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool (B|1, 1|H, Tq, Tk): keys a query may attend to under the model's own mask."""
    if attention_mask is None:
        return torch.ones((1, 1) + tuple(scores.shape[2:]), dtype=torch.bool, device=scores.device)
    mask = attention_mask[:, :, :, : scores.shape[-1]]
    return mask > torch.finfo(mask.dtype).min / 2


class AttentionKnockout(AttentionHook):
    """Queries of one group may not attend to keys of another, in `layers`.

    query_mask, key_mask: (B, T) bool over the prompt. Positions past the prompt (tokens generated
    with a KV cache) are queries when `generated_queries` is True (default: generated tokens are
    non-image queries) and never keys of the blocked group. A query whose every allowed key is
    blocked keeps its row unchanged (nothing left to attend to).

    row_layers: optional (B, num_layers) bool, the layers in which each sample is knocked out (rows
    of several windows stacked in one batch); the other samples of a layer keep plain SDPA
    (`AttentionHook.modified_rows`)."""

    modifies = True

    def __init__(self, layers: Iterable[int] | None, query_mask: torch.Tensor, key_mask: torch.Tensor,
                 generated_queries: bool = True, row_layers: torch.Tensor | None = None):
        self.layers = _layer_set(layers)
        self.query_mask = _as_mask(query_mask, "query_mask")
        self.key_mask = _as_mask(key_mask, "key_mask")
        if self.query_mask.shape != self.key_mask.shape:
            raise ValueError(f"query_mask {tuple(self.query_mask.shape)} and key_mask "
                             f"{tuple(self.key_mask.shape)} differ")
        if row_layers is not None:
            row_layers = torch.as_tensor(row_layers)
            if row_layers.ndim != 2 or row_layers.dtype != torch.bool or row_layers.shape[0] != self.query_mask.shape[0]:
                raise ValueError(f"row_layers must be a ({self.query_mask.shape[0]}, num_layers) bool tensor, got "
                                 f"{tuple(row_layers.shape)} {row_layers.dtype}")
        self.row_layers = row_layers
        self.generated_queries = generated_queries
        self.calls = 0

    def modified_rows(self, layer: int) -> torch.Tensor | None:
        return None if self.row_layers is None else self.row_layers[:, layer]

    def blocked(self, q_len: int, k_len: int, device, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Bool (B, 1, q_len, k_len): the knocked-out edges of a call (queries = the last q_len keys);
        with `rows` (bool (B,)) those samples' only."""
        query_mask, key_mask = self.query_mask, self.key_mask
        if rows is not None:
            query_mask, key_mask = query_mask[rows], key_mask[rows]
        batch, prompt = query_mask.shape
        if k_len < prompt:
            raise ValueError(f"attention over {k_len} keys but the masks cover a {prompt}-token prompt: "
                             "build the knockout from the batch that is run")
        extra = k_len - prompt
        queries = torch.cat([query_mask, torch.full((batch, extra), self.generated_queries)], 1)[:, k_len - q_len:]
        keys = torch.cat([key_mask, torch.zeros(batch, extra, dtype=torch.bool)], 1)
        return (queries[:, None, :, None] & keys[:, None, None, :]).to(device)

    def modify_scores(self, layer: int, scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        rows = self.modified_rows(layer)
        expected = self.query_mask.shape[0] if rows is None else int(rows.sum())
        if scores.shape[0] != expected:
            raise ValueError(f"attention for {scores.shape[0]} samples but the knockout masks hold {expected}")
        self.calls += 1
        blocked = self.blocked(scores.shape[2], scores.shape[3], scores.device, rows)
        allowed = _allowed_keys(scores, attention_mask)
        # Leave rows alone whose every allowed key would be blocked (a softmax over nothing).
        keep = (allowed & ~blocked).any(-1, keepdim=True)
        return scores.masked_fill(blocked & keep, torch.finfo(scores.dtype).min)


class AttentionMixUniform(AttentionHook):
    """Mix each attention row with the uniform distribution over the keys it may attend to:
    p' = (1 - alpha) p + alpha / n_allowed."""

    modifies = True

    def __init__(self, layers: Iterable[int] | None, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.layers = _layer_set(layers)
        self.alpha = float(alpha)
        self._allowed: dict[int, torch.Tensor] = {}

    def modify_scores(self, layer: int, scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self._allowed[layer] = _allowed_keys(scores, attention_mask)
        return scores

    def modify_probs(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        allowed = self._allowed.pop(layer).to(probs.dtype).expand_as(probs)
        uniform = allowed / allowed.sum(-1, keepdim=True).clamp_min(1)
        return (1 - self.alpha) * probs + self.alpha * uniform


class AttentionLogitNoise(AttentionHook):
    """Add Gaussian noise of std `std` to the pre-softmax scores of the allowed keys (seeded)."""

    modifies = True

    def __init__(self, layers: Iterable[int] | None, std: float, seed: int = 0):
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.layers = _layer_set(layers)
        self.std = float(std)
        self.generator = torch.Generator().manual_seed(int(seed))

    def modify_scores(self, layer: int, scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        noise = torch.randn(scores.shape, generator=self.generator, dtype=torch.float32)
        allowed = _allowed_keys(scores, attention_mask)
        return scores + (self.std * noise).to(scores.device, scores.dtype) * allowed


# --------------------------------------------------------------------------------------------------
# Noise scale
# --------------------------------------------------------------------------------------------------
@dataclass
class NoiseScale:
    """sigma: the std of the clean states over a group's positions (all elements pooled), per site.

    embedding[group]: the embeddings entering the language model; inputs[group][l]: what decoder
    layer l reads; outputs[group][l]: what it writes. Estimated on `n_samples` calibration samples."""

    embedding: dict[str, float]
    inputs: dict[str, list[float]]
    outputs: dict[str, list[float]]
    n_samples: int
    groups: tuple[str, ...] = field(default=GROUPS)

    def layers(self, group: str = "image", site: str = "output") -> torch.Tensor:
        """Per-layer sigma (L,) of `group` at `site` ("output" or "input")."""
        table = self.outputs if site == "output" else self.inputs
        return torch.tensor(table[group], dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"embedding": self.embedding, "inputs": self.inputs, "outputs": self.outputs,
                "n_samples": self.n_samples}


class _Moments:
    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.squares = 0.0

    def add(self, values: torch.Tensor) -> None:
        values = values.double()
        self.n += values.numel()
        self.total += float(values.sum())
        self.squares += float((values * values).sum())

    def std(self) -> float:
        if self.n < 2:
            return float("nan")
        mean = self.total / self.n
        return math.sqrt(max(self.squares / self.n - mean * mean, 0.0) * self.n / (self.n - 1))


@torch.no_grad()
def estimate_sigma(loaded, batches: Any, max_samples: int = CALIBRATION_SAMPLES,
                   groups: Sequence[str] = GROUPS) -> NoiseScale:
    """sigma per group at the embedding level and at every decoder layer's input and output, from
    the clean states of up to `max_samples` samples of `batches` (an encoded batch or an iterable of
    them). One forward pass per batch."""
    adapter = loaded.adapter
    if isinstance(batches, dict) or hasattr(batches, "convert_to_tensors"):
        batches = [batches]
    num_layers = adapter.num_layers
    embedding = {g: _Moments() for g in groups}
    inputs = {g: [_Moments() for _ in range(num_layers)] for g in groups}
    outputs = {g: [_Moments() for _ in range(num_layers)] for g in groups}
    seen = 0
    for batch in batches:
        if seen >= max_samples:
            break
        take = min(batch["input_ids"].shape[0], max_samples - seen)
        masks = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
        masks = {g: masks[g][:take].to(loaded.device) for g in groups}
        shape = tuple(batch["input_ids"].shape)

        def add(table, hidden, shape=shape, take=take, masks=masks):
            if tuple(hidden.shape[:2]) != shape:
                return
            for g in groups:
                table[g].add(hidden[:take][masks[g]])

        def input_hook(layer):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                add({g: inputs[g][layer] for g in groups}, hidden)
            return hook

        def output_hook(layer):
            def hook(module, args, output):
                add({g: outputs[g][layer] for g in groups}, hidden_of(output))
            return hook

        with HookScope() as scope:
            adapter.hook_embeddings(scope, lambda embeds, add=add: add(embedding, embeds))
            for i, layer in enumerate(adapter.decoder_layers):
                scope.on_input(layer, input_hook(i))
                scope.on_output(layer, output_hook(i))
            loaded.model(**loaded.model_inputs(batch), use_cache=False, logits_to_keep=1)
        seen += take
    if seen == 0:
        raise ValueError("estimate_sigma got no samples: pass at least one encoded batch")
    return NoiseScale(
        embedding={g: embedding[g].std() for g in groups},
        inputs={g: [m.std() for m in inputs[g]] for g in groups},
        outputs={g: [m.std() for m in outputs[g]] for g in groups},
        n_samples=seen, groups=tuple(groups),
    )
