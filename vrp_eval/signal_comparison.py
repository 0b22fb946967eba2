"""Which reliability signal predicts errors, and what it costs: every per-sample signal of a run,
scored on the held-out half (docs/signals.md, "Which signal predicts errors").

The study behind vrp-eval ranks four interpretability approaches by hand (attention visualisation
"misleading", gradient saliency "moderate", causal tracing "strong", probing classifiers "weak").
Here each signal is measured on the same held-out samples of one run:

- **AUROC** for telling wrong answers from right ones (a score below 0.5 is wrong,
  `selective.wrong`), with the signal's orientation (`higher_means`) fixed below, before any data is
  seen: an AUROC under 0.5 says the signal points the other way than it claims;
- **AURC** of selective answering (answer the samples the signal trusts most first; loss 1 - score),
  and **E-AURC**, its gap to the best possible ordering;
- **Spearman with overconfidence** max(0, confidence - score): the oriented signal (higher = "more
  likely wrong") against how overconfident the answer is;
- each with a paired percentile bootstrap CI (the same resamples for every signal and statistic);
- **cost**: forward-pass equivalents per sample beyond answering, counted where the work is done
  (`SampleRecord.cost`: the tracing engine's own counter, 3 for a forward + backward), and the
  measured seconds per sample of the run (`EngineState.seconds`; absent when the records come from
  elsewhere, e.g. a harness log or a resumed run's earlier batches).

Only the held-out half is scored, because the probing classifier is trained on the discovery half
(one logistic probe per layer on the last prompt position's state, the layer chosen by
cross-validated AUROC on the discovery half) and the circuit whose IE is a signal is chosen there.
Pure functions of the records: the run's aggregation and any reader of samples.jsonl call the same code.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vrp_eval.records import SampleRecord
from vrp_eval.selective import (
    DEFAULT_WRONG_THRESHOLD,
    orient,
    risk_coverage,
    selective_summary,
)
from vrp_eval.statistics import UndefinedStatisticWarning, bootstrap_ci, overconfidence

#: Points kept of each risk-coverage curve in results.json (the picture needs no more).
CURVE_POINTS = 101
#: Folds of the probing classifier's layer choice on the discovery half (fewer when a class is rarer).
PROBE_FOLDS = 5


@dataclass(frozen=True)
class Signal:
    """One per-sample signal: where it comes from, what it claims, what the study said of its kind."""

    name: str
    label: str
    higher_means: str  # "right" or "wrong": the claim, fixed before looking at the data
    signal: str | None  # the `--signals` entry that computes it (None: always there)
    cost_key: str | None  # the SampleRecord.cost / EngineState.seconds entry it pays for (None: free with the answer)
    study: str | None = None  # the study's qualitative verdict on this kind of signal
    needs_circuit: bool = False


#: The compared signals, in table order. Orientations: a confidence, a margin, a consistency, a
#: probe's P(correct), attention on / sharp over the image, concentrated saliency and a large causal
#: effect of the image all claim a right answer; a diffuse (high-entropy) attention map claims a wrong one.
SIGNALS: tuple[Signal, ...] = (
    Signal("confidence", "answer confidence", "right", None, None),
    Signal("attention_sharpness", "attention sharpness", "right", "attention", None, "misleading"),
    Signal("image_attention_mass", "attention mass on the image", "right", "attention", None, "misleading"),
    Signal("spatial_entropy", "spatial entropy of attention", "wrong", "structural", None, "misleading"),
    Signal("logit_lens_margin", "logit-lens margin (own answer, layer mean)", "right", "logit_lens", "logit_lens"),
    Signal("self_consistency", "self-consistency", "right", "consistency", "consistency"),
    Signal("gradient_saliency", "gradient saliency concentration", "right", "saliency", "saliency", "moderate"),
    Signal("probing_classifier", "probing classifier P(correct)", "right", "probing", "probing", "weak"),
    Signal("ie_circuit", "IE of the image at the circuit", "right", "tracing", "tracing", "strong",
           needs_circuit=True),
    Signal("p_clean_minus_corrupted", "p_clean - p_corrupted", "right", "tracing", "p_gap", "strong"),
    Signal("ie_proxy_circuit", "proxy (attribution patching) IE at circuit", "right", "proxy", "proxy",
           needs_circuit=True),
)
SIGNAL_NAMES = tuple(s.name for s in SIGNALS)


def _logit_lens(record: SampleRecord) -> float | None:
    margins = record.logit_lens_margin_predicted
    values = [m for m in (margins or []) if m is not None and math.isfinite(m)]
    return float(np.mean(values)) if values else None


def _ie_circuit(record: SampleRecord, circuit: Sequence[int] | None, ie: dict[str, list[float]] | None = None,
                ) -> float | None:
    ie = record.ie if ie is None else ie
    if ie is None or circuit is None or "image" not in ie:
        return None
    values = [ie["image"][layer] for layer in range(circuit[0], circuit[1] + 1)]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def _p_gap(record: SampleRecord) -> float | None:
    if record.p_clean is None or record.p_corrupted is None:
        return None
    return record.p_clean - record.p_corrupted


_READERS: dict[str, Callable[[SampleRecord, Any], float | None]] = {
    "confidence": lambda r, circuit: r.confidence,
    "attention_sharpness": lambda r, circuit: r.sharpness,
    "image_attention_mass": lambda r, circuit: r.image_attention_mass,
    "spatial_entropy": lambda r, circuit: r.spatial_entropy,
    "logit_lens_margin": lambda r, circuit: _logit_lens(r),
    "self_consistency": lambda r, circuit: r.self_consistency,
    "gradient_saliency": lambda r, circuit: r.saliency,
    "ie_circuit": _ie_circuit,
    "p_clean_minus_corrupted": lambda r, circuit: _p_gap(r),
    "ie_proxy_circuit": lambda r, circuit: _ie_circuit(r, circuit, r.ie_proxy) if r.ie_proxy is not None else None,
}


# --------------------------------------------------------------------------- the probing classifier


def fit_probe(discovery: Sequence[SampleRecord], heldout: Sequence[SampleRecord], *, seed: int = 0,
              threshold: float = DEFAULT_WRONG_THRESHOLD) -> tuple[list[float] | None, dict[str, Any]]:
    """A logistic probe per layer on `probe_features`, trained to predict a right answer (score >=
    `threshold`) on the discovery half; the layer with the best cross-validated AUROC there is refit
    on the whole discovery half and scores the held-out half. Returns (P(right) per held-out sample,
    or None when the discovery half cannot train a probe; a dict saying which layer and why)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = [r for r in discovery if r.probe_features is not None]
    if not train or not heldout or any(r.probe_features is None for r in heldout):
        return None, {"reason": "no probing features (signal `probing` off, or no discovery / held-out sample)"}
    x = np.asarray([r.probe_features for r in train], dtype=float)  # (n, L, k)
    y = np.asarray([r.score >= threshold for r in train], dtype=int)
    folds = min(PROBE_FOLDS, int(y.sum()), int((1 - y).sum()))
    if folds < 2:
        return None, {"reason": f"the discovery half has {int(y.sum())} right and {int((1 - y).sum())} wrong "
                                "answers; a probe needs at least 2 of each"}

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    layer_auroc = []
    for layer in range(x.shape[1]):
        predicted = np.zeros(len(y))
        for fit_rows, test_rows in splitter.split(x[:, layer], y):
            predicted[test_rows] = model().fit(x[fit_rows, layer], y[fit_rows]).predict_proba(
                x[test_rows, layer])[:, 1]
        layer_auroc.append(float(roc_auc_score(y, predicted)))
    best = int(np.argmax(layer_auroc))  # the first of equal layers
    probe = model().fit(x[:, best], y)
    test = np.asarray([r.probe_features[best] for r in heldout], dtype=float)
    info = {"layer": best, "cv_auroc": layer_auroc, "folds": folds, "n_train": len(y)}
    return probe.predict_proba(test)[:, 1].tolist(), info


# --------------------------------------------------------------------------- the table


def _spearman_rows(x: np.ndarray, y: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Spearman rho of each resampled row (average ranks within the row); NaN where constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x[indices], axis=1), rankdata(y[indices], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(1) / denominator, np.nan)


def _curve(confidence: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    coverage, risk = risk_coverage(confidence, scores)
    keep = np.unique(np.linspace(0, len(coverage) - 1, min(CURVE_POINTS, len(coverage))).round().astype(int))
    return {"coverage": coverage[keep].tolist(), "risk": risk[keep].tolist()}


def _mean_cost(records: Sequence[SampleRecord], key: str | None) -> float | None:
    if key is None:
        return 0.0
    values = [(r.cost or {}).get(key) for r in records]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def compare_signals(records: Sequence[SampleRecord], *, circuit: Sequence[int] | None = None, n_noise: int = 1,
                    n_bootstrap: int = 1000, seed: int = 0, threshold: float = DEFAULT_WRONG_THRESHOLD,
                    seconds_per_sample: Mapping[str, float] | None = None) -> dict[str, Any] | None:
    """The signal table of a run's records (None when the held-out half has fewer than 2 samples).

    `circuit`: the run's circuit (first, last layer), for the IE-at-the-circuit signal; `n_noise`: K,
    for the cost of p_clean - p_corrupted (K corrupted prompt passes; the clean one is the answer's);
    `seconds_per_sample`: measured wall seconds per signal (`EngineState.seconds_per_sample`). A signal that is
    missing on any held-out sample is left out of the table (`left_out` says why), so every row is
    scored on the very same samples."""
    discovery = [r for r in records if r.half == "discovery"]
    heldout = [r for r in records if r.half == "heldout"]
    if len(heldout) < 2:
        return None
    scores = np.asarray([r.score for r in heldout], dtype=float)
    values: dict[str, list[float | None]] = {}
    left_out: dict[str, str] = {}
    probe_info: dict[str, Any] = {}
    for spec in SIGNALS:
        if spec.name == "probing_classifier":
            column, probe_info = fit_probe(discovery, heldout, seed=seed, threshold=threshold)
            if column is None:
                if any(r.probe_features is not None for r in records):
                    left_out[spec.name] = probe_info["reason"]
                continue
        else:
            column = [_READERS[spec.name](r, circuit) for r in heldout]
            if all(v is None for v in column):
                continue  # not computed in this run
        missing = sum(v is None or not math.isfinite(v) for v in column)
        if missing:
            left_out[spec.name] = f"undefined on {missing} of {len(heldout)} held-out samples"
            continue
        values[spec.name] = column
    if not values:
        return None
    higher_means_wrong = {name: next(s for s in SIGNALS if s.name == name).higher_means == "wrong" for name in values}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedStatisticWarning)  # NaN says it in the table
        summary = selective_summary(values, scores, higher_means_wrong, threshold=threshold,
                                    n_bootstrap=n_bootstrap, seed=seed)
    over = overconfidence([r.confidence for r in heldout], scores)
    n = len(heldout)
    rows = []
    for spec in SIGNALS:
        if spec.name not in values:
            continue
        wrongness = orient(values[spec.name], spec.higher_means)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedStatisticWarning)
            rho = float(_spearman_rows(wrongness, over, np.arange(n)[None])[0])
            low, high = bootstrap_ci(lambda idx, w=wrongness: _spearman_rows(w, over, idx), n,
                                     n_bootstrap=n_bootstrap, seed=seed, what=f"spearman of {spec.name}")
        if spec.cost_key == "p_gap":
            # K corrupted prompt passes; the clean one is the answer's own prefill
            passes = float(n_noise) if any(r.p_clean is not None for r in heldout) else None
            seconds = None  # part of the trace's seconds
        else:
            passes = _mean_cost(heldout, spec.cost_key)
            seconds = 0.0 if spec.cost_key is None else (seconds_per_sample or {}).get(spec.cost_key)
        rows.append({"name": spec.name, "label": spec.label, "higher_means": spec.higher_means,
                     "study": spec.study, **summary[spec.name],
                     "spearman_overconfidence": rho, "spearman_overconfidence_ci_low": low,
                     "spearman_overconfidence_ci_high": high,
                     "passes": passes, "seconds": seconds,
                     "curve": _curve(-wrongness, scores)})
    return {"rule": f"wrong: score < {threshold:g}", "half": "heldout", "n": n,
            "n_wrong": int((scores < threshold).sum()), "oracle_aurc": rows[0]["oracle_aurc"],
            "oracle_curve": _curve(scores, scores),
            "probing": {k: v for k, v in probe_info.items() if k != "reason"} or None,
            "left_out": left_out, "signals": rows}


def _fmt(value: Any, spec: str = ".3f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def format_signal_table(table: dict[str, Any]) -> str:
    """The table as the report prints it (from `compare_signals` or a results file's details)."""
    lines = [(f"Which signal predicts errors (held-out half, n={table['n']}, {table['n_wrong']} wrong; "
             f"{table['rule']}; oracle AURC {_fmt(table['oracle_aurc'])})"),
             (f"  {'signal':<42} {'study':<10} {'AUROC [95% CI]':<22} {'E-AURC':>7} {'rho(overconf)':>13} "
             f"{'passes':>7}")]
    for row in table["signals"]:
        ci = f"[{_fmt(row['auroc_ci_low'], '.2f')}, {_fmt(row['auroc_ci_high'], '.2f')}]"
        lines.append(f"  {row['label']:<42} {row['study'] or '':<10} {_fmt(row['auroc']):>5} {ci:<16} "
                     f"{_fmt(row['e_aurc']):>7} {_fmt(row['spearman_overconfidence']):>13} "
                     f"{_fmt(row['passes'], '.1f'):>7}")
    for name, why in table["left_out"].items():
        lines.append(f"  (left out: {name}: {why})")
    return "\n".join(lines)
