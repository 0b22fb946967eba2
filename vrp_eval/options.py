"""The probe's options, each written once: name, type, default, accepted range and help.

`ProbeSettings` takes its defaults from here and validates every field through `Option.parse`; the
`vrp-eval run` flags are generated from the table (`add_arguments`); the lmms-eval `vrp` and lm-eval
`vrp-lm` model arguments are parsed by the same `Option.parse`. So one bad value gets one message,
wherever it came from, naming the option, the value and what is accepted, before any model is
loaded or any pass runs.

    from vrp_eval.options import OPTIONS, option
    option("n_noise").parse("0")   # OptionError: n_noise (--n-noise) = '0': must be an integer >= 1 ...
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vrp_eval.calibration import DEFAULT_N_BINS, DEFAULT_N_BOOTSTRAP
from vrp_eval.errors import VrpError

#: Per-sample signals a run can compute; `signals=` (empty) answers and scores only (the probe is off).
SIGNALS = ("attention", "structural", "tracing", "circuit", "logit_lens", "consistency", "saliency", "probing",
           "proxy")
DEFAULT_SIGNALS = ("attention", "structural", "tracing", "circuit", "logit_lens", "saliency", "probing")
CONFIDENCE_KINDS = ("product", "first_token", "length_norm", "option")
NOISE_KINDS = ("gaussian", "mean", "zero")
# lmms-eval's VQAv2 / OK-VQA prompts end with this line; the default prompt uses it too so that
# `vrp-eval run` and `lmms-eval --model vrp` score the very same token sequences.
DEFAULT_POST_PROMPT = "\nAnswer the question using a single word or phrase."


class OptionError(VrpError, ValueError):
    """A probe option with a value it does not accept; the message names the option, the value and the range."""


@dataclass(frozen=True)
class Option:
    """One probe option. kind: int | float | str | choice | choices (a list of choices) | layers."""

    name: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    optional: bool = False  # None is accepted (it means "automatic" / "all", as `help` says)
    choices: tuple[str, ...] = ()
    cli: bool = True  # a `vrp-eval run` flag

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def accepted(self) -> str:
        """What the option accepts, in words."""
        if self.kind in ("int", "float"):
            text = "an integer" if self.kind == "int" else "a finite number"
            text += f" >= {self.minimum:g}" if self.minimum is not None else ""
        elif self.kind == "choice":
            text = "one of " + ", ".join(self.choices)
        elif self.kind == "choices":
            text = "a comma-separated list (possibly empty) of " + ", ".join(self.choices)
        elif self.kind == "layers":
            text = "decoder layer indices >= 0 as a list or a spec such as '0-7' or '2,4,6-9'"
        else:
            text = "a non-empty string"
        return text + (" (or none)" if self.optional else "")

    def _fail(self, value: Any, why: str = "") -> OptionError:
        where = f"{self.name} ({self.flag})" if self.cli else self.name
        error = OptionError(f"{where} = {value!r}: {why or 'must be ' + self.accepted()}.")
        error.detail = f"{value!r}: {why or 'must be ' + self.accepted()}"  # argparse names the flag itself
        return error

    def parse(self, value: Any) -> Any:
        """`value` (text from a command line or a harness, or a Python value) as this option's type;
        OptionError if it is not accepted. Idempotent: parse(parse(x)) == parse(x)."""
        raw = value
        if isinstance(value, str):
            if self.kind != "str":  # free text (a prompt) keeps its whitespace
                value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
        if value is None or (self.optional and isinstance(value, str) and value.lower() in ("", "none", "auto")):
            if self.optional:
                return None
            raise self._fail(raw)
        if self.kind == "int":
            try:
                number = int(value) if not isinstance(value, float) or value.is_integer() else None
            except (TypeError, ValueError):
                number = None
            if number is None or isinstance(value, bool) or (self.minimum is not None and number < self.minimum):
                raise self._fail(raw)
            return number
        if self.kind == "float":
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise self._fail(raw) from None
            if isinstance(value, bool) or not math.isfinite(number) or (self.minimum is not None and number < self.minimum):
                raise self._fail(raw)
            return number
        if self.kind == "choice":
            if value not in self.choices:
                raise self._fail(raw)
            return value
        if self.kind == "choices":
            items = _items(value)
            unknown = [item for item in items if item not in self.choices]
            if unknown:
                raise self._fail(raw, f"unknown {', '.join(map(repr, unknown))}; must be {self.accepted()}")
            return tuple(dict.fromkeys(items))
        if self.kind == "layers":
            return self._layers(raw, value)
        if not isinstance(value, str) or not value:
            raise self._fail(raw)
        return value

    def _layers(self, raw: Any, value: Any) -> tuple[int, ...]:
        layers: list[int] = []
        if isinstance(value, str):  # '0-3,7', and from harness arguments also '[2,3,5]' or '2;3;5'
            parts = value.strip("[]()").replace(";", ",").replace("+", ",").split(",")
        else:
            parts = list(value) if isinstance(value, Sequence) else [value]
        for part in parts:
            text = str(part).strip()
            if not text:
                continue
            first, dash, last = text.partition("-")
            try:
                span = (int(first), int(last)) if dash else (int(first), int(first))
            except ValueError:
                raise self._fail(raw, f"{text!r} is not a layer index or a range like '2-5'") from None
            if span[0] < 0 or span[1] < span[0]:
                raise self._fail(raw, f"{text!r} is not a range of layer indices (first <= last, both >= 0)")
            layers.extend(range(span[0], span[1] + 1))
        if not layers:
            raise self._fail(raw, "names no layer; leave the option out to trace every layer")
        return tuple(sorted(set(layers)))


def _items(value: Any) -> list[str]:
    if isinstance(value, str):
        items = value.strip("[]()").replace(";", ",").replace("+", ",").replace(" ", ",").split(",")
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = [str(v) for v in value]
    else:
        items = [str(value)]
    return [item.strip() for item in items if item.strip()]


OPTIONS: tuple[Option, ...] = (
    Option("dataset", "str", "vrp-synth", "vrp-synth | vrp-synth-mc | a local parquet/json/save_to_disk path | "
                                         "a Hub dataset id"),
    Option("split", "str", "validation", "dataset split"),
    Option("limit", "int", None, "evaluate only the first N samples (default: all)", minimum=1, optional=True),
    Option("batch_size", "int", 16, "samples per forward pass", minimum=1),
    Option("max_new_tokens", "int", 8, "longest answer, in tokens", minimum=1),
    Option("post_prompt", "str", DEFAULT_POST_PROMPT, "text appended to each question", cli=False),
    Option("confidence", "choice", "product", "which per-sample confidence calibration uses (multiple choice: option)",
           choices=CONFIDENCE_KINDS),
    Option("mc_scoring", "choice", "likelihood",
           "multiple choice: score each option's text by its log-likelihood after the question (as lm-eval's "
           "multiple-choice tasks do; confidence = softmax over the options), or read the option letter the "
           "letter prompt asks for (softmax over the letters at the first answer position)",
           choices=("likelihood", "letter")),
    Option("n_bins", "int", DEFAULT_N_BINS, "calibration bins (ECE, MCE; ACE groups)", minimum=1),
    Option("n_bootstrap", "int", DEFAULT_N_BOOTSTRAP, "bootstrap resamples for confidence intervals (0: no intervals)", minimum=0),
    Option("seed", "int", 0, "seed of the noise, the bootstrap and the discovery / held-out split", minimum=0),
    Option("on_bad_image", "choice", "error", "a sample whose image does not decode: stop with an error, or skip it "
                                              "(counted in n_skipped)", choices=("error", "skip")),
    Option("signals", "choices", DEFAULT_SIGNALS, "per-sample signals; empty (`--signals ''`) turns the probe off "
                                                  "and only answers and calibration are computed "
                                                  "(consistency samples K answers and is off by default)",
           choices=SIGNALS),
    Option("layers", "layers", None, "decoder layers to trace, e.g. '0-7' or '2,4,6-9' (default: all)", optional=True),
    Option("window", "int", None, "knockout window width in layers (default: ceil(L/4))", minimum=1, optional=True),
    Option("noise", "choice", "gaussian", "corruption of the image embeddings", choices=NOISE_KINDS),
    Option("noise_scale", "float", 3.0, "k: gaussian std = k * sigma", minimum=0),
    Option("n_noise", "int", 5, "K noise samples per input (mean and zero noise are deterministic: 1)", minimum=1),
    Option("n_calibration", "int", 64, "at most this many samples estimate sigma (fewer if the run has fewer)",
           minimum=1),
    Option("consistency_k", "int", 10, "answers sampled per input for self-consistency", minimum=2),
)
_BY_NAME = {o.name: o for o in OPTIONS}
DEFAULTS: dict[str, Any] = {o.name: o.default for o in OPTIONS}


def option(name: str) -> Option:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise OptionError(f"unknown probe option {name!r}; the options are {', '.join(_BY_NAME)}") from None


def add_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """One `--flag` per CLI option, parsed by `Option.parse` (argparse reports its message, exit code 2)."""
    for opt in OPTIONS:
        if not opt.cli:
            continue

        def parse(text: str, opt: Option = opt) -> Any:
            try:
                return opt.parse(text)
            except OptionError as error:
                raise argparse.ArgumentTypeError(error.detail) from None

        default = ",".join(opt.default) if opt.kind == "choices" else opt.default
        parser.add_argument(opt.flag, dest=opt.name, type=parse, default=opt.parse(default) if default is not None else None,
                            metavar=opt.name.upper() if opt.kind not in ("choice",) else "{" + ",".join(opt.choices) + "}",
                            help=opt.help + ("" if default is None else f" (default: {default!r})")
                            + f"; accepts {opt.accepted()}")
