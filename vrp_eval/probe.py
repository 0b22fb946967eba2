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
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vrp_eval.aggregation import aggregate
from vrp_eval.data import (
    DataError,
    Example,
    check_unique_ids,
    load_examples,
    load_image,
)
from vrp_eval.generation import generate_answers
from vrp_eval.loading import LoadedModel
from vrp_eval.options import OptionError
from vrp_eval.records import (
    EngineState,
    ProbeSettings,
    SampleRecord,
    _dumps,
    choose_confidence,
    half_of,
    score_answer,
    score_output,
)

__all__ = ["EngineState", "ProbeReport", "ProbeSettings", "SampleRecord", "aggregate", "check_examples",
           "half_of", "prepare_engine", "run_probe", "score_answer", "score_output"]


def _batches(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _encode(loaded: LoadedModel, examples: list[Example], settings: ProbeSettings):
    adapter = loaded.adapter
    images = [load_image(e) for e in examples]
    prompts = [adapter.build_prompt(e.prompt_text(settings.post_prompt, settings.mc_scoring)) for e in examples]
    return adapter.encode(images, prompts)


def probe_batch(loaded: LoadedModel, examples: list[Example], settings: ProbeSettings,
                state: EngineState) -> list[SampleRecord]:
    """Pass 1 for a batch: clean answers and confidences, attention signals, causal trace, knockouts."""
    from vrp_eval import statistics

    batch = _encode(loaded, examples, settings)
    signals = set(settings.signals)
    recorder = None
    hooks = []
    if signals & {"attention", "structural"}:
        from vrp_eval.attention import SharpnessRecorder

        recorder = SharpnessRecorder.for_batch(loaded.adapter, batch)
        hooks.append(recorder)
    seconds: dict[str, float] = {}  # per signal, for the batch (added to the run's `state.seconds`)
    cost: dict[str, float] = {}  # per signal, forward-pass equivalents per sample (counted)
    # One clean prompt pass per batch: the answer's own prefill feeds the sharpness recorder, the logit
    # lens, the probing features, the trace and the proxy (`CleanCapture` records it while answering).
    capture = clean = None
    if signals & {"logit_lens", "probing", "tracing", "proxy"}:
        from vrp_eval.tracing import CleanCapture

        # The trace and the proxy replay the whole pass (the trace over its keys/values); the logit
        # lens and the probe read the last positions only.
        replayed = bool(signals & {"tracing", "proxy"})
        capture = CleanCapture(loaded, batch, kv=None if "tracing" in signals else False, last_only=not replayed)
    started = time.perf_counter()
    outputs = _generate(loaded, batch, settings, examples, hooks, capture)
    seconds["answer"] = time.perf_counter() - started
    if capture is not None and not capture.last_only:
        clean = capture.run
    records = []
    for example, output in zip(examples, outputs):
        score = score_output(example, output, settings.mc_scoring)
        confidence = choose_confidence(output, settings.confidence, example)
        records.append(SampleRecord(
            question_id=example.question_id, question=example.question, answer=output.text, score=score,
            confidence=confidence, confidence_product=output.confidence,
            confidence_first_token=output.first_token_prob, confidence_length_norm=output.confidence_length_norm,
            token_probs=output.token_probs, reference=example.reference_for(settings.mc_scoring), kind=example.kind,
            option_probs=output.option_probs, meta=example.meta,
            reliability=float(statistics.reliability([confidence], [score])[0]),
            overconfidence=float(statistics.overconfidence([confidence], [score])[0]),
            half=half_of(example.question_id, settings.seed),
        ))
    if recorder is not None:
        for record, sig in zip(records, recorder.signals()):
            record.sharpness = sig.sharpness
            record.sharpness_per_layer = sig.sharpness_per_layer
            record.image_attention_mass = sig.image_attention_mass
            record.image_attention_mass_per_layer = sig.image_attention_mass_per_layer
            if "structural" in signals:
                record.spatial_entropy = sig.spatial_entropy
                record.spatial_entropy_layer_mean = sig.spatial_entropy_layer_mean
                record.spatial_entropy_per_layer = sig.spatial_entropy_per_layer
                record.d_spatial_entropy = sig.d_spatial_entropy
                record.cluster_count = sig.cluster_count
    target_ids = [o.first_token_id for o in outputs]
    if "structural" in signals:
        from vrp_eval.attention import token_confidence

        for record, output in zip(records, outputs):
            record.token_confidence = token_confidence(output.token_probs)
    hidden = None
    if signals & {"logit_lens", "probing"}:  # read from the answer's prefill: no pass of their own
        hidden = capture.last_position_states()
        for name in signals & {"logit_lens", "probing"}:
            cost[name] = 0.0
    if "logit_lens" in signals:
        from vrp_eval.companions import logit_lens_margin, reference_token_id

        started = time.perf_counter()  # the final norm and head on each layer's state
        truth = [reference_token_id(loaded.adapter, example, settings.mc_scoring) for example in examples]
        pairs = [(t if t is not None else own, own) for t, own in zip(truth, target_ids)]
        margins = logit_lens_margin(loaded, batch, pairs, hidden=hidden)
        for record, known, (truth_margin, own_margin) in zip(records, truth, margins):
            record.logit_lens_margin = truth_margin if known is not None else None
            record.logit_lens_margin_predicted = own_margin
        seconds["logit_lens"] = time.perf_counter() - started
    if "probing" in signals:
        from vrp_eval.companions import probe_features

        started = time.perf_counter()
        for record, features in zip(records, probe_features(hidden, settings.seed)):
            record.probe_features = features
        seconds["probing"] = time.perf_counter() - started
    if "tracing" in signals:
        from vrp_eval.tracing import normalised_ie, trace_batch

        started = time.perf_counter()
        for record, trace in zip(records, trace_batch(loaded, batch, target_ids, _trace_settings(settings),
                                                      state.sigma, clean=clean)):
            record.p_clean, record.p_corrupted, record.ie = trace.p_clean, trace.p_corrupted, trace.ie
            record.nie = normalised_ie(trace.ie, trace.p_clean, trace.p_corrupted)
            if trace.cost is not None:
                record.cost = {"tracing": trace.cost.forward_passes}
        seconds["tracing"] = time.perf_counter() - started
    if "proxy" in signals:  # attribution patching: the same noise, one corrupted forward + backward each
        from vrp_eval.proxy import proxy_trace_batch

        started = time.perf_counter()
        for record, trace in zip(records, proxy_trace_batch(loaded, batch, target_ids, _trace_settings(settings),
                                                            state.sigma, clean=clean)):
            record.ie_proxy, record.p_corrupted_proxy = trace.ie, trace.p_corrupted
            record.p_clean = trace.p_clean if record.p_clean is None else record.p_clean
            cost["proxy"] = trace.cost.forward_passes
        seconds["proxy"] = time.perf_counter() - started
    clean = capture = hidden = None  # the recorded pass is not held through the gradient and sampling passes
    if "saliency" in signals:
        from vrp_eval.saliency import SALIENCY_PASSES, gradient_saliency

        started = time.perf_counter()
        for record, saliency in zip(records, gradient_saliency(loaded, batch, target_ids)):
            record.saliency = saliency.concentration
        seconds["saliency"], cost["saliency"] = time.perf_counter() - started, SALIENCY_PASSES
    if "consistency" in signals:
        from vrp_eval.companions import self_consistency

        started = time.perf_counter()
        for record, value in zip(records, self_consistency(loaded, batch, k=settings.consistency_k,
                                                           seed=settings.seed)):
            record.self_consistency = value
        # k sampled answers: k prompt passes (the greedy answer is reused, decode steps not counted)
        seconds["consistency"], cost["consistency"] = time.perf_counter() - started, float(settings.consistency_k)
    if "circuit" in signals:
        from vrp_eval.tracing import knockout_answers_per_window, stack_rows

        rows = [i for i, r in enumerate(records) if r.half == "discovery"]
        if rows:
            sub = loaded.adapter.select_rows(batch, rows)
            sub_choices = _choices(settings, [examples[row] for row in rows])
            per_window = knockout_answers_per_window(loaded, sub, state.windows, max_new_tokens=settings.max_new_tokens,
                                                     choices=sub_choices,
                                                     max_rows=stack_rows(loaded.device, settings.batch_size))
            for j, row in enumerate(rows):
                records[row].knockout_scores = [score_output(examples[row], answers[j], settings.mc_scoring)
                                                for answers in per_window]
    for record in records:
        record.cost = {**cost, **(record.cost or {})}
    for name, value in seconds.items():
        state.seconds[name] = state.seconds.get(name, 0.0) + value
    state.timed_samples += len(records)
    return records


def heldout_batch(loaded: LoadedModel, examples: list[Example], records: list[SampleRecord],
                  settings: ProbeSettings, state: EngineState) -> None:
    """Pass 2 for held-out samples: corrupt the image states inside the circuit (and the control window),
    both in one generation (`corrupted_answers_per_window`)."""
    from vrp_eval.tracing import corrupted_answers_per_window, stack_rows

    batch = _encode(loaded, examples, settings)
    recorders = []
    observers = None
    if set(settings.signals) & {"attention", "structural"}:
        from vrp_eval.attention import SharpnessRecorder

        def observers(stacked):  # sharpness under the circuit's corruption: the first block's rows
            recorders.append(SharpnessRecorder.for_batch(loaded.adapter, stacked))
            return recorders[-1:]
    corrupted, control = corrupted_answers_per_window(
        loaded, batch, [state.circuit, state.control], settings.noise, settings.noise_scale, state.sigma,
        settings.seed, observers=observers, max_new_tokens=settings.max_new_tokens, choices=_choices(settings, examples),
        max_rows=stack_rows(loaded.device, settings.batch_size))
    sharp = recorders[0].signals()[:len(records)] if recorders else [None] * len(records)
    for example, record, c, k, sig in zip(examples, records, corrupted, control, sharp):
        record.corrupted_answer, record.corrupted_score = c.text, score_output(example, c, settings.mc_scoring)
        record.control_answer, record.control_score = k.text, score_output(example, k, settings.mc_scoring)
        record.sharpness_corrupted = sig.sharpness if sig is not None else None


def _choices(settings: ProbeSettings, examples: list[Example]) -> list[list[str]] | None:
    """The options scored by likelihood (multiple choice under `mc_scoring="likelihood"`), else None:
    the answers are generated."""
    if settings.mc_scoring != "likelihood" or not any(e.kind == "mc" for e in examples):
        return None
    return [list(e.choices) for e in examples]


def _generate(loaded, batch, settings, examples, hooks, capture=None):
    """The batch's answers, with `hooks` (attention recorders) active and `capture` (a `CleanCapture`)
    recording the prompt pass."""
    from contextlib import ExitStack

    from vrp_eval.generation import option_answers

    choices = _choices(settings, examples)

    def answer():
        if choices is not None:
            return option_answers(loaded, batch, choices)
        return generate_answers(loaded, batch, max_new_tokens=settings.max_new_tokens,
                                option_letters=[e.option_letters for e in examples])

    with ExitStack() as stack:
        if capture is not None:
            stack.enter_context(capture)
        if hooks:
            from vrp_eval.hooks import attention_hooks

            stack.enter_context(attention_hooks(loaded.adapter, *hooks))
        return answer()


def _trace_settings(settings: ProbeSettings):
    from vrp_eval.tracing import TraceSettings

    return TraceSettings(layers=settings.layers, kind=settings.noise, scale=settings.noise_scale,
                         n_noise=settings.n_noise, seed=settings.seed)


def prepare_engine(loaded: LoadedModel, examples: list[Example], settings: ProbeSettings,
                   calibration: list[Example] | None = None) -> EngineState:
    """Noise scales from up to `n_calibration` samples (`calibration`, else the first examples) and
    the knockout windows."""
    state = EngineState()
    signals = set(settings.signals)
    if not signals & {"tracing", "circuit", "proxy"}:
        return state
    from vrp_eval.intervention import estimate_sigma
    from vrp_eval.tracing import knockout_windows, window_width

    num_layers = loaded.adapter.num_layers
    width = window_width(num_layers, settings.window)
    if "circuit" in signals and not 1 <= width < num_layers:  # a control window must fit beside the circuit
        raise OptionError(f"window (--window) = {width}: this model has {num_layers} decoder layers, so a knockout "
                          f"window must be 1..{num_layers - 1} wide (room for its control window)")
    if settings.layers is not None:
        bad = [layer for layer in settings.layers if not 0 <= layer < num_layers]
        if bad:
            shown = ", ".join(map(str, bad[:5])) + (f" ... {bad[-1]}" if len(bad) > 5 else "")
            raise OptionError(f"layers (--layers): {shown} out of range: this model has decoder layers "
                              f"0..{num_layers - 1}")
    state.windows = knockout_windows(num_layers, width)
    calibration = (calibration if calibration is not None else examples)[: settings.n_calibration]
    encoded = [_encode(loaded, chunk, settings) for chunk in _batches(calibration, settings.batch_size)]
    state.sigma = estimate_sigma(loaded, encoded, max_samples=settings.n_calibration)
    return state


def choose_windows(records: list[SampleRecord], state: EngineState, num_layers: int) -> None:
    from vrp_eval.tracing import choose_circuit, control_window

    discovery = [r for r in records if r.half == "discovery" and r.knockout_scores is not None]
    if not discovery:
        raise DataError("no sample fell in the discovery half: the circuit needs more samples (raise --limit)")
    import numpy as np

    scores = np.array([r.knockout_scores for r in discovery], dtype=float)
    state.circuit = tuple(choose_circuit(scores, state.windows, clean_scores=[r.score for r in discovery]))
    state.control = tuple(control_window(state.circuit, num_layers))


@dataclass
class ProbeReport:
    records: list[SampleRecord]
    metrics: dict[str, Any]
    details: dict[str, Any]
    skipped: list[Any]
    state: EngineState | None = None




def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by an interrupted write: recompute it and what follows
    return rows


def _resumed_record(row: dict[str, Any], path: Path) -> SampleRecord:
    """A record of a partial run, or a DataError when another vrp-eval version wrote it."""
    from dataclasses import fields

    known = {f.name for f in fields(SampleRecord)}
    unknown = sorted(set(row) - known)
    try:
        if unknown:
            raise TypeError(f"unknown fields {', '.join(unknown)}")
        return SampleRecord(**row)
    except TypeError as error:
        raise DataError(f"{path} holds records this version of vrp-eval cannot resume ({error}): another version "
                        "wrote them; pass --overwrite to start again, or choose a new --output folder") from None


#: The files `run_probe` writes into its output folder.
RUN_FILES = ("run_key.json", "pass1.partial.jsonl", "heldout.partial.jsonl", "samples.jsonl", "samples.jsonl.tmp")


def _check_run_key(folder: Path, run_key: dict[str, Any], overwrite: bool) -> None:
    key_path = folder / "run_key.json"
    if overwrite:
        for name in RUN_FILES:
            (folder / name).unlink(missing_ok=True)
    elif key_path.exists() and json.loads(key_path.read_text()) != run_key:
        raise DataError(f"{folder} holds a run with other settings; choose a new --output folder or pass "
                        "--overwrite to start again")
    key_path.write_text(json.dumps(run_key, indent=2, sort_keys=True))


def check_examples(examples: list[Example], settings: ProbeSettings, shard: bool = False) -> None:
    """What the settings need of the data, checked before any model pass (`shard`: `examples` are one
    process's share of a distributed run, so whole-run requirements are not checked here)."""
    if not examples:
        raise DataError(f"dataset {settings.dataset!r} split {settings.split!r} has no examples to evaluate")
    check_unique_ids(examples, settings.dataset)
    if settings.mc_scoring == "likelihood" and len({e.kind == "mc" for e in examples}) > 1:
        raise OptionError("mc_scoring (--mc-scoring) = 'likelihood' scores options, but this data mixes multiple-choice "
                          "rows (with `choices`) and open questions; evaluate them separately, or pass "
                          "--mc-scoring letter (the letter prompt)")
    if settings.confidence == "option" and any(e.kind != "mc" for e in examples):
        raise OptionError("confidence (--confidence) = 'option' needs multiple-choice data (rows with `choices` and "
                          f"`answer`), and {settings.dataset!r} has other rows; use product, first_token or length_norm")
    if "circuit" in settings.signals and not shard and not any(
            half_of(e.question_id, settings.seed) == "discovery" for e in examples):
        raise DataError(f"none of the {len(examples)} samples falls in the discovery half that chooses the circuit; "
                        "evaluate more samples (raise --limit) or leave `circuit` out of --signals")


def run_probe(
    loaded: LoadedModel,
    settings: ProbeSettings,
    output_dir: str | Path | None = None,
    examples: list[Example] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    reduce: Callable[[Any], Any] | None = None,
    calibration: list[Example] | None = None,
    summarize: bool = True,
) -> ProbeReport:
    """Answer, score and probe every example.

    Pass 1 (every sample): clean answer, confidences, attention signals, causal trace, and on the
    discovery half the knockout windows. Then the circuit is chosen on the discovery half. Pass 2
    (held-out half): the circuit-corrupted and control runs. With `output_dir`, progress is appended
    to partial files as each batch finishes and a rerun resumes from them; `samples.jsonl` is written
    at the end. `reduce` (all-gather for distributed runs) merges the discovery records of all
    processes before the circuit is chosen; `calibration` (default: the first `n_calibration`
    examples) fixes the samples the noise scale is estimated on, so that every process of a sharded
    run uses the same one. `summarize=False` leaves the aggregate out (`metrics` holds only
    `n_skipped`, `details` is empty): for a harness backend, whose tasks aggregate the records.
    """
    examples = examples if examples is not None else load_examples(settings.dataset, settings.split, settings.limit)
    check_examples(examples, settings, shard=reduce is not None)
    folder = Path(output_dir) if output_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        _check_run_key(folder, {"model": loaded.model_name, "model_sha": loaded.model_sha,
                                "settings": settings.to_dict()}, overwrite)
    skipped: list[Any] = []
    if settings.on_bad_image == "skip":
        good = []
        for example in examples:
            try:
                load_image(example)
                good.append(example)
            except DataError:
                skipped.append(example.question_id)
        examples = good
    state = prepare_engine(loaded, examples, settings, calibration)

    pass1_path = folder / "pass1.partial.jsonl" if folder else None
    records = {row["question_id"]: _resumed_record(row, pass1_path) for row in _read_jsonl(pass1_path)} if folder else {}
    todo = [e for e in examples if e.question_id not in records]
    _run_pass(f"vrp-eval {loaded.model_name}", examples, todo, settings, progress, pass1_path,
              lambda chunk: probe_batch(loaded, chunk, settings, state), records)

    if "circuit" in settings.signals:
        ordered = [records[e.question_id] for e in examples]
        everyone = reduce(ordered) if reduce is not None else ordered
        choose_windows(everyone, state, loaded.adapter.num_layers)
        heldout_path = folder / "heldout.partial.jsonl" if folder else None
        done = {row["question_id"]: row for row in _read_jsonl(heldout_path)} if folder else {}
        for qid, row in done.items():
            if qid in records:
                for key in ("corrupted_answer", "corrupted_score", "control_answer", "control_score",
                            "sharpness_corrupted"):
                    setattr(records[qid], key, row[key])
        heldout = [e for e in examples if records[e.question_id].half == "heldout"]
        todo = [e for e in heldout if e.question_id not in done]

        def second(chunk):
            chunk_records = [records[e.question_id] for e in chunk]
            heldout_batch(loaded, chunk, chunk_records, settings, state)
            return chunk_records

        _run_pass("held-out circuit runs", heldout, todo, settings, progress, heldout_path, second, None,
                  fields=("question_id", "corrupted_answer", "corrupted_score", "control_answer", "control_score",
                          "sharpness_corrupted"))

    ordered = [records[e.question_id] for e in examples]
    metrics, details = {}, {}
    if summarize:
        metrics, details = aggregate(reduce(ordered) if reduce is not None else ordered, settings, state)
    if skipped:
        metrics["n_skipped"] = len(skipped)
    if folder is not None:
        tmp = folder / "samples.jsonl.tmp"
        tmp.write_text("".join(r.to_json() + "\n" for r in ordered))
        tmp.replace(folder / "samples.jsonl")
    return ProbeReport(records=ordered, metrics=metrics, details=details, skipped=skipped, state=state)


def _run_pass(desc, everything, todo, settings, progress, path, work, store, fields=None) -> None:
    sink = path.open("a") if path is not None else None
    bar = tqdm(total=len(everything), initial=len(everything) - len(todo), desc=desc, unit="sample",
               disable=not progress)
    try:
        for chunk in _batches(todo, settings.batch_size):
            new = work(chunk)
            if store is not None:
                for record in new:
                    store[record.question_id] = record
            if sink is not None:
                rows = [asdict(r) for r in new]
                if fields:
                    rows = [{k: row[k] for k in fields} for row in rows]
                sink.write("".join(_dumps(row) + "\n" for row in rows))
                sink.flush()
            bar.update(len(chunk))
    finally:
        bar.close()
        if sink is not None:
            sink.close()
