"""vrp-eval: the VLM Reliability Probe.

    from vrp_eval import load_model, run_probe, ProbeSettings
    loaded = load_model("tiny-llava")                     # or a Hub id / local folder
    report = run_probe(loaded, ProbeSettings(limit=64))
    report.metrics["ece"], report.records[0].confidence
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "vrp_eval.loading",
    "LoadedModel": "vrp_eval.loading",
    "ProbeSettings": "vrp_eval.records",
    "SampleRecord": "vrp_eval.records",
    "run_probe": "vrp_eval.probe",
    "load_examples": "vrp_eval.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    # Lazy so that `import vrp_eval` (and `vrp-eval --help`) does not pay for torch / transformers.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vrp_eval' has no attribute {name!r}")
