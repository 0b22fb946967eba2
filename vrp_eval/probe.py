"""Run the probe over a dataset: per-sample records, then the aggregate.

    from vrp_eval import load_model, ProbeSettings, run_probe
    loaded = load_model("tiny-llava")
    report = run_probe(loaded, ProbeSettings(dataset="vrp-synth", limit=64), output_dir="runs/x")
    report.metrics["accuracy"], report.records[0].confidence

Records are appended to `samples.jsonl` as each batch finishes, so an interrupted run resumes from
what it already wrote (same settings), and an error in one batch loses nothing computed before it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from vrp_eval.adapters import DEFAULT_POST_PROMPT
from vrp_eval.data import DataError, Example, load_examples, load_image
from vrp_eval.generation import AnswerOutput, generate_answers
from vrp_eval.loading import LoadedModel


@dataclass
class ProbeSettings:
    """Everything that changes a run's numbers (recorded in results.json and checked on resume)."""

    dataset: str = "vrp-synth"
    split: str = "validation"
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 8
    post_prompt: str = DEFAULT_POST_PROMPT
    confidence: str = "product"  # product | first_token | length_norm | option (MC default)
    n_bins: int = 15
    n_bootstrap: int = 1000
    seed: int = 0
    on_bad_image: str = "error"  # error | skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CONFIDENCE_KINDS = ("product", "first_token", "length_norm", "option")


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def score_answer(example: Example, answer: str) -> float:
    """The task's own per-sample score in [0, 1]."""
    from vrp_eval import vqa

    if example.kind == "vqa":
        return vqa.vqa_accuracy(answer, example.answers)
    if example.kind == "mc":
        return float(vqa.option_match(answer, example.reference))
    return float(vqa.exact_match(answer, example.answers))


def choose_confidence(output: AnswerOutput, kind: str, example: Example) -> float:
    if kind == "option" or (example.kind == "mc" and output.option_probs is not None):
        if output.option_probs is None:
            raise ValueError("confidence='option' needs multiple-choice data (choices + answer)")
        from vrp_eval import vqa

        # The probability the model gives the option it chose; its top option if it named none.
        chosen = [letter for letter in output.option_probs if vqa.option_match(output.text, letter)]
        return output.option_probs[chosen[0]] if chosen else max(output.option_probs.values())
    return {"product": output.confidence, "first_token": output.first_token_prob,
            "length_norm": output.confidence_length_norm}[kind]


def _batches(items: list[Example], size: int) -> Iterable[list[Example]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def answer_examples(loaded: LoadedModel, examples: list[Example], settings: ProbeSettings) -> list[SampleRecord]:
    """Greedy answers, confidences and scores for one batch."""
    adapter = loaded.adapter
    images = [load_image(e) for e in examples]
    prompts = [adapter.build_prompt(e.prompt_text(settings.post_prompt)) for e in examples]
    batch = adapter.encode(images, prompts)
    outputs = generate_answers(loaded, batch, max_new_tokens=settings.max_new_tokens,
                               option_letters=[e.option_letters for e in examples])
    records = []
    for example, output in zip(examples, outputs):
        records.append(SampleRecord(
            question_id=example.question_id, question=example.question, answer=output.text,
            score=score_answer(example, output.text),
            confidence=choose_confidence(output, settings.confidence, example),
            confidence_product=output.confidence, confidence_first_token=output.first_token_prob,
            confidence_length_norm=output.confidence_length_norm, token_probs=output.token_probs,
            reference=example.reference, kind=example.kind, option_probs=output.option_probs,
            meta=example.meta,
        ))
    return records


@dataclass
class ProbeReport:
    records: list[SampleRecord]
    metrics: dict[str, Any]
    details: dict[str, Any]
    skipped: list[Any]


def aggregate(records: list[SampleRecord], settings: ProbeSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Aggregate metrics (SPEC names) and the details needed for pictures."""
    from vrp_eval.calibration import calibration_summary

    if not records:
        raise DataError("no sample was evaluated: nothing to aggregate")
    confidences = [r.confidence for r in records]
    scores = [r.score for r in records]
    calibration = calibration_summary(confidences, scores, n_bins=settings.n_bins,
                                      n_bootstrap=settings.n_bootstrap, seed=settings.seed)
    bins = calibration.pop("bins")
    metrics: dict[str, Any] = {
        "accuracy": sum(scores) / len(scores),
        "n_samples": len(records),
        "mean_confidence": sum(confidences) / len(confidences),
        **calibration,
    }
    metrics["n_samples"] = len(records)
    return metrics, {"reliability_bins": bins}


def _resume(path: Path, run_key: dict[str, Any]) -> list[SampleRecord]:
    key_path = path.with_name("run_key.json")
    if not path.exists():
        key_path.write_text(json.dumps(run_key, indent=2, sort_keys=True))
        return []
    if not key_path.exists() or json.loads(key_path.read_text()) != run_key:
        raise DataError(
            f"{path.parent} holds a run with other settings; choose a new --output folder or pass "
            "--overwrite to start again"
        )
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(SampleRecord(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            # A line cut by an interrupted write: drop it and everything after, recompute those.
            break
    return records


def run_probe(
    loaded: LoadedModel,
    settings: ProbeSettings,
    output_dir: str | Path | None = None,
    examples: list[Example] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ProbeReport:
    """Answer, score and probe every example; append records to `output_dir/samples.jsonl`."""
    if settings.confidence not in CONFIDENCE_KINDS:
        raise ValueError(f"unknown confidence {settings.confidence!r}; choose one of {', '.join(CONFIDENCE_KINDS)}")
    if settings.batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {settings.batch_size}")
    examples = examples if examples is not None else load_examples(settings.dataset, settings.split, settings.limit)
    done: list[SampleRecord] = []
    sink = None
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        samples_path = output_dir / "samples.jsonl"
        if overwrite and samples_path.exists():
            samples_path.unlink()
        run_key = {"model": loaded.model_name, "model_sha": loaded.model_sha, "settings": settings.to_dict()}
        done = _resume(samples_path, run_key)
        samples_path.write_text("".join(r.to_json() + "\n" for r in done))
        sink = samples_path.open("a")
    finished = {r.question_id for r in done}
    todo = [e for e in examples if e.question_id not in finished]
    skipped: list[Any] = []
    records = list(done)
    bar = tqdm(total=len(examples), initial=len(done), desc=f"vrp-eval {loaded.model_name}",
               unit="sample", disable=not progress)
    try:
        for chunk in _batches(todo, settings.batch_size):
            size = len(chunk)
            if settings.on_bad_image == "skip":
                good = []
                for example in chunk:
                    try:
                        load_image(example)
                        good.append(example)
                    except DataError:
                        skipped.append(example.question_id)
                chunk = good
            new = answer_examples(loaded, chunk, settings) if chunk else []
            records.extend(new)
            if sink is not None:
                sink.write("".join(r.to_json() + "\n" for r in new))
                sink.flush()
            bar.update(size)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    metrics, details = aggregate(records, settings)
    if skipped:
        metrics["n_skipped"] = len(skipped)
    return ProbeReport(records=records, metrics=metrics, details=details, skipped=skipped)
