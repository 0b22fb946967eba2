"""One loader for vision-language and text-only models, from Hub ids, local folders and zoo names.

    loaded = load_model("tiny-llava")                      # shipped zoo model
    loaded = load_model("llava-hf/llava-1.5-7b-hf", dtype="bfloat16", device_map="auto")
    loaded = load_model("/path/to/a/save_pretrained/folder")
    loaded = load_model("tiny-text-llama")                 # a text-only causal LM (zoo family "text")
    loaded = load_model("/path/to/a/causal/lm", text_only=True, subject_end=".")
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vrp_eval.adapters import SUBJECT_END, FamilyAdapter, TextAdapter, adapter_for
from vrp_eval.errors import VrpError
from vrp_eval.zoo import ZOO, is_text_model, is_zoo_name, rebuild_command, zoo_path

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(VrpError, RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    adapter: FamilyAdapter
    model_name: str
    model_path: str
    model_sha: str
    dtype: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def family(self) -> str:
        return self.adapter.family

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def model_inputs(self, batch) -> dict[str, Any]:
        """The model's forward arguments from an encoded batch, tensors on the model's device."""
        return {k: (v.to(self.device) if torch.is_tensor(v) else v)
                for k, v in self.adapter.model_inputs(batch).items()}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _weights_sha(folder: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def resolve_model(model_id: str, revision: str | None = None) -> tuple[str, str | None]:
    """(path or Hub id to pass to from_pretrained, local folder if any)."""
    if is_zoo_name(model_id):
        path = zoo_path(model_id)
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"zoo model {model_id!r} has no weights at {path}; build them with `{rebuild_command(model_id)}`"
            )
        return str(path), str(path)
    path = Path(model_id).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} exists but holds no config.json: is it a `save_pretrained` folder?")
        _check_json(path / "config.json")
        return str(path), str(path)
    if model_id.startswith((".", "/", "~")):
        raise ModelLoadError(f"no such model folder: {model_id}")
    return model_id, None


def _check_json(path: Path) -> None:
    """A local config file that is not JSON gets its own message (transformers reports it as missing)."""
    import json

    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error}); restore the file from the model's source "
                             "(`save_pretrained` writes it)") from None


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded onto it."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device}: no CUDA device is available here (torch.cuda.is_available() "
                                 "is False); use --device cpu, or leave --device out to pick one automatically")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelLoadError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                 f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {device}: MPS is not available here; use --device cpu")


def load_model(
    model_id: str | Path,
    *,
    device: str | None = None,
    dtype: str = "auto",
    device_map: str | dict | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    text_only: bool | None = None,
    subject_end: str = SUBJECT_END,
) -> LoadedModel:
    """Load a model and pick its adapter: a VLM with `AutoModelForImageTextToText` + `AutoProcessor`
    and the adapter of its family, or (`text_only`) a text-only causal LM with `AutoModelForCausalLM`
    + `AutoTokenizer` and a `TextAdapter`, whose subject sentence ends with `subject_end`.
    `text_only=None`: True for the zoo's text models, False otherwise."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    model_id = str(model_id)
    if text_only is None:
        text_only = is_text_model(model_id)
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_device(device)
    source, local = resolve_model(model_id, revision)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if local is None and _offline():
        common["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as error:
        hint = ("the Hub cannot be reached (HF_HUB_OFFLINE is set)" if _offline()
                else "it is neither a zoo name, a local folder, nor a reachable Hub model")
        raise ModelLoadError(
            f"cannot load model {model_id!r}: it is not in the local Hugging Face cache and {hint}. "
            f"Download it first on a machine with network (`hf download {model_id}`), pass a local "
            f"`save_pretrained` folder, or use a zoo model ({', '.join(sorted(ZOO))}). ({error.__class__.__name__})"
        ) from None
    except ValueError as error:
        raise ModelLoadError(f"cannot read the config of {model_id!r}: {error}") from None
    auto_model = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
    try:
        model = auto_model.from_pretrained(
            source, config=config, dtype=DTYPES[dtype], device_map=device_map,
            attn_implementation=attn_implementation, **common,
        )
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            what = ("a causal language model that AutoModelForCausalLM can load" if text_only else
                    "a vision-language model that AutoModelForImageTextToText can load; vrp-eval probes "
                    "image-text-to-text models such as LLaVA, PaliGemma and Qwen2-VL (text-only causal LMs "
                    "with text_only=True)")
            raise ModelLoadError(f"model type {config.model_type!r} ({type(config).__name__}) is not {what}.") from None
        raise
    processor = (AutoTokenizer if text_only else AutoProcessor).from_pretrained(source, **common)
    if device_map is None:
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    if local is not None:
        sha = _weights_sha(Path(local))
    else:
        sha = getattr(config, "_commit_hash", None) or "unknown"
    adapter = TextAdapter(model, processor, subject_end) if text_only else adapter_for(model, processor)
    loaded_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return LoadedModel(model=model, processor=processor, adapter=adapter,
                       model_name=model_id, model_path=source, model_sha=sha, dtype=loaded_dtype)
