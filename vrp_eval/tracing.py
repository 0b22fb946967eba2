"""Causal tracing (clean / corrupted / restored), the knockout circuit and the circuit-corrupted runs
(SPEC section 2).

Per sample, `trace_batch` measures
    p_clean      probability of the clean greedy answer's first token at the last prompt position;
    p_corrupted  the same with the image-token embeddings entering the language model corrupted
                 (mean over K noise samples);
    ie[G][l]     p_restored(l, G) - p_corrupted, where the restored run is the corrupted run with decoder
                 layer l's output at the positions of group G (image / text / last) set to its clean
                 value (mean over the K noise samples).

The restoration sweep recomputes only what a restoration can change. One clean prompt pass (in a run
the answer's own, recorded by `CleanCapture` while it generates; `clean_run` makes one alone) records each decoder layer's call (its keyword
arguments: attention mask, rotary embeddings, ...), output and keys/values; the corrupted run
replays the decoder layers from the corrupted embeddings, recording each layer's output and
keys/values. Restoring layer l leaves layers 0..l untouched, so the restored run only replays
layers l+1..L-1, and restorations are batched as a staircase: the rows of every traced layer of a
group ride in one batch, and the row restored at layer l joins when the replay reaches layer l+1.
In a causal decoder a position reads only itself and earlier ones, so:
- the positions before the first image token never see the corruption: the corrupted run replays
  from the first image position over the clean run's keys/values, and restoring them is a no-op;
- restoring *every* image position at layer l makes every position up to the image's end clean at
  layer l and so at every later layer: the image group replays only the prompt's tail after the
  image, over the clean run's keys/values (`text` and `last` replay from their first position after
  the image, over the corrupted run's);
- rows whose tails are about as long share a replay batch (`BUCKET_SLACK`), so the work per sample
  is within a few percent of 1 + K [n/T + (L-1)/2 (2 n_tail + 1)/T] forward passes (n positions from
  the image on, n_tail after it; benchmarks/bench_tracing.py).
PaliGemma's prefix attends bidirectionally (`adapter.bidirectional_prefix`), so there every replay
covers all positions. Only the last position goes through the final norm and the LM head. The
replay calls the model's own decoder-layer modules, so nothing of a family's forward is rewritten.
`TraceResult.cost` counts the work in full forward-pass equivalents per sample.

Circuit (the largest-IE window is ill-posed: restoration IE is flat before information leaves a group
and after it arrives, SPEC 2): `knockout_answers` blocks attention from every non-image query to the
image keys inside a window of layers and answers again (`knockout_answers_per_window`: every window
in one generation, a block of rows per window); `choose_circuit` takes the window with the
largest accuracy drop on the discovery half; `corrupted_answers` corrupts the image-position hidden
states read by the window's layers and answers again (held-out half: the circuit and the
`control_window`). `integration_layer` is the crossover of the mean IE curves.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vrp_eval.adapters import GROUPS
from vrp_eval.generation import AnswerOutput, generate_answers
from vrp_eval.hooks import (
    IMPLEMENTATION,
    AttentionHook,
    HookScope,
    attention_hooks,
    hidden_of,
)
from vrp_eval.intervention import (  # noqa: F401  (estimate_sigma is part of this module's API)
    AttentionKnockout,
    EmbeddingCorruption,
    HiddenStateIntervention,
    NoiseScale,
    check_kind,
    estimate_sigma,
)
from vrp_eval.options import DEFAULTS

TRACE_GROUPS = ("image", "text", "last")
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


@dataclass
class TraceSettings:
    """How to trace. layers: decoder layers to restore (None = all; the others get NaN IE)."""

    layers: Sequence[int] | None = None
    groups: tuple[str, ...] = TRACE_GROUPS
    kind: str = DEFAULTS["noise"]
    scale: float = DEFAULTS["noise_scale"]
    n_noise: int = DEFAULTS["n_noise"]
    seed: int = DEFAULTS["seed"]
    # Restored rows per replay batch. None: 16 on the CPU, where small batches stay in cache (64 rows
    # were 1.6x slower on the 24-layer benchmark model), 256 on an accelerator.
    max_rows: int | None = None

    def noise_samples(self) -> int:
        """K: deterministic kinds (mean, zero) need one sample."""
        return max(1, int(self.n_noise)) if self.kind == "gaussian" else 1


@dataclass
class TraceCost:
    """Work per sample, in full forward-pass equivalents of the language model's decoder layers
    (a layer evaluated on a fraction f of the positions counts f / L)."""

    forward_passes: float
    naive_forward_passes: int

    def to_dict(self) -> dict[str, float]:
        return {"forward_passes": self.forward_passes, "naive_forward_passes": self.naive_forward_passes}


@dataclass
class TraceResult:
    target_id: int
    p_clean: float
    p_corrupted: float
    ie: dict[str, list[float]]
    p_corrupted_samples: list[float] = field(default_factory=list)
    cost: TraceCost | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"target_id": self.target_id, "p_clean": self.p_clean, "p_corrupted": self.p_corrupted,
                "ie": self.ie, "p_corrupted_samples": self.p_corrupted_samples,
                "cost": self.cost.to_dict() if self.cost else None}


# --------------------------------------------------------------------------------------------------
# Capturing and replaying decoder layers
# --------------------------------------------------------------------------------------------------
class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _join(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """prefix (N, H, P, D) before states (blocks * N, H, S, D) along the positions, the prefix shared
    by every block: one copy (a repeat then a concatenation would copy the prefix twice)."""
    n = prefix.shape[0]
    out = states.new_empty(states.shape[0], states.shape[1], prefix.shape[2] + states.shape[2], states.shape[3])
    out.view(-1, n, *out.shape[1:])[:, :, :, :prefix.shape[2]] = prefix
    out[:, :, prefix.shape[2]:] = states
    return out


class _ReplayCache:
    """Stands in for a transformers Cache inside one decoder-layer call: prepends the keys/values of
    the skipped prefix positions (shared by the stacked blocks of the batch) and/or records the
    call's keys/values."""

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None, record: dict | None = None):
        self.prefix = prefix
        self.record = record

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.prefix is not None:
            prefix_k, prefix_v = self.prefix
            key_states, value_states = _join(prefix_k, key_states), _join(prefix_v, value_states)
        if self.record is not None:  # every position's keys/values, the prefix's included
            self.record[layer_idx] = (key_states, value_states)
        return key_states, value_states


def _repeat(x: torch.Tensor, dim: int, blocks: int) -> torch.Tensor:
    if blocks == 1:
        return x
    reps = [1] * x.ndim
    reps[dim] = blocks
    return x.repeat(*reps)


class _Replay:
    """Re-runs single decoder layers with the keyword arguments recorded in the clean run, on
    `blocks` stacked copies of the batch and on the positions t0..T-1 only."""

    def __init__(self, adapter, calls: list[tuple[tuple, dict]], batch: int, length: int):
        self.adapter = adapter
        self.layers = adapter.decoder_layers
        self.calls = calls
        self.batch, self.length = batch, length
        self.cache_key = next((k for k in _CACHE_KWARGS if k in calls[0][1]), None)
        self.causal = not adapter.bidirectional_prefix
        known = {"attention_mask", "position_embeddings", "position_ids", "cache_position", *_CACHE_KWARGS}
        unknown = [k for args, kw in calls for k, v in kw.items() if torch.is_tensor(v) and k not in known]
        # Skipping a prefix needs the keys/values of the skipped positions and knowing how to slice
        # every positional argument.
        self.can_skip_prefix = self.causal and self.cache_key is not None and not unknown and not any(
            args for args, _ in calls)
        self.layer_evaluations = 0.0  # per sample, in full-length layer evaluations

    def _batch_dim(self, x: torch.Tensor) -> int | None:
        dim = self.adapter.batch_dim(x)
        return dim if x.shape[dim] == self.batch else None

    def _expand(self, x: torch.Tensor, blocks: int) -> torch.Tensor:
        dim = self._batch_dim(x)
        return x if dim is None else _repeat(x, dim, blocks)

    def kwargs(self, layer: int, blocks: int, t0: int, device: torch.device) -> dict[str, Any]:
        kwargs = dict(self.calls[layer][1])
        for name, value in kwargs.items():
            if name == "attention_mask":
                if value is None:
                    if t0 > 0:  # SDPA's implicit causal mask would align a shorter query block wrongly
                        queries = torch.arange(t0, self.length, device=device)[:, None]
                        kwargs[name] = (torch.arange(self.length, device=device)[None, :] <= queries)[None, None]
                    continue
                kwargs[name] = self._expand(value[:, :, t0:], blocks)
            elif name == "position_embeddings" and value is not None:
                kwargs[name] = tuple(self._expand(v[..., t0:, :], blocks) for v in value)
            elif name in ("position_ids", "cache_position") and torch.is_tensor(value):
                kwargs[name] = self._expand(value[..., t0:], blocks)
            elif torch.is_tensor(value):
                kwargs[name] = self._expand(value, blocks)
        return kwargs

    def select(self, rows: torch.Tensor) -> _Replay:
        """The replay of the batch's rows `rows` alone (its own work counter, per sample of those rows)."""
        def pick(value):
            if torch.is_tensor(value):
                dim = self._batch_dim(value)
                return value if dim is None else value.index_select(dim, rows)
            if isinstance(value, tuple):
                return tuple(pick(v) for v in value)
            return value

        calls = [(tuple(pick(a) for a in args), {k: pick(v) for k, v in kwargs.items()}) for args, kwargs in self.calls]
        return _Replay(self.adapter, calls, len(rows), self.length)

    def run(self, layer: int, hidden: torch.Tensor, t0: int = 0,
            prefix: tuple[torch.Tensor, torch.Tensor] | None = None, record: dict | None = None) -> torch.Tensor:
        blocks = hidden.shape[0] // self.batch
        kwargs = self.kwargs(layer, blocks, t0, hidden.device)
        if self.cache_key is not None:
            kwargs[self.cache_key] = _ReplayCache(prefix, record)
        self.layer_evaluations += blocks * (self.length - t0) / self.length
        return hidden_of(self.layers[layer](hidden, **kwargs))


def _prob_dtype(loaded) -> torch.dtype:
    """The dtype of the traced probabilities: bf16/fp16 models -> fp32; fp64 stays."""
    return torch.promote_types(loaded.model.dtype, torch.float32)


def _head_probs(loaded, hidden_last: torch.Tensor) -> torch.Tensor:
    """Next-token probabilities (N, V) from final-layer states (N, D) at the last position."""
    return loaded.adapter.head_logits(hidden_last, _prob_dtype(loaded)).softmax(-1)


class _RecordingCache:
    """A transformers Cache seen through the prompt pass's decoder-layer call: updates go to the real
    cache (a generation goes on with it) and the prompt positions' keys/values are recorded."""

    def __init__(self, inner, record: dict):
        self.inner, self.record = inner, record

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        full = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        # The prompt pass fills an empty cache: its positions are the first key_states.shape[-2] (a
        # static cache returns its whole preallocated length). A dynamic layer returns a fresh tensor
        # at every step; any other (a static layer writes in place, and a later generation resets
        # it) is copied.
        n = key_states.shape[-2]
        keys, values = full[0][..., :n, :], full[1][..., :n, :]
        if not _fresh_every_step(self.inner, layer_idx):
            keys, values = keys.clone(), values.clone()
        self.record[layer_idx] = (keys, values)
        return full

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copy, pickle): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.inner, name)


def _attn_implementation(module) -> str | None:
    """The attention implementation a transformers module runs (None for a module without a config)."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None)


def _fresh_every_step(cache, layer_idx: int) -> bool:
    """Whether `cache`'s layer returns a new tensor from each update (transformers' dynamic layers
    concatenate), so a kept reference is never written into."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return False
    return type(layers[layer_idx]) in (DynamicLayer, DynamicSlidingWindowLayer)


class CleanCapture(HookScope):
    """Records the clean prompt pass of an encoded batch while the model runs it for something else:
    inside the block, the first call of the language model and of each decoder layer is recorded (a
    `generate` call's prefill; its one-token decoding steps are not), so the answer's own prompt pass
    is the one clean pass that the trace, the logit lens and the probing features read. The recorded
    calls keep no cache (the replay brings its own; the language model's call also gets
    use_cache=False), a static cache's unused key columns are cut from the masks, and the attention
    implementation in force is noted, so that the replay reads the masks as they were built
    (`CleanRun.replaying`). After the block, `run` is the `CleanRun`.

        with CleanCapture(loaded, batch) as capture, attention_hooks(adapter, recorder):
            answers = generate_answers(loaded, batch)
        clean = capture.run

    kv: record each layer's keys/values (default: in a causal decoder, where the trace replays over
    them). last_only: keep only each layer's state at each sample's last prompt position (what the
    logit lens and the probing features read: `last_position_states()`), not the whole pass, whose
    every state of every layer a 7B model holds in gigabytes; there is then no `run`.
    """

    def __init__(self, loaded, batch=None, *, kv: bool | None = None, last_only: bool = False):
        super().__init__()
        self.loaded, self.batch, self.last_only = loaded, batch, last_only
        adapter = loaded.adapter
        record_kv = (not adapter.bidirectional_prefix) if kv is None else kv
        self.kv: dict | None = {} if record_kv and not last_only else None
        self.lm_call: dict[str, Any] = {}
        self.calls: list[Any] = [None] * adapter.num_layers
        self.outputs: list[Any] = [None] * adapter.num_layers
        self.attn_implementation: str | None = None
        self.last = None
        if batch is not None:
            groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
            self.last = groups["last"].int().argmax(1).to(loaded.device)
        elif last_only:
            raise ValueError("CleanCapture(last_only=True) needs the batch, to know each sample's last position")

    def _install(self) -> None:
        adapter, kv, calls, outputs = self.loaded.adapter, self.kv, self.calls, self.outputs
        if self.last_only:
            rows = torch.arange(self.last.shape[0], device=self.last.device)

            def keep_last(index):
                def hook(module, args, output):
                    if outputs[index] is None:
                        hidden = self._whole(index, hidden_of(output))
                        outputs[index] = hidden[rows.to(hidden.device), self.last.to(hidden.device)]
                return hook

            for i, layer in enumerate(adapter.decoder_layers):
                self.on_output(layer, keep_last(i))
            return

        def lm_hook(module, args, kwargs):
            if "call" not in self.lm_call:
                # The replay must read the recorded masks as they were built (the attention hooks'
                # implementation builds SDPA's boolean masks; eager adds float ones).
                self.attn_implementation = _attn_implementation(module)
                kept = dict(kwargs)
                for name in _CACHE_KWARGS:
                    if name in kept:
                        kept[name] = None
                if "use_cache" in kept:
                    kept["use_cache"] = False
                self.lm_call["call"] = (args, kept)

        def pre_hook(index):
            def hook(module, args, kwargs):
                if calls[index] is not None:
                    return None  # a decoding step after the prompt pass
                cache_key = next((k for k in _CACHE_KWARGS if k in kwargs), None)
                kept = {**kwargs, cache_key: None} if cache_key else dict(kwargs)
                mask, hidden = kept.get("attention_mask"), args[0] if args else kwargs.get("hidden_states")
                if torch.is_tensor(mask) and mask.ndim == 4 and hidden is not None and mask.shape[-1] > hidden.shape[1]:
                    kept["attention_mask"] = mask[..., :hidden.shape[1]]  # a static cache's unused keys
                calls[index] = (tuple(args[1:]), kept)
                if kv is None or cache_key is None:
                    return None
                inner = kwargs[cache_key]
                cache = _ReplayCache(record=kv) if inner is None else _RecordingCache(inner, kv)
                return args, {**kwargs, cache_key: cache}
            return hook

        def out_hook(index):
            def hook(module, args, output):
                if outputs[index] is None:
                    outputs[index] = self._whole(index, hidden_of(output))
            return hook

        self.on_input(adapter.language_model, lm_hook)
        for i, layer in enumerate(adapter.decoder_layers):
            self.on_input(layer, pre_hook(i))
            self.on_output(layer, out_hook(i))

    def _whole(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden`, checked to be the whole prompt pass of the batch."""
        if self.batch is not None and tuple(hidden.shape[:2]) != tuple(self.batch["input_ids"].shape):
            raise ValueError(
                f"decoder layer {layer} first ran on {tuple(hidden.shape[:2])} (batch, positions), not the batch's "
                f"{tuple(self.batch['input_ids'].shape)}: the prompt pass must be recorded whole (a chunked prefill, "
                "generation_config.prefill_chunk_size, splits it: unset it)")
        return hidden

    def calls_made(self):
        """(language-model call, decoder-layer calls, decoder-layer outputs) of the recorded pass."""
        if "call" not in self.lm_call or any(c is None for c in self.calls) or any(o is None for o in self.outputs):
            raise RuntimeError("the clean forward pass did not run every decoder layer of "
                               f"{type(self.loaded.adapter.language_model).__name__}: cannot trace this model")
        return self.lm_call["call"], self.calls, self.outputs

    @property
    def run(self) -> CleanRun:
        if self.last_only:
            raise ValueError("CleanCapture(last_only=True) keeps the last positions only: no CleanRun to trace")
        lm_call, calls, outputs = self.calls_made()
        if self.batch is None:
            raise ValueError("CleanCapture(loaded) without a batch records calls only; give the batch for a CleanRun")
        if outputs[0].shape[0] != self.last.shape[0] or outputs[0].shape[1] != self.batch["input_ids"].shape[1]:
            raise ValueError(f"the recorded prompt pass has {tuple(outputs[0].shape[:2])} (batch, positions), the "
                             f"batch {tuple(self.batch['input_ids'].shape)}: record the batch the model runs")
        return CleanRun(lm_call, calls, outputs, self.kv, self.last, from_answer=True,
                        attn_implementation=self.attn_implementation)

    def last_position_states(self) -> torch.Tensor:
        """(B, L, d): every decoder layer's output at each sample's last prompt position."""
        if not self.last_only:
            return self.run.last_position_states()
        if any(o is None for o in self.outputs):
            raise RuntimeError("the prompt pass did not run every decoder layer of "
                               f"{type(self.loaded.adapter.language_model).__name__}")
        return torch.stack(self.outputs, dim=1)


@torch.no_grad()
def _clean_capture(loaded, inputs: dict[str, Any], kv: bool = False):
    """The clean forward of its own: the language model's call, each decoder layer's call
    (positional args after the hidden states, keyword args) and output; with `kv`, each layer's
    keys/values too (returned fourth), the prefix a replay over later positions attends to."""
    with CleanCapture(loaded, kv=kv) as capture:
        loaded.model(**inputs, use_cache=False, logits_to_keep=1)
    return (*capture.calls_made(), capture.kv)


@dataclass
class CleanRun:
    """The clean prompt pass of an encoded batch as the trace records it: the language model's call,
    each decoder layer's call and output, and (causal decoders) each layer's keys/values. Made by
    `clean_run` (a forward of its own) or by `CleanCapture` around the answer's generation
    (`from_answer`: the answer's prefill, which the trace then does not count as its work);
    `trace_batch(clean=...)`, the proxy and the logit lens / probing features
    (`last_position_states`) share it, so a batch needs one clean pass for all of them."""

    lm_call: Any
    calls: list
    outputs: list[torch.Tensor]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None
    last: torch.Tensor  # (B,) each sample's last prompt position
    from_answer: bool = False
    attn_implementation: str | None = None  # the language model's, when the pass was recorded

    def replaying(self, adapter):
        """A scope in which replaying the recorded calls reads their attention masks as the pass
        built them: a pass recorded under attention hooks (SDPA's masks) replays through the same
        dispatcher, with no hook, whatever the model's own implementation is."""
        current = _attn_implementation(adapter.language_model)
        if self.attn_implementation == IMPLEMENTATION and current not in (None, IMPLEMENTATION):
            return attention_hooks(adapter)
        return nullcontext()

    def last_position_states(self) -> torch.Tensor:
        """(B, L, d): every decoder layer's output at each sample's last prompt position (what
        `companions.last_position_states` computes with a forward of its own)."""
        rows = torch.arange(self.last.shape[0], device=self.last.device)
        return torch.stack([output[rows, self.last] for output in self.outputs], dim=1)


@torch.no_grad()
def clean_run(loaded, batch) -> CleanRun:
    """The clean prompt pass of `batch` (an encoded batch), recorded for `trace_batch`: a forward of
    its own (`CleanCapture` records the one a generation already makes)."""
    adapter = loaded.adapter
    lm_call, calls, outputs, kv = _clean_capture(loaded, loaded.model_inputs(batch), kv=not adapter.bidirectional_prefix)
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    return CleanRun(lm_call, calls, outputs, kv, groups["last"].int().argmax(1).to(loaded.device),
                    attn_implementation=_attn_implementation(adapter.language_model))


@torch.no_grad()
def _corrupted_layer0_input(adapter, lm_call, corruption: EmbeddingCorruption) -> torch.Tensor:
    """What decoder layer 0 reads when the language model gets the corrupted embeddings (the
    language model's own preprocessing, such as Gemma's embedding scale, applies)."""
    def stop(module, args, kwargs):
        raise _Stop(args[0] if args else kwargs["hidden_states"])

    try:
        with HookScope() as scope, corruption:
            scope.on_input(adapter.decoder_layers[0], stop)
            adapter.language_model(*lm_call[0], **lm_call[1])
    except _Stop as stopped:
        return stopped.hidden
    raise RuntimeError("the language model never reached its first decoder layer")


def _check_groups(groups: Sequence[str]) -> None:
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown position groups {bad}; choose from image, text, last, all")


# --------------------------------------------------------------------------------------------------
# Causal tracing
# --------------------------------------------------------------------------------------------------
def _trace_inputs(loaded, batch, target_ids: Sequence[int], settings: TraceSettings | None, sigma):
    """The checks every tracer (exact or proxy) makes of its inputs, and what it reads of them:
    (settings, traced layers, position-group masks on the device, target ids on the device)."""
    settings = settings or TraceSettings()
    _check_groups(settings.groups)
    check_kind(settings.kind, settings.scale, sigma)
    n_rows = batch["input_ids"].shape[0]
    if len(target_ids) != n_rows:
        raise ValueError(f"{len(target_ids)} target ids for a batch of {n_rows} samples")
    traced = loaded.adapter.check_layers(settings.layers)
    groups = loaded.adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    masks = {g: m.to(loaded.device) for g, m in groups.items()}
    return settings, traced, masks, torch.as_tensor([int(t) for t in target_ids], device=loaded.device)


@torch.no_grad()
def trace_batch(loaded, batch, target_ids: Sequence[int], settings: TraceSettings | None = None,
                sigma: NoiseScale | None = None, *, clean: CleanRun | None = None,
                _from_image: bool = False) -> list[TraceResult]:
    """Clean, corrupted and restored runs of an encoded batch; one `TraceResult` per sample.

    target_ids: per sample, the token whose probability is traced (the clean greedy answer's first
    token). sigma: from `estimate_sigma` (needed for `gaussian`; its `embedding["image"]` scales the
    embedding noise). clean: the batch's `CleanRun` when the caller has it (`CleanCapture` around the
    answer's generation, or `clean_run`); else the trace makes it. `_from_image`: the engine of
    2026-12-01 (every replay starts at the first image position, over the corrupted run's
    keys/values), kept for benchmarks/bench_tracing.py."""
    settings, traced, masks, targets = _trace_inputs(loaded, batch, target_ids, settings, sigma)
    clean = clean or clean_run(loaded, batch)
    with clean.replaying(loaded.adapter):
        return _trace(loaded, settings, traced, masks, targets, sigma, clean, _from_image)


def _trace(loaded, settings: TraceSettings, traced, masks, targets, sigma: NoiseScale | None, clean: CleanRun,
           _from_image: bool) -> list[TraceResult]:
    adapter = loaded.adapter
    num_layers = adapter.num_layers
    n_rows, device = len(targets), loaded.device
    length = masks["all"].shape[1]
    rows = torch.arange(n_rows, device=device)
    last = masks["last"].int().argmax(1)

    lm_call, calls, clean_out = clean.lm_call, clean.calls, clean.outputs
    clean_kv = None if _from_image else clean.kv
    replay = _Replay(adapter, calls, n_rows, length)
    p_clean = _head_probs(loaded, clean_out[-1][rows, last])[rows, targets]

    # In a causal decoder a position before a row's first image token never sees the corruption: its
    # corrupted states are the clean ones, so the corrupted run replays from the first image position
    # over the clean run's keys/values. What each group's restored replay can skip: see _plan.
    columns = torch.arange(length, device=device)
    corrupted_from = 0
    if replay.can_skip_prefix:
        image_start = torch.where(masks["image"], columns, length).amin(1)
        if clean_kv:
            corrupted_from = min(int(image_start.min()), int(last.min()))
        plans = {g: _plan(masks[g], image_start, columns, settle=bool(clean_kv)) for g in settings.groups}
    else:
        everyone = list(range(n_rows))
        plans = {g: _Plan([_Bucket(everyone, 0, "none")] if masks[g].any() else [], torch.zeros_like(last))
                 for g in settings.groups}
    need_kv = any(b.prefix == "corrupted" for plan in plans.values() for b in plan.buckets)
    # A bucket of some rows replays alone: its own slice of every layer's call, made once.
    replays = {(g, i): (replay if b.rows == list(range(n_rows)) else replay.select(torch.tensor(b.rows, device=device)))
               for g, plan in plans.items() for i, b in enumerate(plan.buckets)}

    max_rows = settings.max_rows or (16 if device.type == "cpu" else 256)
    embed_sigma = sigma.embedding["image"] if sigma is not None else None
    n_noise = settings.noise_samples()
    prob_dtype = _prob_dtype(loaded)
    p_corrupted = torch.zeros(n_noise, n_rows, device=device, dtype=prob_dtype)
    p_restored = {g: torch.full((n_noise, num_layers, n_rows), float("nan"), device=device, dtype=prob_dtype)
                  for g in settings.groups}
    for k in range(n_noise):
        corruption = EmbeddingCorruption(adapter, masks["image"], settings.kind, settings.scale, embed_sigma,
                                         seed=settings.seed, noise_index=k)
        hidden = _corrupted_layer0_input(adapter, lm_call, corruption)[:, corrupted_from:]
        kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if need_kv else None
        corrupted_out = []
        for layer in range(num_layers):
            prefix = _prefix(clean_kv, layer, corrupted_from) if corrupted_from else None
            hidden = replay.run(layer, hidden, t0=corrupted_from, prefix=prefix, record=kv)
            corrupted_out.append(hidden)
        p_corrupted[k] = _head_probs(loaded, hidden[rows, last - corrupted_from])[rows, targets]
        for group in settings.groups:
            plan = plans[group]
            # Rows no bucket replays: their restored run is their clean run or their corrupted run.
            p_restored[group][k, traced] = torch.where(plan.settled > last, p_clean, p_corrupted[k])
            for i, bucket in enumerate(plan.buckets):
                _restore_staircase(loaded, replays[group, i], rows=bucket.rows, group_mask=masks[group],
                                   traced=traced, t0=bucket.start, clean_out=clean_out, corrupted_out=corrupted_out,
                                   corrupted_from=corrupted_from,
                                   kv={"clean": clean_kv, "corrupted": kv, "none": None}[bucket.prefix],
                                   last=last, targets=targets, max_rows=max_rows, into=p_restored[group][k])

    ie = {g: (p_restored[g] - p_corrupted[:, None, :]).mean(0) for g in settings.groups}  # (L, B)
    # 1 clean forward (none when it was the answer's prefill) + per noise sample the corrupted replay
    # (L layers) + the restorations.
    evaluations = replay.layer_evaluations + sum(
        r.layer_evaluations * r.batch / n_rows for r in replays.values() if r is not replay)
    passes = (0 if clean.from_answer else 1) + evaluations / num_layers
    naive = 1 + n_noise * (1 + len(settings.groups) * len(traced))
    cost = TraceCost(forward_passes=float(passes), naive_forward_passes=naive)
    results = []
    for row in range(n_rows):
        results.append(TraceResult(
            target_id=int(targets[row]), p_clean=float(p_clean[row]),
            p_corrupted=float(p_corrupted[:, row].mean()),
            ie={g: [float(v) for v in ie[g][:, row]] for g in settings.groups},
            p_corrupted_samples=[float(v) for v in p_corrupted[:, row]], cost=cost,
        ))
    return results


#: Rows whose restored replays start at different positions share a replay batch only while the
#: longer replay covers at most this many times the positions of the shorter (the rest is waste).
BUCKET_SLACK = 1.1


@dataclass
class _Bucket:
    """Rows of the batch restored in one replay: from position `start`, over the keys/values of the
    positions before it from the clean run ("clean"), the corrupted run ("corrupted") or none."""

    rows: list[int]
    start: int
    prefix: str


@dataclass
class _Plan:
    """A group's restored replays. settled: per row, the leading positions that equal the clean run
    at every layer after the restoration; a row in no bucket is its clean run where they cover its
    last position, its corrupted run otherwise."""

    buckets: list[_Bucket]
    settled: torch.Tensor


def _plan(group_mask: torch.Tensor, image_start: torch.Tensor, columns: torch.Tensor, settle: bool) -> _Plan:
    """The restored replays of one group in a causal decoder. Positions before a row's first image
    token are clean in the corrupted run, so restoring them changes nothing: a row's replay starts
    at its first group position after that, over the corrupted run's keys/values. Restoring layer
    l's output at a run of positions that starts at the first image token and covers every position
    up to p (the whole image, for the image group) makes positions 0..p clean at layer l; a causal
    decoder's position reads only itself and earlier ones, so they stay clean at every later layer
    and need no replay: the row's replay covers the tail after them, over the clean run's
    keys/values. Exact only when the restored positions reach back to the corruption (all image
    positions of a row, never a subset) and the positions before it are untouched
    (`bidirectional_prefix` off). Rows whose tails are about as long share a bucket. With `settle`
    off, only the untouched prefix is skipped and all rows ride in one bucket (the 2026-12-01 engine)."""
    length = group_mask.shape[1]
    before = columns < image_start[:, None]
    first_changed = torch.where(group_mask & ~before, columns, length).amin(1)
    untouched = torch.minimum(image_start, first_changed)
    settled = (group_mask | before).int().cumprod(1).sum(1) if settle else untouched
    clean = settled > untouched  # the restoration settles positions the corruption reached
    starts = torch.where(first_changed < length, torch.where(clean, settled, first_changed), length)
    replayed = [(bool(c), int(s), row) for row, (c, s) in enumerate(zip(clean.tolist(), starts.tolist())) if s < length]
    if not settle:
        rows = list(range(len(starts)))
        start = min((s for _, s, _ in replayed), default=length)
        buckets = [_Bucket(rows, start, "corrupted" if start > 0 else "none")] if replayed else []
        return _Plan(buckets, settled)
    buckets: list[_Bucket] = []
    for is_clean, start, row in sorted(replayed):
        prefix = ("clean" if is_clean else "corrupted") if start > 0 else "none"
        head = buckets[-1] if buckets else None
        if head is not None and head.prefix == prefix and length - head.start <= BUCKET_SLACK * (length - start):
            head.rows.append(row)
        else:
            buckets.append(_Bucket([row], start, prefix))
    for bucket in buckets:
        bucket.rows.sort()  # the batch's own order: a bucket of every row replays the batch as it is
    return _Plan(buckets, settled)


def _prefix(kv: dict, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    key, value = kv[layer]
    return key[:, :, :end], value[:, :, :end]


def _restore_staircase(loaded, replay: _Replay, *, rows: list[int], group_mask, traced, t0, clean_out,
                       corrupted_out, corrupted_from, kv, last, targets, max_rows, into) -> None:
    """p_restored of every traced layer for one group and the batch's rows `rows` (replayed by
    `replay`); writes into[layer, row]. corrupted_out holds the corrupted run's layer outputs from
    position `corrupted_from` on; kv the keys/values the replay attends to before position t0."""
    num_layers = len(clean_out)
    index = None if rows == list(range(group_mask.shape[0])) else torch.tensor(rows, device=group_mask.device)

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x if index is None else x[index]

    n_rows = len(rows)
    where = pick(group_mask[:, t0:, None])
    last_local, targets = pick(last) - t0, pick(targets)
    row_index = torch.tensor(rows, device=group_mask.device)
    per_chunk = max(1, max_rows // n_rows)
    for begin in range(0, len(traced), per_chunk):
        chunk = traced[begin:begin + per_chunk]
        joined: list[int] = []
        state: torch.Tensor | None = None
        for layer in range(chunk[0], num_layers):
            if layer in chunk:
                patched = torch.where(where, pick(clean_out[layer][:, t0:]),
                                      pick(corrupted_out[layer][:, t0 - corrupted_from:]))
                state = patched if state is None else torch.cat([state, patched])
                joined.append(layer)
            if layer + 1 < num_layers:
                prefix = tuple(pick(x) for x in _prefix(kv, layer + 1, t0)) if t0 > 0 else None
                state = replay.run(layer + 1, state, t0=t0, prefix=prefix)
        blocks = len(joined)
        flat = torch.arange(blocks * n_rows, device=state.device)
        final = state[flat, last_local.repeat(blocks)]
        probs = _head_probs(loaded, final)[flat, targets.repeat(blocks)].view(blocks, n_rows)
        into[torch.tensor(joined, device=into.device)[:, None], row_index[None, :]] = probs


# --------------------------------------------------------------------------------------------------
# Knockout circuit, circuit-corrupted runs, integration layer
# --------------------------------------------------------------------------------------------------
#: A run's stacked knockouts hold up to this many batches' worth of rows per generation. Stacking
#: pays only when many windows ride together (on one CPU thread a generation costs about its rows:
#: 2 windows per generation saved nothing, all 7 of the zoo models 1.16-1.35x;
#: benchmarks/bench_probe_passes.py); 4 batches hold the ~8 discovery rows x 7 windows of a default
#: run and keep a deep model's knockout generation within 4x a batch's memory.
KNOCKOUT_BATCHES = 4


def stack_rows(device: torch.device | str, batch_size: int) -> int:
    """The most rows one stacked generation of a run holds (knockout windows, held-out windows):
    `KNOCKOUT_BATCHES` batches on the CPU, where stacking was measured to pay and the memory is the
    host's; one batch on an accelerator, so that a run's peak memory stays that of answering a batch,
    which the user sized (a generation's keys/values grow with its rows: 64 rows of a 7B model over
    ~600 positions hold about 22 GB)."""
    return (KNOCKOUT_BATCHES if torch.device(device).type == "cpu" else 1) * int(batch_size)


def window_width(num_layers: int, window: int | None = None) -> int:
    """The knockout window width: `window` (the probe option), by default a quarter of the decoder
    layers, rounded up."""
    return window or math.ceil(num_layers / 4)


def knockout_windows(num_layers: int, width: int) -> list[tuple[int, int]]:
    """Every window of `width` consecutive decoder layers, as (first, last) inclusive."""
    if not 1 <= width <= num_layers:
        raise ValueError(f"window width {width} is outside 1..{num_layers} (the model's decoder layers)")
    return [(first, first + width - 1) for first in range(num_layers - width + 1)]


def _check_window(window: Sequence[int], num_layers: int) -> tuple[int, int]:
    if window is None or len(window) != 2:
        raise ValueError(f"a window is (first, last) inclusive, got {window!r}")
    first, last = int(window[0]), int(window[1])
    if not 0 <= first <= last < num_layers:
        raise ValueError(f"window {window} is outside the decoder layers 0..{num_layers - 1}")
    return first, last


def _generate(loaded, batch, hooks: Sequence[AttentionHook], max_new_tokens: int,
              choices: Sequence[Sequence[str]] | None = None) -> list[AnswerOutput]:
    """Greedy answers, or with `choices` the options scored by likelihood (`option_answers`)."""
    from vrp_eval.generation import option_answers

    def answer():
        if choices is not None:
            return option_answers(loaded, batch, choices)
        return generate_answers(loaded, batch, max_new_tokens=max_new_tokens)

    if not hooks:
        return answer()
    with attention_hooks(loaded.adapter, *hooks):
        return answer()


def knockout_hook(adapter, batch, window: Sequence[int]) -> AttentionKnockout:
    """The knockout of `window`: every non-image query (prompt and generated tokens) loses the
    image keys in the window's layers."""
    first, last = _check_window(window, adapter.num_layers)
    groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
    return AttentionKnockout(range(first, last + 1), query_mask=groups["all"] & ~groups["image"],
                             key_mask=groups["image"], generated_queries=True)


@torch.no_grad()
def knockout_answers(loaded, batch, window: Sequence[int], max_new_tokens: int = DEFAULTS["max_new_tokens"],
                     extra_hooks: Iterable[AttentionHook] = (),
                     choices: Sequence[Sequence[str]] | None = None) -> list[AnswerOutput]:
    """Greedy answers (with `choices`: the options scored by likelihood) with non-image -> image
    attention blocked inside `window` (first, last)."""
    hook = knockout_hook(loaded.adapter, batch, window)
    return _generate(loaded, batch, [hook, *extra_hooks], max_new_tokens, choices)


@torch.no_grad()
def knockout_answers_per_window(loaded, batch, windows: Sequence[Sequence[int]],
                                max_new_tokens: int = DEFAULTS["max_new_tokens"],
                                choices: Sequence[Sequence[str]] | None = None, max_rows: int | None = None,
                                _one_at_a_time: bool = False) -> list[list[AnswerOutput]]:
    """`knockout_answers` of every window in `windows` (one list of answers per window).

    The windows' knockouts ride in one generation: the batch's rows are repeated once per window and
    each block of rows is knocked out in its own window only (`AttentionKnockout.row_layers`). Rows
    never meet in attention, and outside its window a row keeps plain SDPA, so each block answers as
    its window alone would (up to the round-off of a wider batch; bit for bit on the zoo tiny-llava),
    while the generation's fixed costs (one `generate` call, the option scoring, per-step overhead)
    are paid once for all windows instead of once per window. `max_rows`: the most rows one
    generation holds (at least one window's; None: every window in one generation), since its memory
    grows with them. `_one_at_a_time`: one generation per window (the reference the benchmark
    measures against)."""
    windows = [_check_window(w, loaded.adapter.num_layers) for w in windows]
    n = batch["input_ids"].shape[0]
    per_call = 1 if _one_at_a_time else len(windows) if max_rows is None else max(1, max_rows // n)
    if per_call < len(windows):
        return [answers for start in range(0, len(windows), per_call)
                for answers in knockout_answers_per_window(loaded, batch, windows[start:start + per_call],
                                                           max_new_tokens, choices)]
    if len(windows) == 1:
        return [knockout_answers(loaded, batch, windows[0], max_new_tokens=max_new_tokens, choices=choices)]
    adapter = loaded.adapter
    stacked = adapter.select_rows(batch, [row for _ in windows for row in range(n)])
    row_layers = torch.zeros(len(windows) * n, adapter.num_layers, dtype=torch.bool)
    for j, (first, last) in enumerate(windows):
        row_layers[j * n:(j + 1) * n, first:last + 1] = True
    groups = adapter.position_groups(stacked["input_ids"], stacked["attention_mask"])
    hook = AttentionKnockout(sorted({layer for first, last in windows for layer in range(first, last + 1)}),
                             query_mask=groups["all"] & ~groups["image"], key_mask=groups["image"],
                             generated_queries=True, row_layers=row_layers)
    answers = _generate(loaded, stacked, [hook], max_new_tokens,
                        None if choices is None else [c for _ in windows for c in choices])
    return [answers[j * n:(j + 1) * n] for j in range(len(windows))]


@torch.no_grad()
def corrupted_answers(loaded, batch, window: Sequence[int], kind: str = DEFAULTS["noise"],
                      scale: float = DEFAULTS["noise_scale"], sigma: NoiseScale | None = None,
                      seed: int = DEFAULTS["seed"], extra_hooks: Iterable[AttentionHook] = (),
                      max_new_tokens: int = DEFAULTS["max_new_tokens"], choices: Sequence[Sequence[str]] | None = None
                      ) -> list[AnswerOutput]:
    """Greedy answers (with `choices`: the options scored by likelihood) with the image-position
    hidden states that the window's layers read corrupted (the inputs of layers first..last;
    gaussian std = scale * sigma.inputs["image"][layer]). `extra_hooks` (attention observers such as
    a sharpness recorder) run during the same generation."""
    hooks = list(extra_hooks)
    (answers,) = corrupted_answers_per_window(loaded, batch, [window], kind, scale, sigma, seed,
                                              observers=lambda _: hooks, max_new_tokens=max_new_tokens,
                                              choices=choices)
    return answers


@torch.no_grad()
def corrupted_answers_per_window(loaded, batch, windows: Sequence[Sequence[int]], kind: str = DEFAULTS["noise"],
                                 scale: float = DEFAULTS["noise_scale"], sigma: NoiseScale | None = None,
                                 seed: int = DEFAULTS["seed"], *,
                                 observers: Callable[[dict], Sequence[AttentionHook]] | None = None,
                                 max_new_tokens: int = DEFAULTS["max_new_tokens"],
                                 choices: Sequence[Sequence[str]] | None = None, max_rows: int | None = None,
                                 _one_at_a_time: bool = False) -> list[list[AnswerOutput]]:
    """`corrupted_answers` of every window in `windows` (one list of answers per window; the held-out
    half's circuit and control windows), in one generation: the batch's rows are repeated once per
    window and each block's image states are corrupted in its own window's layers only. The noise of
    a row does not depend on its batch neighbours (`corrupt_states` draws it per row), and rows never
    meet in attention, so each block answers as its window alone would (up to the round-off of a
    wider batch), while the generation's fixed costs are paid once. `observers`: called with the
    stacked batch, returns attention observers for the generation that holds the first window (such
    as a `SharpnessRecorder` for it; rows j*n..(j+1)*n-1 are window j's). `max_rows`: the most rows
    one generation holds (at least one window's; None: every window in one generation; a run passes
    `stack_rows`). `_one_at_a_time`: one generation per window (the reference the benchmark measures
    against)."""
    adapter = loaded.adapter
    windows = [_check_window(w, adapter.num_layers) for w in windows]
    layer_sigma = sigma.layers("image", site="input") if sigma is not None else None
    check_kind(kind, scale, layer_sigma)
    n = batch["input_ids"].shape[0]
    per_call = 1 if _one_at_a_time else len(windows) if max_rows is None else max(1, max_rows // n)
    if per_call < len(windows):
        return [answers for start in range(0, len(windows), per_call)
                for answers in corrupted_answers_per_window(
                    loaded, batch, windows[start:start + per_call], kind, scale, sigma, seed,
                    observers=observers if start == 0 else None,
                    max_new_tokens=max_new_tokens, choices=choices)]
    stacked = adapter.select_rows(batch, [row for _ in windows for row in range(n)]) if len(windows) > 1 else batch
    image = adapter.position_groups(stacked["input_ids"], stacked["attention_mask"])["image"].to(loaded.device)
    block = torch.arange(image.shape[0], device=image.device) // n
    with ExitStack() as scopes:
        for j, (first, last) in enumerate(windows):
            scopes.enter_context(HiddenStateIntervention(adapter, range(first, last + 1), image & (block == j)[:, None],
                                                         kind=kind, scale=scale, sigma=layer_sigma, seed=seed,
                                                         site="input"))
        answers = _generate(loaded, stacked, list(observers(stacked)) if observers else [], max_new_tokens,
                            None if choices is None else [c for _ in windows for c in choices])
    return [answers[j * n:(j + 1) * n] for j in range(len(windows))]


def choose_circuit(knockout_scores: Any, windows: Sequence[Sequence[int]],
                   clean_scores: Sequence[float] | None = None) -> tuple[int, int]:
    """The window whose knockout lowers the mean task score the most (the largest accuracy drop vs
    clean: the clean accuracy is common to every window, so this is the lowest knockout accuracy).
    knockout_scores: (n_samples, n_windows) of the discovery half. Ties go to the earliest window."""
    scores = np.asarray(knockout_scores, dtype=float)
    if scores.ndim != 2 or scores.shape[1] != len(windows) or scores.shape[0] == 0:
        raise ValueError(f"knockout_scores must be (n_samples >= 1, {len(windows)} windows), got {scores.shape}")
    if clean_scores is not None and len(clean_scores) != scores.shape[0]:
        raise ValueError(f"{len(clean_scores)} clean scores for {scores.shape[0]} knockout rows")
    accuracy = np.nanmean(scores, axis=0)
    if np.isnan(accuracy).all():
        raise ValueError("every knockout score is NaN: nothing to choose a circuit from")
    best = int(np.nanargmin(accuracy))
    return int(windows[best][0]), int(windows[best][1])


def control_window(circuit: Sequence[int], num_layers: int) -> tuple[int, int]:
    """An equal-width window right after the circuit, or right before it when there is no room after;
    when neither side has room, the widest window that fits on the larger side."""
    first, last = _check_window(circuit, num_layers)
    width = last - first + 1
    if last + width <= num_layers - 1:
        return last + 1, last + width
    if first - width >= 0:
        return first - width, first - 1
    if num_layers - 1 - last >= first and last < num_layers - 1:
        return last + 1, num_layers - 1
    if first > 0:
        return 0, first - 1
    raise ValueError(f"the circuit {circuit} covers all {num_layers} decoder layers: no control window fits")


#: The smallest drop p_clean - p_corrupted for which a sample's NIE is reported: below it the ratio
#: divides by little more than noise (a 0.05 gap magnifies the IE 20x).
NIE_MIN_GAP = 0.05


def normalised_ie(ie: dict[str, Sequence[float]], p_clean: float, p_corrupted: float,
                  min_gap: float = NIE_MIN_GAP) -> dict[str, list[float | None]] | None:
    """NIE[g][l] = IE[g][l] / (p_clean - p_corrupted) (SPEC 2): the share of what the corruption took
    from the answer's probability that restoring group g at layer l gives back (1: all of it).
    None when the corruption took less than `min_gap`, where the ratio is not meaningful; None
    per layer where the IE is (an untraced layer)."""
    gap = p_clean - p_corrupted
    if not gap >= min_gap:  # also NaN
        return None
    return {group: [None if value is None or math.isnan(value) else float(value) / gap for value in values]
            for group, values in ie.items()}


def integration_layer(mean_ie_last: Sequence[float], mean_ie_image: Sequence[float]) -> int | None:
    """The first decoder layer where the mean IE at the last position exceeds the mean IE at the image
    positions (layers with NaN are skipped); None when it never does."""
    last = np.asarray(mean_ie_last, dtype=float)
    image = np.asarray(mean_ie_image, dtype=float)
    if last.shape != image.shape:
        raise ValueError(f"IE curves of different lengths: {last.shape} and {image.shape}")
    for layer, (a, b) in enumerate(zip(last, image)):
        if np.isfinite(a) and np.isfinite(b) and a > b:
            return layer
    return None
