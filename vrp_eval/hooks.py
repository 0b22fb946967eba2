"""The one hook mechanism: `HookScope`, and the attention dispatcher behind attention hooks.

Every hook vrp-eval puts on a model goes through a `HookScope`: a context manager that installs its
PyTorch hooks (`on_output`, `on_input`) and attention hooks (`on_attention`) on entry and removes all
of them on exit, also when the installation or the block raises. The interventions
(`vrp_eval.intervention`) are `HookScope` subclasses; captures use a plain one:

    with HookScope() as scope:
        scope.on_output(adapter.decoder_layers[3], lambda module, args, output: ...)
        model(**inputs)

transformers 5 calls `ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value,
attention_mask, scaling=..., dropout=...)` in each attention module. `attention_hooks(...)` switches
the language model to the registered implementation "vrp" for the duration of a `with` block and
pushes `AttentionHook`s; the dispatcher lets observers read what they need (for example the one
query row that predicts the answer) and runs plain SDPA unless a hook modifies the scores or the
probabilities of that layer, in which case that layer alone runs an eager path (only for the samples
the hook changes there, when it names them: `AttentionHook.modified_rows`). Hooks never outlive
the block: the previous implementation is restored even when the block raises.
"""
from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

IMPLEMENTATION = "vrp"

_ACTIVE: contextvars.ContextVar[tuple[_Scope, ...]] = contextvars.ContextVar("vrp_attention_scopes", default=())


class AttentionHook:
    """Base class: override `observe`, `modify_scores` and/or `modify_probs`.

    `layers`: decoder-layer indices the hook applies to (None = every decoder layer).
    `modifies`: True when the hook changes scores or probabilities (forces the eager path there).
    """

    layers: frozenset[int] | None = None
    modifies: bool = False

    def applies_to(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float, module: nn.Module) -> None:
        """Query (B, H, Tq, d) and key (B, H, Tk, d) after GQA expansion; additive float mask or None."""

    def modify_scores(self, layer: int, scores: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Pre-softmax scores (B, H, Tq, Tk), mask already added."""
        return scores

    def modify_probs(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """Post-softmax probabilities (B, H, Tq, Tk)."""
        return probs

    def modified_rows(self, layer: int) -> torch.Tensor | None:
        """Bool (B,): the samples a modifying hook changes in `layer` (None: all of them). The other
        samples keep plain SDPA there, and `modify_scores` / `modify_probs` get only these samples'
        rows, in batch order."""
        return None


class _Scope:
    def __init__(self, layer_of: dict[int, int], hooks: tuple[AttentionHook, ...]):
        self.layer_of = layer_of
        self.hooks = hooks


def repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, n_rep, length, dim).reshape(batch, heads * n_rep, length, dim)


def _float_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~attention_mask, torch.finfo(dtype).min)


def causal_float_mask(q_len: int, k_len: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The additive causal mask of the last `q_len` queries over `k_len` keys (1, 1, q, k)."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = torch.zeros(q_len, k_len, dtype=dtype, device=device)
    return mask.masked_fill(k_pos > q_pos, torch.finfo(dtype).min)[None, None]


def vrp_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None,
                          dropout: float = 0.0, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scopes = _ACTIVE.get()
    layer = None
    hooks: list[AttentionHook] = []
    for scope in scopes:
        index = scope.layer_of.get(id(module))
        if index is not None:
            layer = index
            hooks.extend(h for h in scope.hooks if h.applies_to(index))
    if layer is None or not hooks:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_rep = query.shape[1] // key.shape[1]
    key_full, value_full = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    mask = _float_mask(attention_mask, query.dtype)
    if mask is None and query.shape[2] > 1 and getattr(module, "is_causal", True):
        mask = causal_float_mask(query.shape[2], key.shape[2], query.dtype, query.device)
    for hook in hooks:
        hook.observe(layer, query, key_full, mask, scaling, module)
    if not any(h.modifies for h in hooks):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    rows = _modified_rows(hooks, layer)
    if rows is None:
        return _eager_attention(layer, hooks, query, key_full, value_full, mask, scaling, kwargs.get("softcap"))
    # Only the samples the hook changes in this layer (one window's block of a stacked knockout) take
    # the eager path; the others keep plain SDPA's output, bit for bit what a run without the hook gives.
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                       dropout=dropout, **kwargs)
    index = rows.to(query.device).nonzero().squeeze(1)
    if len(index):
        sub_mask = mask if mask is None or mask.shape[0] == 1 else mask[index]
        changed, _ = _eager_attention(layer, hooks, query[index], key_full[index], value_full[index], sub_mask,
                                      scaling, kwargs.get("softcap"))
        output = output.index_copy(0, index, changed)
    return output, None


def _eager_attention(layer: int, hooks: Iterable[AttentionHook], query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None):
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask[:, :, :, : key.shape[-2]]
    for hook in hooks:
        scores = hook.modify_scores(layer, scores, mask)
    # At least float32 (bf16 / fp16 scores), and float64 kept: a float64 mask's finfo.min would turn
    # into -inf in float32, and a padding query whose every key is masked would give NaN.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    for hook in hooks:
        probs = hook.modify_probs(layer, probs)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def _modified_rows(hooks: Sequence[AttentionHook], layer: int) -> torch.Tensor | None:
    """The one modifying hook's `modified_rows(layer)`; None where hooks change every sample."""
    modifying = [h for h in hooks if h.modifies]
    rows = [h.modified_rows(layer) for h in modifying]
    if all(r is None for r in rows):
        return None
    if len(modifying) > 1:
        raise ValueError("a hook that changes only some samples (modified_rows) cannot share a layer with "
                         "another modifying hook: run them in separate scopes")
    return rows[0]


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, vrp_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)
    _registered = True


def layer_index_map(decoder_layers: Iterable[nn.Module]) -> dict[int, int]:
    """id(module) -> decoder-layer index, for every module inside each decoder layer."""
    return {id(m): i for i, layer in enumerate(decoder_layers) for m in layer.modules()}


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a decoder layer's output (a tensor, or a tuple / list that starts with it)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """A decoder layer's output with its hidden states replaced by `hidden`."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


class HookScope:
    """Hooks installed for one `with` block and always removed (see the module doc).

    Subclasses register their hooks in `_install`, which runs on entry; a plain `HookScope` takes
    hooks registered inside its block."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], Any]] = []

    def _install(self) -> None:
        """Register the scope's hooks (subclasses)."""

    def on_output(self, module: nn.Module, hook: Callable) -> None:
        """`hook(module, args, output)` after `module` runs; a value it returns replaces the output."""
        self._undo.append(module.register_forward_hook(hook).remove)

    def on_input(self, module: nn.Module, hook: Callable) -> None:
        """`hook(module, args, kwargs)` before `module` runs; an (args, kwargs) pair it returns replaces them."""
        self._undo.append(module.register_forward_pre_hook(hook, with_kwargs=True).remove)

    def on_attention(self, adapter, *hooks: AttentionHook) -> None:
        """Route the language model's attention through the dispatcher with `hooks` active."""
        _register()
        target = adapter.language_model
        previous = target.config._attn_implementation
        token = _ACTIVE.set(_ACTIVE.get() + (_Scope(layer_index_map(adapter.decoder_layers), tuple(hooks)),))
        self._undo.append(lambda: _ACTIVE.reset(token))
        if previous != IMPLEMENTATION:
            target.set_attn_implementation(IMPLEMENTATION)
            self._undo.append(lambda: target.set_attn_implementation(previous))

    def __enter__(self):
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook of the scope, the latest first."""
        while self._undo:
            self._undo.pop()()


class _AttentionScope(HookScope):
    def __init__(self, adapter, hooks: tuple[AttentionHook, ...]):
        super().__init__()
        self.adapter, self.hooks = adapter, hooks

    def _install(self) -> None:
        self.on_attention(self.adapter, *self.hooks)


def attention_hooks(adapter, *hooks: AttentionHook) -> HookScope:
    """A scope that routes the language model's attention through the dispatcher with `hooks` active
    (`with attention_hooks(adapter, recorder): ...`)."""
    return _AttentionScope(adapter, hooks)
