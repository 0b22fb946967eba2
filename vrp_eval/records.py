"""What a run is and what it writes: the probe settings, the per-sample record, the run-wide engine
state, the discovery / held-out split and the per-sample scoring of an answer.

Nothing here touches a model: the harness glue, the results readers and the aggregation import it
without torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import TYPE_CHECKING, Any

from vrp_eval.data import Example
from vrp_eval.options import OPTIONS

if TYPE_CHECKING:
    from vrp_eval.generation import AnswerOutput


class _SettingsMethods:
    def __post_init__(self) -> None:
        for opt in OPTIONS:
            setattr(self, opt.name, opt.parse(getattr(self, opt.name)))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


_ANNOTATIONS = {"str": "str", "int": "int", "float": "float", "choice": "str", "choices": "tuple[str, ...]",
                "layers": "tuple[int, ...]"}

#: Everything that changes a run's numbers (recorded in results.json and checked on resume): one field
#: per probe option of `vrp_eval.options.OPTIONS`, in its order, with its default; every field is
#: validated and normalised on creation (`Option.parse`). The options table is the only place an option
#: is written: name, type, default, range and help text.
ProbeSettings = make_dataclass(
    "ProbeSettings",
    [(opt.name, _ANNOTATIONS[opt.kind] + (" | None" if opt.optional or opt.default is None else ""),
      field(default=opt.default)) for opt in OPTIONS],
    bases=(_SettingsMethods,),
)
ProbeSettings.__module__ = __name__  # for pickling and repr (make_dataclass takes `module=` only from 3.12)
ProbeSettings.__doc__ = (
    "Everything that changes a run's numbers: one field per option of `vrp_eval.options.OPTIONS` "
    "(name, type, default and range written once there), validated and normalised on creation.")


@dataclass
class SampleRecord:
    """One line of samples.jsonl."""

    question_id: Any
    question: str
    answer: str
    score: float
    confidence: float
    confidence_product: float
    confidence_first_token: float
    confidence_length_norm: float
    token_probs: list[float]
    reference: str
    kind: str
    option_probs: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    reliability: float | None = None
    overconfidence: float | None = None
    half: str | None = None  # discovery | heldout
    # attention (clean run)
    sharpness: float | None = None
    sharpness_per_layer: list[float] | None = None
    image_attention_mass: float | None = None
    image_attention_mass_per_layer: list[float] | None = None
    spatial_entropy: float | None = None  # of the layer-averaged map (the source's H_s)
    spatial_entropy_layer_mean: float | None = None  # mean of the per-layer entropies
    spatial_entropy_per_layer: list[float] | None = None
    d_spatial_entropy: list[float] | None = None
    cluster_count: int | None = None
    token_confidence: float | None = None
    logit_lens_margin: list[float] | None = None  # truth margin: the reference answer's first token
    logit_lens_margin_predicted: list[float] | None = None  # the model's own first token
    self_consistency: float | None = None
    saliency: float | None = None  # concentration of input x gradient over the image tokens (vrp_eval.saliency)
    probe_features: list[list[float]] | None = None  # per layer: the last prompt position's state (companions.probe_features)
    # per signal: forward-pass equivalents it cost this sample, counted where the work is done (the
    # measured seconds are run-wide, `EngineState.seconds`: a record holds only what a rerun reproduces)
    cost: dict[str, float] | None = None
    # causal tracing
    p_clean: float | None = None
    p_corrupted: float | None = None
    ie: dict[str, list[float]] | None = None
    nie: dict[str, list[float | None]] | None = None  # IE / (p_clean - p_corrupted); None: no meaningful gap
    # fast proxy of causal tracing (signal `proxy`, vrp_eval.proxy): attribution-patching IE, same noise
    ie_proxy: dict[str, list[float]] | None = None
    p_corrupted_proxy: float | None = None  # p_corrupted over the proxy's noise samples (the first K')
    # circuit (discovery half: knockout; held-out half: corrupted and control runs)
    knockout_scores: list[float] | None = None
    corrupted_answer: str | None = None
    corrupted_score: float | None = None
    control_answer: str | None = None
    control_score: float | None = None
    sharpness_corrupted: float | None = None

    def to_json(self) -> str:
        return _dumps(asdict(self))


def _dumps(row: dict[str, Any]) -> str:
    """Strict JSON (NaN, e.g. the IE of untraced layers, becomes null)."""
    from vrp_eval.results import to_jsonable

    return json.dumps(to_jsonable(row), allow_nan=False)


def score_answer(example: Example, answer: str) -> float:
    """The task's own per-sample score in [0, 1]."""
    from vrp_eval import vqa

    if example.kind == "vqa":
        return vqa.vqa_accuracy(answer, example.answers)
    if example.kind == "mc":
        return float(vqa.option_match(answer, example.reference))
    return float(vqa.exact_match(answer, example.answers))


def score_output(example: Example, output: AnswerOutput, mc_scoring: str) -> float:
    """The per-sample score of an answer: a multiple-choice answer scored by likelihood is right when
    its option is the correct one; any other answer is scored by its text (`score_answer`)."""
    if example.kind == "mc" and mc_scoring == "likelihood" and output.option_index is not None:
        return float(output.option_index == example.answer_index)
    return score_answer(example, output.text)


def choose_confidence(output: AnswerOutput, kind: str, example: Example) -> float:
    if kind == "option" or (example.kind == "mc" and output.option_probs is not None):
        if output.option_probs is None:
            raise ValueError("confidence='option' needs multiple-choice data (choices + answer)")
        if output.option_index is not None:  # likelihood scoring: the chosen option's probability
            return list(output.option_probs.values())[output.option_index]
        from vrp_eval import vqa

        # The probability the model gives the option it chose; its top option if it named none.
        chosen = [letter for letter in output.option_probs if vqa.option_match(output.text, letter)]
        return output.option_probs[chosen[0]] if chosen else max(output.option_probs.values())
    return {"product": output.confidence, "first_token": output.first_token_prob,
            "length_norm": output.confidence_length_norm}[kind]


def half_of(question_id: Any, seed: int) -> str:
    """Discovery or held-out, from a hash of the sample id: independent of order, batching and sharding."""
    digest = hashlib.sha256(f"{seed}:{question_id}".encode()).digest()
    return "discovery" if digest[0] % 2 == 0 else "heldout"


@dataclass
class EngineState:
    """What the whole run shares: noise scales and (after the discovery pass) the circuit."""

    sigma: Any = None
    windows: list[tuple[int, int]] = field(default_factory=list)
    circuit: tuple[int, int] | None = None
    control: tuple[int, int] | None = None
    # wall seconds per signal summed over the batches this process ran, and how many samples they had
    seconds: dict[str, float] = field(default_factory=dict)
    timed_samples: int = 0

    def seconds_per_sample(self) -> dict[str, float] | None:
        return {k: v / self.timed_samples for k, v in self.seconds.items()} if self.timed_samples else None


def model_block(loaded: Any) -> dict[str, Any]:
    """What a results file, a harness payload and a model card say about the model."""
    from vrp_eval import __version__

    return {"model_name": loaded.model_name, "model_sha": loaded.model_sha, "model_dtype": loaded.dtype,
            "model_family": loaded.family, "model_num_parameters": loaded.num_parameters(),
            "vrp_eval_version": __version__}
