"""vrp-eval: the VLM Reliability Probe."""
__version__ = "0.1.0"
