"""Attention sharpness (SPEC 4) and the companion toolkit's structural signals (the logit lens and
self-consistency, read from the answer, live in `vrp_eval.companions`).

Sharpness needs, per decoder layer and head, one attention row: the row of the query position that
predicts the first answer token (the last prompt position). `SharpnessRecorder` is an observer on
the shared attention dispatcher (`vrp_eval.hooks`): at each layer it computes that row alone from
the query and key tensors, while SDPA keeps computing the attention output, so no layer's full
(T x T) attention matrix ever exists. It records only the prompt pass (the first call per layer), so
it can stay active during `generate` and the clean generation run doubles as the capture run:

    recorder = SharpnessRecorder.for_batch(loaded.adapter, batch)
    with attention_hooks(loaded.adapter, recorder):
        answers = generate_answers(loaded, batch)
    signals = recorder.signals()          # one AttentionSignals per sample

Definitions, per layer l and head h, with a = the attention row over all keys and I = image keys:
    p = a_I / sum(a_I);  H = -sum p log p;  S = 1 - H / log N  (N = |I|)      sharpness
    m = sum(a_I)                                                                image attention mass
Per sample both are averaged over heads, kept per layer, and averaged over the recorded layers.
Spatial signals use the head-averaged map over the image grid, M_l = mean_h a_I at layer l, and
the map averaged over `spatial_layers` (default the second half of the layers, like the companion
toolkit's layers 16-32 of 32), M = mean_l M_l. With q = M / sum(M) (L1 normalisation):
    H_s = -sum q log q in nats: the entropy of the ONE layer-averaged map, as the source defines it
    ("Where Reliability Lives in VLMs", Eq. 1 and 3; the public VLM-Reliability-Probe code);
    H_s(l) the same entropy of M_l alone, per layer; dH_s(l) = H_s(l) - H_s(l-1);
    `spatial_entropy_layer_mean` = mean_l H_s(l), the earlier vrp-eval definition, kept under its own
    name (M weights each layer by its image attention mass m_l, so by the concavity of entropy H_s is
    at least the m-weighted mean of the H_s(l); the plain mean can be larger);
    and the DBSCAN cluster count (eps 1.5, min_samples 3) of the grid coordinates of the top 10% of
    patches of M.
p is computed as a softmax of the image-key logits alone (equal to a_I / sum(a_I), and finite even
when sum(a_I) underflows).

The pure functions (`sharpness_from_logits`, `spatial_entropy`, `cluster_count`, `token_confidence`)
work on arrays; the recorder and `attention_signals` are thin wrappers that feed them.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from vrp_eval.hooks import AttentionHook, attention_hooks

DBSCAN_EPS = 1.5
DBSCAN_MIN_SAMPLES = 3
TOP_FRACTION = 0.1


# --------------------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------------------
def sharpness_from_logits(image_logits: torch.Tensor, all_logits: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S, mass) per leading index of `image_logits` (..., N): the attention logits (scores + mask)
    of the image keys. `all_logits` (..., T) are the logits over every key, for the image mass
    sum(a_I); without them the mass is None."""
    n = image_logits.shape[-1]
    if n < 2:
        raise ValueError(f"sharpness needs at least 2 image tokens, got {n}")
    log_p = torch.log_softmax(image_logits.double(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    sharpness = 1.0 - entropy / math.log(n)
    mass = None
    if all_logits is not None:
        mass = (torch.logsumexp(image_logits.double(), -1) - torch.logsumexp(all_logits.double(), -1)).exp()
    return sharpness, mass


def sharpness_from_attention(image_attention: torch.Tensor | np.ndarray) -> torch.Tensor:
    """S of attention rows already restricted to the image keys (..., N), normalised here (p = a / sum a)."""
    a = torch.as_tensor(image_attention, dtype=torch.float64)
    n = a.shape[-1]
    if n < 2:
        raise ValueError(f"sharpness needs at least 2 image tokens, got {n}")
    p = a / a.sum(-1, keepdim=True)
    entropy = -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(-1)
    return 1.0 - entropy / math.log(n)


def spatial_entropy(attention_map: np.ndarray | torch.Tensor) -> float:
    """H_s in nats of a non-negative map over image patches (any shape), normalised to sum 1."""
    m = np.asarray(attention_map, dtype=np.float64).ravel()
    total = m.sum()
    if not total > 0:
        raise ValueError("the attention map has no positive mass: spatial entropy is undefined")
    q = m / total
    q = q[q > 0]
    return float(-(q * np.log(q)).sum())


def cluster_count(attention_map: np.ndarray | torch.Tensor, top_fraction: float = TOP_FRACTION,
                  eps: float = DBSCAN_EPS, min_samples: int = DBSCAN_MIN_SAMPLES) -> int:
    """C_k: DBSCAN clusters (noise excluded) of the (row, col) grid coordinates of the top
    `top_fraction` of patches of a 2-D map (rows, cols). Ties keep the earlier patch (row-major)."""
    from sklearn.cluster import DBSCAN

    m = np.asarray(attention_map, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"cluster_count needs a 2-D (rows, cols) map, got shape {m.shape}")
    k = max(1, math.ceil(top_fraction * m.size))
    top = np.argsort(-m.ravel(), kind="stable")[:k]
    coords = np.stack(np.unravel_index(top, m.shape), axis=1).astype(np.float64)
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(coords).labels_
    return len(set(labels.tolist()) - {-1})


def token_confidence(token_probs: Sequence[float]) -> float:
    """P_tok: the mean log-probability of the generated tokens (nan for an empty answer)."""
    if len(token_probs) == 0:
        return float("nan")
    return float(np.mean(np.log(np.clip(np.asarray(token_probs, dtype=np.float64), 1e-300, None))))


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------
@dataclass
class AttentionSignals:
    """Attention signals of one sample. Per-layer lists are indexed by decoder layer from 0 and hold
    None for layers that were not recorded (and for dH_s at layer 0)."""

    sharpness: float
    sharpness_per_layer: list[float | None]
    image_attention_mass: float
    image_attention_mass_per_layer: list[float | None]
    spatial_entropy: float
    spatial_entropy_layer_mean: float
    spatial_entropy_per_layer: list[float | None]
    d_spatial_entropy: list[float | None]
    cluster_count: int
    n_image_tokens: int
    grid: tuple[int, int]
    spatial_layers: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_spatial_layers(num_layers: int) -> list[int]:
    """The second half of the decoder layers (layers 16-31 of 32, as the companion toolkit used)."""
    return list(range(num_layers // 2, num_layers))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


# --------------------------------------------------------------------------------------------------
# The recorder (an observer on the attention dispatcher)
# --------------------------------------------------------------------------------------------------
class SharpnessRecorder(AttentionHook):
    """Records the answer-predicting query row of every (chosen) decoder layer during the prompt pass.

    image_mask: (B, T) bool, the image positions of the batch (`adapter.position_groups(...)["image"]`).
    layers: decoder layers to record (None = all).
    last_positions: (B,) index of the query row per sample; default the last column (left padding).
    grids: (rows, cols) of each sample's image-token grid (`adapter.image_grid`); default a square
        grid when N is a square number, else one row.
    num_layers: length of the per-layer lists (default: the highest recorded layer + 1).

    Only the first call per layer is recorded (the prompt pass); later calls, such as the
    one-token steps of `generate`, are ignored. Use one recorder per batch.
    """

    modifies = False

    def __init__(self, image_mask: torch.Tensor, layers: Iterable[int] | None = None, *,
                 last_positions: torch.Tensor | None = None,
                 grids: Sequence[tuple[int, int]] | None = None, num_layers: int | None = None):
        image_mask = torch.as_tensor(image_mask).bool()
        if image_mask.ndim != 2:
            raise ValueError(f"image_mask must be (batch, seq), got shape {tuple(image_mask.shape)}")
        counts = image_mask.sum(1)
        if (counts < 2).any():
            bad = torch.nonzero(counts < 2).flatten().tolist()
            raise ValueError(f"samples {bad} have fewer than 2 image tokens: sharpness is undefined; "
                             "pass the image mask of the expanded input ids (adapter.position_groups)")
        self.image_mask = image_mask
        self.layers = frozenset(int(l) for l in layers) if layers is not None else None
        batch, length = image_mask.shape
        if last_positions is None:
            last_positions = torch.full((batch,), length - 1, dtype=torch.long)
        self.last_positions = torch.as_tensor(last_positions, dtype=torch.long)
        if grids is not None:
            grids = [tuple(int(x) for x in g) for g in grids]
            for row, (g, n) in enumerate(zip(grids, counts.tolist())):
                if g[0] * g[1] != n:
                    raise ValueError(f"sample {row}: image grid {g} does not hold its {n} image tokens")
        self.grids = grids
        self.num_layers = num_layers
        # layer -> (B, H, T) float32 log-attention of the recorded query row over every key.
        self.log_attention: dict[int, torch.Tensor] = {}

    @classmethod
    def for_batch(cls, adapter, batch, layers: Iterable[int] | None = None) -> SharpnessRecorder:
        """A recorder for an encoded batch, with its image mask, last positions and grids."""
        groups = adapter.position_groups(batch["input_ids"], batch["attention_mask"])
        last = groups["last"].int().argmax(1)
        grids = [adapter.image_grid(batch, row) for row in range(batch["input_ids"].shape[0])]
        return cls(groups["image"], layers, last_positions=last, grids=grids, num_layers=adapter.num_layers)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float, module: nn.Module) -> None:
        if layer in self.log_attention:
            return  # a generation step (or a second pass): only the prompt pass is recorded
        batch, _, q_len, _ = query.shape
        k_len = key.shape[2]
        length = self.image_mask.shape[1]
        if batch == self.image_mask.shape[0] and q_len == length < k_len:
            key, k_len = key[:, :, :length], length  # a static cache's preallocated (masked) keys
        if k_len != length or batch != self.image_mask.shape[0]:
            if q_len == 1:
                return  # a cached decoding step of a run whose prompt pass this recorder did not see
            raise ValueError(
                f"layer {layer}: attention over {k_len} keys for {batch} samples, but the image mask is "
                f"{tuple(self.image_mask.shape)}: build the recorder from the batch that is run")
        rows = self.last_positions.to(query.device) - (k_len - q_len)
        index = rows.view(batch, 1, 1, 1).expand(batch, query.shape[1], 1, query.shape[3])
        q = query.gather(2, index).float()  # (B, H, 1, d)
        logits = torch.matmul(q, key.float().transpose(2, 3)) * scaling  # (B, H, 1, Tk)
        softcap = getattr(module, "attn_logit_softcapping", None)
        if softcap is None:
            softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        if attention_mask is not None:
            mask = attention_mask[:, :, :, :k_len]
            mask = mask.expand(batch, -1, -1, -1)
            mask_rows = mask.gather(2, rows.view(batch, 1, 1, 1).expand(batch, mask.shape[1], 1, k_len))
            logits = logits + mask_rows.float()
        self.log_attention[layer] = torch.log_softmax(logits[:, :, 0], dim=-1).detach()

    # ----------------------------------------------------------------------------------------------
    def signals(self, spatial_layers: Sequence[int] | None = None) -> list[AttentionSignals]:
        """One `AttentionSignals` per sample from what was recorded."""
        if not self.log_attention:
            raise RuntimeError("nothing was recorded: run the model inside `with attention_hooks(adapter, "
                               "recorder):` before asking for signals")
        recorded = sorted(self.log_attention)
        num_layers = self.num_layers or recorded[-1] + 1
        if spatial_layers is None:
            spatial_layers = default_spatial_layers(num_layers)
        spatial = [l for l in spatial_layers if l in self.log_attention]
        logs = {l: self.log_attention[l].detach().to("cpu", torch.float64) for l in recorded}
        out = []
        for row in range(self.image_mask.shape[0]):
            image = self.image_mask[row].cpu()
            n = int(image.sum())
            grid = self.grids[row] if self.grids is not None else _square_grid(n)
            sharp: list[float | None] = [None] * num_layers
            mass: list[float | None] = [None] * num_layers
            h_s: list[float | None] = [None] * num_layers
            maps: dict[int, np.ndarray] = {}
            for layer in recorded:
                log_a = logs[layer][row]  # (H, T)
                s, m = sharpness_from_logits(log_a[:, image], log_a)
                sharp[layer] = float(s.mean())
                mass[layer] = float(m.mean())
                head_mean = log_a[:, image].exp().mean(0).numpy()
                maps[layer] = head_mean
                h_s[layer] = spatial_entropy(head_mean)
            d_h: list[float | None] = [None] * num_layers
            for layer in range(1, num_layers):
                if h_s[layer] is not None and h_s[layer - 1] is not None:
                    d_h[layer] = h_s[layer] - h_s[layer - 1]
            spatial_map = np.mean([maps[l] for l in spatial], axis=0) if spatial else None
            out.append(AttentionSignals(
                sharpness=_mean(sharp[l] for l in recorded),
                sharpness_per_layer=sharp,
                image_attention_mass=_mean(mass[l] for l in recorded),
                image_attention_mass_per_layer=mass,
                spatial_entropy=spatial_entropy(spatial_map) if spatial_map is not None else float("nan"),
                spatial_entropy_layer_mean=_mean(h_s[l] for l in spatial),
                spatial_entropy_per_layer=h_s,
                d_spatial_entropy=d_h,
                cluster_count=cluster_count(spatial_map.reshape(grid)) if spatial_map is not None else 0,
                n_image_tokens=n, grid=tuple(grid), spatial_layers=list(spatial),
            ))
        return out


def _square_grid(n: int) -> tuple[int, int]:
    side = round(n ** 0.5)
    return (side, side) if side * side == n else (1, n)


# --------------------------------------------------------------------------------------------------
# Model-level conveniences
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_signals(loaded, batch, layers: Iterable[int] | None = None,
                      spatial_layers: Sequence[int] | None = None) -> list[AttentionSignals]:
    """Attention signals of an encoded batch from one prompt forward pass (SDPA stays on)."""
    recorder = SharpnessRecorder.for_batch(loaded.adapter, batch, layers)
    with attention_hooks(loaded.adapter, recorder):
        loaded.model(**loaded.model_inputs(batch), logits_to_keep=1, use_cache=False)
    return recorder.signals(spatial_layers)
