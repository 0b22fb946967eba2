"""A fast proxy of causal tracing: attribution patching (signal `proxy`), checked against the exact
engine (`vrp_eval.tracing`).

The exact IE restores layer l's clean output at the positions of group G into the corrupted run and
replays the layers above (SPEC 2). Its first-order Taylor expansion is

    ie_proxy[G][l] = sum over p in G of (h_clean[l, p] - h_corrupted[l, p]) . d p_target / d h[l, p]

One backward pass gives the gradient at every layer and position, so the whole (layer x group)
table costs a few passes instead of the exact engine's replays (attribution patching, Nanda 2023;
AtP*, Kramar et al. 2024). Where the gradient is taken (`linearisation`):

- `corrupted`: in the corrupted run, the point the exact restoration leaves from (attribution
  patching proper). One clean forward + per noise sample one corrupted forward and one backward.
- `midpoint` (the default): in the run whose image embeddings carry half the noise,
  e_clean + (e_corrupted - e_clean) / 2, with h_corrupted from the corrupted run as above: a
  one-step midpoint rule between the corrupted and the clean run (one-step integrated gradients).
  One forward more; on the three zoo models it follows the exact IE better on the pooled and the
  median per-sample correlation and on the mean error, though not on every layer, its worst sample
  or its largest single error (benchmarks/README.md, "Fast proxy of causal tracing").

Both are exact when p_target is affine in the restored state (tests/test_proxy.py builds such a
model) and depart from the exact IE where it is not: a 3-sigma corruption of all image tokens moves
attention and the answer's softmax far beyond their linear range, so the image group's IE is
underestimated (AtP*'s "saturation"), and at the last layers of the `last` group, whose exact IE is
p_clean - p_corrupted, a tangent misses the softmax's curvature.

The same corruption as the exact engine: `EmbeddingCorruption` with the run's kind, scale, sigma and
seed, noise samples k = 0..K'-1 (`noise_index`), so p_corrupted of noise sample k is the exact
engine's noise sample k. K' = `PROXY_NOISE_SAMPLES` (1) by default: `proxy_cost(1, "midpoint")` = 5
forward-pass equivalents per sample (1 clean, none when given the answer's prompt pass, + 1 corrupted + 1 midpoint forward + a backward counted
as 2 forwards, though a backward that needs no weight gradients does about one forward's matrix
products), whatever the depth. The exact engine's cost grows with the layers and the positions after
the image (measured at K = 5: 17-18 on the 8-layer causal zoo models, 58.5 under PaliGemma's
bidirectional prefix, 10.2 with 24 layers and 256 image tokens before a short question).

`proxy_window` is the circuit the proxy finds: the window of w layers across which the last
position's IE rises the most, ie[last][last_layer] - ie[last][first - 1] (ie[last][-1] = 0: the last
prompt token's embedding is not corrupted). Restoring the last position helps only once the answer's
image information has arrived there, so that rise is what reaches the answer inside the window
(SPEC 2: the largest-IE window itself is ill-posed, a rise is not). The same rule applied to the
exact curves gives the reference it is compared with (`details.ie_rise_layers`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vrp_eval.hooks import HookScope
from vrp_eval.intervention import EmbeddingCorruption, NoiseScale
from vrp_eval.tracing import (
    CleanRun,
    TraceCost,
    TraceResult,
    TraceSettings,
    _clean_capture,
    _corrupted_layer0_input,
    _head_probs,
    _prob_dtype,
    _Replay,
    _trace_inputs,
    knockout_windows,
)

#: Where the gradient is taken (the module doc): the corrupted run, or the run with half the noise.
LINEARISATIONS = ("corrupted", "midpoint")
DEFAULT_LINEARISATION = "midpoint"
#: Noise samples of the proxy by default: one keeps it at 5 forward-pass equivalents per sample.
PROXY_NOISE_SAMPLES = 1
#: A backward pass counted in forward-pass equivalents (activation and weight gradients: the usual
#: 2x; the proxy asks for activation gradients only, which is closer to 1x).
BACKWARD_PASSES = 2


def proxy_cost(n_noise: int, linearisation: str = DEFAULT_LINEARISATION, clean_pass: bool = True) -> TraceCost:
    """Forward-pass equivalents per sample: 1 clean forward (`clean_pass`; none when the clean run was
    the answer's prefill) + per noise sample 1 corrupted forward and 1 backward (`midpoint`: and 1
    forward more). `naive_forward_passes` is 0: there is no naive version of the proxy."""
    per_noise = 1 + BACKWARD_PASSES + (1 if linearisation == "midpoint" else 0)
    return TraceCost(forward_passes=float(int(clean_pass) + n_noise * per_noise), naive_forward_passes=0)


#: One sample's proxy trace has the exact trace's shape (`ie`: {group: [IE per layer]}), so every reader
#: of a `TraceResult` reads it.
ProxyResult = TraceResult


@torch.no_grad()
def proxy_trace_batch(loaded, batch, target_ids: Sequence[int], settings: TraceSettings | None = None,
                      sigma: NoiseScale | None = None, n_noise: int | None = PROXY_NOISE_SAMPLES,
                      linearisation: str = DEFAULT_LINEARISATION, *, clean: CleanRun | None = None
                      ) -> list[ProxyResult]:
    """Attribution-patching estimates of `trace_batch`'s IE for an encoded batch; one `ProxyResult` per
    sample. `settings` and `sigma` as for `trace_batch`; `n_noise`: noise samples k = 0..n_noise-1
    (at most `settings.noise_samples()`; None: all of them, like-for-like with the exact engine).
    linearisation: where the gradient is taken (`LINEARISATIONS`). clean: the batch's `CleanRun` when
    the caller has one (the answer's prefill, or `tracing.clean_run`); else the proxy makes its own."""
    if linearisation not in LINEARISATIONS:
        raise ValueError(f"unknown linearisation {linearisation!r}; choose one of {', '.join(LINEARISATIONS)}")
    if n_noise is not None and n_noise < 1:
        raise ValueError(f"n_noise must be >= 1 (or None for the settings' K), got {n_noise}")
    settings, traced, masks, targets = _trace_inputs(loaded, batch, target_ids, settings, sigma)
    if clean is None:
        own = True
        clean = CleanRun(*_clean_capture(loaded, loaded.model_inputs(batch)), last=masks["last"].int().argmax(1))
    else:  # the answer's prefill (`CleanCapture`) or the exact trace's clean run
        own = False
    with clean.replaying(loaded.adapter):
        return _proxy(loaded, settings, traced, masks, targets, sigma, n_noise, linearisation, clean, own)


def _proxy(loaded, settings, traced, masks, targets, sigma, n_noise, linearisation, clean: CleanRun,
           own: bool) -> list[ProxyResult]:
    adapter = loaded.adapter
    num_layers = adapter.num_layers
    k_total = settings.noise_samples() if n_noise is None else min(int(n_noise), settings.noise_samples())

    n_rows, device = len(targets), loaded.device
    length = masks["all"].shape[1]
    rows = torch.arange(n_rows, device=device)
    last = masks["last"].int().argmax(1)
    lm_call, calls, clean_out = clean.lm_call, clean.calls, clean.outputs
    replay = _Replay(adapter, calls, n_rows, length)
    p_clean = _head_probs(loaded, clean_out[-1][rows, last])[rows, targets]
    # As in the exact engine: in a causal decoder a position before the row's first image token never
    # sees the corruption, so restoring it is a no-op; its clean - corrupted difference is round-off.
    weights = {}
    for group in settings.groups:
        mask = masks[group]
        if not adapter.bidirectional_prefix:
            columns = torch.arange(length, device=device)
            image_start = torch.where(masks["image"], columns, length).amin(1, keepdim=True)
            mask = mask & (columns >= image_start)
        weights[group] = mask
    embed_sigma = sigma.embedding["image"] if sigma is not None else None
    prob_dtype = _prob_dtype(loaded)
    p_corrupted = torch.zeros(k_total, n_rows, device=device, dtype=prob_dtype)
    ie = {g: torch.zeros(k_total, num_layers, n_rows, device=device, dtype=prob_dtype) for g in settings.groups}
    # Layer 0's clean input (an empty scope corrupts nothing), one end of the midpoint's segment.
    clean_input = _corrupted_layer0_input(adapter, lm_call, HookScope()) if linearisation == "midpoint" else None
    for k in range(k_total):
        corruption = EmbeddingCorruption(adapter, masks["image"], settings.kind, settings.scale, embed_sigma,
                                         seed=settings.seed, noise_index=k)
        corrupted_input = _corrupted_layer0_input(adapter, lm_call, corruption)
        if linearisation == "corrupted":
            outputs, probs, grads = _with_gradients(loaded, replay, corrupted_input, rows, last, targets)
        else:  # the corrupted run for its states and p; the gradient from the run with half the noise
            outputs, probs = _without_gradients(loaded, replay, corrupted_input, rows, last, targets)
            _, _, grads = _with_gradients(loaded, replay, clean_input + 0.5 * (corrupted_input - clean_input),
                                          rows, last, targets)
        p_corrupted[k] = probs
        for layer in range(num_layers):
            delta = clean_out[layer] - outputs[layer]
            per_position = (delta * grads[layer]).sum(-1).to(prob_dtype)  # (B, T)
            for group in settings.groups:
                ie[group][k, layer] = (per_position * weights[group]).sum(1)

    untraced = [layer for layer in range(num_layers) if layer not in set(traced)]
    mean_ie = {g: v.mean(0) for g, v in ie.items()}  # (L, B)
    for value in mean_ie.values():
        value[untraced] = float("nan")
    cost = proxy_cost(k_total, linearisation, clean_pass=own or not clean.from_answer)
    return [ProxyResult(target_id=int(targets[row]), p_clean=float(p_clean[row]),
                        p_corrupted=float(p_corrupted[:, row].mean()),
                        ie={g: [float(v) for v in mean_ie[g][:, row]] for g in settings.groups},
                        p_corrupted_samples=[float(v) for v in p_corrupted[:, row]], cost=cost)
            for row in range(n_rows)]


def _without_gradients(loaded, replay: _Replay, hidden: torch.Tensor, rows, last, targets):
    """Decoder-layer outputs and p_target of a replay from layer 0's input."""
    outputs = []
    for layer in range(len(replay.layers)):
        hidden = replay.run(layer, hidden)
        outputs.append(hidden)
    return outputs, _head_probs(loaded, hidden[rows, last])[rows, targets]


def _with_gradients(loaded, replay: _Replay, hidden: torch.Tensor, rows, last, targets):
    """The same, plus d p_target / d (each layer's output) at every position."""
    with torch.enable_grad():
        # A leaf that needs a gradient, so the graph exists even when the weights need none;
        # autograd.grad below stops at layer 0's output and computes no weight gradient.
        outputs, probs = _without_gradients(loaded, replay, hidden.detach().requires_grad_(True), rows, last, targets)
        # The rows of a batch do not interact, so the gradient of the sum is each row's own.
        grads = torch.autograd.grad(probs.sum(), outputs)
    return [o.detach() for o in outputs], probs.detach(), grads


# --------------------------------------------------------------------------------------------------
# The proxy's circuit and its agreement with the exact engine (pure functions on arrays)
# --------------------------------------------------------------------------------------------------
def arrival(mean_ie_last: Sequence[float], window: Sequence[int]) -> float:
    """ie[last][last_layer] - ie[last][first - 1] for window (first, last_layer), ie[last][-1] = 0: how
    much of the answer's image information reaches the last position inside the window."""
    first, last = int(window[0]), int(window[1])
    curve = np.asarray(mean_ie_last, dtype=float)
    return float(curve[last]) - (0.0 if first == 0 else float(curve[first - 1]))


def proxy_window(mean_ie_last: Sequence[float], width: int) -> tuple[int, int] | None:
    """The window of `width` layers with the largest `arrival` (ties: the earliest); None when no
    window has a finite one (untraced layers are NaN)."""
    curve = np.asarray(mean_ie_last, dtype=float)
    best, best_rise = None, -np.inf
    for window in knockout_windows(len(curve), width):
        rise = arrival(curve, window)
        if np.isfinite(rise) and rise > best_rise:
            best, best_rise = window, rise
    return best


def agreement(proxy_ie: Sequence[dict[str, Sequence[float]]], exact_ie: Sequence[dict[str, Sequence[float]]],
              groups: Sequence[str] | None = None) -> dict[str, Any]:
    """How well per-sample proxy IE tables match exact ones (same samples, same order).

    pearson / spearman: over every finite (sample, group, layer) value; per_sample_pearson_median /
    _min: Pearson over one sample's (group, layer) table, median and minimum over samples;
    per_layer_pearson[group][l]: Pearson over samples at one (group, layer), None where either side
    is constant; mean_abs_error and max_abs_error over every value."""
    from scipy import stats

    if len(proxy_ie) != len(exact_ie) or not proxy_ie:
        raise ValueError(f"{len(proxy_ie)} proxy and {len(exact_ie)} exact traces: give the same samples, at least one")
    groups = list(groups or exact_ie[0].keys())
    proxy = np.array([[p[g] for g in groups] for p in proxy_ie], dtype=float)  # (N, G, L)
    exact = np.array([[e[g] for g in groups] for e in exact_ie], dtype=float)
    if proxy.shape != exact.shape:
        raise ValueError(f"proxy IE {proxy.shape} and exact IE {exact.shape} differ in shape")

    def pearson(a, b):
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
        if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
            return None
        return float(np.corrcoef(a, b)[0, 1])

    finite = np.isfinite(proxy) & np.isfinite(exact)
    per_sample = [pearson(p.ravel(), e.ravel()) for p, e in zip(proxy, exact)]
    per_sample = [r for r in per_sample if r is not None]
    rho = stats.spearmanr(proxy[finite], exact[finite]).statistic if finite.sum() > 1 else np.nan
    error = np.abs(proxy - exact)[finite]
    return {
        "pearson": pearson(proxy.ravel(), exact.ravel()),
        "spearman": None if not np.isfinite(rho) else float(rho),
        "per_sample_pearson_median": float(np.median(per_sample)) if per_sample else None,
        "per_sample_pearson_min": float(np.min(per_sample)) if per_sample else None,
        "per_layer_pearson": {g: [pearson(proxy[:, i, layer], exact[:, i, layer]) for layer in range(proxy.shape[2])]
                              for i, g in enumerate(groups)},
        "mean_abs_error": float(error.mean()) if error.size else None,
        "max_abs_error": float(error.max()) if error.size else None,
    }
