"""The tiny model zoo: small models in real transformers classes, shipped as `save_pretrained` folders.

Zoo names are accepted wherever a model id is (`vrp-eval run --model tiny-qwen2vl`,
`load_model("tiny-text-llama")`). The VLMs are rebuilt with `vrp-eval train-tiny --family F`, the
text-only model with `python -m vrp_eval.zoo.build_text`.
"""
from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent

#: The family of the zoo's text-only causal LMs (the others are VLM families, `vrp_eval.zoo.build.FAMILIES`).
TEXT_FAMILY = "text"

#: zoo name -> family
ZOO: dict[str, str] = {
    "tiny-llava": "llava",
    "tiny-paligemma": "paligemma",
    "tiny-qwen2vl": "qwen2vl",
    "tiny-text-llama": TEXT_FAMILY,
}

DEFAULT_MODEL = "tiny-llava"


def zoo_path(name: str) -> Path:
    """The folder of zoo model `name`; ValueError naming the zoo when it is not one."""
    if name not in ZOO:
        raise ValueError(f"{name!r} is not a zoo model; the zoo has {', '.join(sorted(ZOO))}")
    return ZOO_DIR / name


def is_zoo_name(name: str) -> bool:
    return name in ZOO


def is_text_model(name: str) -> bool:
    """Whether `name` is one of the zoo's text-only causal LMs."""
    return ZOO.get(name) == TEXT_FAMILY


def rebuild_command(name: str) -> str:
    """The command that rebuilds zoo model `name`."""
    zoo_path(name)  # a zoo name
    if is_text_model(name):
        return "python -m vrp_eval.zoo.build_text"
    return f"vrp-eval train-tiny --family {ZOO[name]}"
