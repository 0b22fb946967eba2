"""The aggregate of a run's records: the SPEC metrics (calibration, attention-confidence
correlations, causal accuracy drop, circuit) and the details the pictures need."""
from __future__ import annotations

from typing import Any

from vrp_eval.data import DataError
from vrp_eval.records import EngineState, ProbeSettings, SampleRecord


def _nanmean(values) -> float:
    import numpy as np

    values = np.asarray([v for v in values if v is not None], dtype=float)
    return float(values.mean()) if values.size else float("nan")


def _nanmean_columns(rows) -> list[float | None]:
    """The per-layer mean of several per-layer lists, None where every value is None."""
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
    counts = np.isfinite(values).sum(0)
    sums = np.nansum(values, 0)
    return [float(s / c) if c else None for s, c in zip(sums, counts)]


def _proxy_details(records: list[SampleRecord], settings: ProbeSettings,
                   state: EngineState | None) -> dict[str, Any]:
    """The proxy's curves, circuit and integration layer, and with exact tracing in the same run its
    agreement with the exact engine (vrp_eval.proxy; docs/signals.md, "Fast proxy of causal tracing")."""
    import numpy as np

    from vrp_eval.proxy import agreement, proxy_window
    from vrp_eval.tracing import integration_layer, window_width

    curves = {g: np.array([r.ie_proxy[g] for r in records], dtype=float).mean(0).tolist() for g in records[0].ie_proxy}
    num_layers = len(next(iter(curves.values())))
    width = window_width(num_layers, settings.window)
    window = proxy_window(curves["last"], width) if "last" in curves and width <= num_layers else None
    details: dict[str, Any] = {"ie_proxy_curves": curves, "proxy_circuit_layers": list(window) if window else None}
    if "last" in curves and "image" in curves:
        details["proxy_integration_layer"] = integration_layer(curves["last"], curves["image"])
    if all(r.ie is not None for r in records):
        found = agreement([r.ie_proxy for r in records], [r.ie for r in records], groups=list(curves))
        details["proxy_per_layer_pearson"] = found.pop("per_layer_pearson")
        exact = {g: np.array([r.ie[g] for r in records], dtype=float).mean(0) for g in curves}
        exact_window = proxy_window(exact["last"], width) if "last" in exact and width <= num_layers else None
        details["ie_rise_layers"] = list(exact_window) if exact_window else None
        found["circuit_equal"] = float(window is not None and exact_window == window)
        if state is not None and state.circuit is not None:
            found["knockout_circuit_equal"] = float(window is not None and tuple(state.circuit) == tuple(window))
        if "proxy_integration_layer" in details:
            found["integration_layer_equal"] = float(
                details["proxy_integration_layer"] == integration_layer(exact["last"], exact["image"]))
        details["proxy_agreement"] = found
    return details


def aggregate(records: list[SampleRecord], settings: ProbeSettings,
              state: EngineState | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Aggregate metrics (SPEC names) and the details needed for pictures."""
    import numpy as np

    from vrp_eval import statistics
    from vrp_eval.calibration import calibration_summary

    if not records:
        raise DataError("no sample was evaluated: nothing to aggregate")
    confidences = [r.confidence for r in records]
    scores = [r.score for r in records]
    calibration = calibration_summary(confidences, scores, n_bins=settings.n_bins,
                                      n_bootstrap=settings.n_bootstrap, seed=settings.seed)
    bins = calibration.pop("bins")
    metrics: dict[str, Any] = {"accuracy": float(np.mean(scores)), "n_samples": len(records),
                               "mean_confidence": float(np.mean(confidences)), **calibration}
    metrics["n_samples"] = len(records)
    details: dict[str, Any] = {"reliability_bins": bins}
    if all(r.sharpness is not None for r in records):
        metrics.update(statistics.attention_confidence_summary(
            [r.sharpness for r in records], confidences, scores, n_bootstrap=settings.n_bootstrap,
            seed=settings.seed))
        metrics["mean_sharpness"] = _nanmean(r.sharpness for r in records)
        metrics["mean_image_attention_mass"] = _nanmean(r.image_attention_mass for r in records)
        per_layer = np.array([r.sharpness_per_layer for r in records], dtype=float)
        details["sharpness_per_layer"] = per_layer.mean(0).tolist()
    if all(r.ie is not None for r in records):
        ie_mean = {g: np.array([r.ie[g] for r in records], dtype=float).mean(0).tolist() for g in records[0].ie}
        details["ie_curves"] = ie_mean
        normalised = [r.nie for r in records if r.nie is not None]
        details["n_nie"] = len(normalised)
        if normalised:  # the mean NIE per layer over the samples whose corruption took enough to divide by
            details["nie_curves"] = {g: _nanmean_columns([n[g] for n in normalised]) for g in normalised[0]}
        details["p_clean"] = _nanmean(r.p_clean for r in records)
        details["p_corrupted"] = _nanmean(r.p_corrupted for r in records)
        if "last" in ie_mean and "image" in ie_mean:
            from vrp_eval.tracing import integration_layer

            metrics["integration_layer"] = integration_layer(ie_mean["last"], ie_mean["image"])
    if all(r.ie_proxy is not None for r in records):
        details.update(_proxy_details(records, settings, state))
    if state is not None and state.circuit is not None:
        discovery = [r for r in records if r.knockout_scores is not None]
        clean_disc = float(np.mean([r.score for r in discovery]))
        knock = np.array([r.knockout_scores for r in discovery], dtype=float).mean(0)
        details["knockout_curve"] = [
            {"window": list(w), "accuracy": float(a), "drop": float(a / clean_disc - 1) if clean_disc else None}
            for w, a in zip(state.windows, knock)]
        metrics["circuit_layers"] = list(state.circuit)
        metrics["control_layers"] = list(state.control)
        heldout = [r for r in records if r.corrupted_score is not None]
        if heldout:
            clean = [r.score for r in heldout]
            metrics.update(statistics.causal_drop_summary(clean, [r.corrupted_score for r in heldout],
                                                          prefix="causal_acc_drop", n_bootstrap=settings.n_bootstrap,
                                                          seed=settings.seed))
            control = statistics.causal_drop_summary(clean, [r.control_score for r in heldout],
                                                     prefix="control_acc_drop", n_bootstrap=settings.n_bootstrap,
                                                     seed=settings.seed)
            metrics.update({k: v for k, v in control.items() if k.startswith("control_acc_drop")})
            metrics["n_heldout"] = len(heldout)
            if all(r.sharpness_corrupted is not None for r in heldout):
                metrics["sharpness_heldout_clean"] = _nanmean(r.sharpness for r in heldout)
                metrics["sharpness_heldout_corrupted"] = _nanmean(r.sharpness_corrupted for r in heldout)
    from vrp_eval.signal_comparison import compare_signals

    circuit = state.circuit if state is not None else None
    if circuit is None and details.get("proxy_circuit_layers"):  # proxy mode: the proxy's own window
        circuit = tuple(details["proxy_circuit_layers"])
    table = compare_signals(records, circuit=circuit,
                            n_noise=settings.n_noise if settings.noise == "gaussian" else 1,
                            n_bootstrap=settings.n_bootstrap, seed=settings.seed,
                            seconds_per_sample=state.seconds_per_sample() if state is not None else None)
    if table is not None:
        details["signal_comparison"] = table
    return metrics, details
