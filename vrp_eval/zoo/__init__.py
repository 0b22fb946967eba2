"""The tiny model zoo: small VLMs in real transformers classes, shipped as `save_pretrained` folders.

Zoo names are accepted wherever a model id is (`vrp-eval run --model tiny-qwen2vl`).
"""
from __future__ import annotations

from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent

#: zoo name -> family (see `vrp_eval.zoo.build.FAMILIES`)
ZOO: dict[str, str] = {
    "tiny-llava": "llava",
    "tiny-paligemma": "paligemma",
    "tiny-qwen2vl": "qwen2vl",
}

DEFAULT_MODEL = "tiny-llava"


def zoo_path(name: str) -> Path:
    """The folder of zoo model `name`; ValueError naming the zoo when it is not one."""
    if name not in ZOO:
        raise ValueError(f"{name!r} is not a zoo model; the zoo has {', '.join(sorted(ZOO))}")
    return ZOO_DIR / name


def is_zoo_name(name: str) -> bool:
    return name in ZOO
