"""What the lmms-eval glue (`vrp_eval.lmms`) and the lm-eval glue (`vrp_eval.lm`) share.

A harness takes one string per request from a backend and gives a task's `process_results` only
the document and those strings. A vrp-eval backend answers exactly as any backend does (the plain
answer, so every task, `vrp_*` or not, scores it with its own code) and leaves each sample's record
in this process's `RECORDS` channel, keyed by the document's content and the answer; a `vrp_*`
task's `process_results` takes it from there, scores the plain answer and gives every reliability
metric the sample's `RecordSample`; the aggregations rebuild the records (`records_from_payloads`)
and call `aggregation.aggregate` once per task (`Summaries`). `n_probed`'s per-sample value is logged as
the record itself, so `--log_samples` keeps every record once (`vrp-eval run --from-lmms` reads it
back). Model arguments arrive as text and become `ProbeSettings` fields through `vrp_eval.options`
(one parser for the CLI, lmms-eval and lm-eval).

Nothing here imports a harness, so both glue modules (and `vrp-eval run --from-lmms`) use it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from vrp_eval import metric_table

PAYLOAD_OPEN = "\n<vrp-record>"
PAYLOAD_CLOSE = "</vrp-record>"
PAYLOAD_VERSION = 1

#: What every lmms-eval `vrp_*` task reports beside `accuracy`, each read from one aggregate over all
#: the task's samples (`Summaries`): the metric table's SUMMARY columns of the "lmms" tasks.
RELIABILITY_METRICS: tuple[str, ...] = metric_table.columns("lmms", metric_table.SUMMARY)

#: Options of `run_probe` that the task decides, not the model arguments.
TASK_DECIDES = {"dataset": "--tasks", "split": "the task's test split", "limit": "--limit"}


# --------------------------------------------------------------------------------------------
# The payload: a record inside the response string
# --------------------------------------------------------------------------------------------

def json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def encode_response(answer: str, payload: dict[str, Any]) -> str:
    """`answer` followed by `payload` as JSON between the vrp-record markers ("<" escaped, so the
    last marker always starts the payload)."""
    text = json.dumps(payload, default=json_default, separators=(",", ":")).replace("<", "\\u003c")
    return f"{answer}{PAYLOAD_OPEN}{text}{PAYLOAD_CLOSE}"


def decode_response(text: str, payload_format: str) -> tuple[str, dict[str, Any] | None]:
    """(plain answer, payload or None) of a response; None when it carries no payload of
    `payload_format` (any other model's response)."""
    body = text.rstrip()
    start = body.rfind(PAYLOAD_OPEN.strip())
    if start < 0 or not body.endswith(PAYLOAD_CLOSE):
        return text, None
    payload = json.loads(body[start + len(PAYLOAD_OPEN.strip()):-len(PAYLOAD_CLOSE)])
    if not isinstance(payload, dict) or payload.get("format") != payload_format:
        return text, None
    # Harnesses strip responses before process_results; the record holds the exact answer.
    return payload["record"].get("answer", body[:start].rstrip("\n")), payload


# --------------------------------------------------------------------------------------------
# The channel: records from the backend to the task, in one process
# --------------------------------------------------------------------------------------------

_SKIP = object()


def _plain(value: Any) -> Any:
    """`value` if it is JSON data (scalars, lists, dicts of them), else _SKIP: images, audio and
    bytes, which harnesses drop from the documents they hand to `process_results`."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _SKIP if any(v is _SKIP for v in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return _SKIP if any(v is _SKIP for v in items.values()) else items
    return _SKIP


def doc_key(doc: dict[str, Any]) -> str:
    """A document's identity from its JSON-data fields (media left out): the same for the document a
    backend reads and the media-free copy the harness passes to `process_results`."""
    fields = {k: v for k, v in ((k, _plain(v)) for k, v in doc.items()) if v is not _SKIP}
    text = json.dumps(fields, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha1(text.encode()).hexdigest()


class RecordChannel:
    """Per-sample records a vrp-eval backend leaves for its tasks' `process_results` in this process
    (each process of a multi-process run holds its own shard's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.ambiguous = 0

    def clear(self) -> None:
        with self._lock:
            self._records.clear()
            self.ambiguous = 0

    def put(self, doc: dict[str, Any], answer: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self._records.setdefault(doc_key(doc), []).append((answer.strip(), payload))

    def get(self, doc: dict[str, Any], answer: str, task: str | None = None) -> dict[str, Any] | None:
        """The record of `doc` answered `answer` (by task `task` when the same document was in
        several tasks); None when there is none (another backend, or a response replayed by
        lmms-eval's `--use_cache`) or when several records remain (counted in `ambiguous`)."""
        with self._lock:
            candidates = self._records.get(doc_key(doc), [])
            for keep in (lambda a, p: a == answer.strip(), lambda a, p: p.get("task") == task):
                if len(candidates) > 1 and any(keep(a, p) for a, p in candidates):
                    candidates = [(a, p) for a, p in candidates if keep(a, p)]
            if len(candidates) == 1:
                return candidates[0][1]
            if candidates:
                self.ambiguous += 1
            return None


#: The records of this process's vrp-eval backend (`vrp` under lmms-eval, `vrp-lm` under lm-eval).
RECORDS = RecordChannel()


# --------------------------------------------------------------------------------------------
# Model arguments
# --------------------------------------------------------------------------------------------

def strip_quotes(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_probe_args(args: dict[str, Any], *, backend: str, harness_name: str, load_options: Iterable[str],
                     model_hint: str, defaults: dict[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """(loading keywords, ProbeSettings) from a harness's model arguments, once `pretrained` and the
    backend's own keys are taken out. Every ProbeSettings field is an option under its own name,
    parsed by `vrp_eval.options` (an OptionError names the option, the value and the range); a
    run-wide choice the harness makes (`TASK_DECIDES`) or any other name is an error that lists the
    options. None values (arguments a harness passes unset) are ignored; `batch_size=auto` leaves the
    probe's batch size."""
    from vrp_eval.options import OPTIONS, option
    from vrp_eval.records import ProbeSettings

    load_options = set(load_options)
    args = {name: value for name, value in args.items() if value is not None and name != "max_batch_size"}
    if str(args.get("batch_size", "")).startswith("auto"):
        args.pop("batch_size")  # no automatic batch size: ProbeSettings' default
    load_kwargs = {name: strip_quotes(args.pop(name)) for name in list(args) if name in load_options}
    fields = {opt.name for opt in OPTIONS}
    settings = dict(defaults or {})
    for name, value in args.items():
        if name in TASK_DECIDES:
            raise ValueError(f"model argument {name!r} is set by {harness_name} ({TASK_DECIDES[name]}), not by "
                             "--model_args")
        if name not in fields:
            raise ValueError(f"unknown model argument {name!r} for --model {backend}; use {model_hint}, loading "
                             f"options ({', '.join(sorted(load_options))}) or probe options "
                             f"({', '.join(sorted(fields - set(TASK_DECIDES)))})")
        settings[name] = option(name).parse(value)
    return load_kwargs, ProbeSettings(**settings)


def state_to_json(state: Any) -> dict[str, Any]:
    """The run-wide choices `aggregate` needs beside the records (knockout windows, circuit, control
    window) of an `EngineState`, as JSON; `state_from_json` reads it back."""
    return {"windows": [list(w) for w in state.windows] if state else [],
            "circuit": list(state.circuit) if state and state.circuit else None,
            "control": list(state.control) if state and state.control else None}


def state_from_json(saved: dict[str, Any] | None) -> Any:
    from vrp_eval.records import EngineState

    saved = saved or {}
    return EngineState(windows=[tuple(w) for w in saved.get("windows") or []],
                       circuit=tuple(saved["circuit"]) if saved.get("circuit") else None,
                       control=tuple(saved["control"]) if saved.get("control") else None)


def make_payload(payload_format: str, task: str, doc_id: Any, model: dict[str, Any], settings: Any,
                 state: dict[str, Any], record: Any) -> dict[str, Any]:
    """One sample's record as a harness carries it: format, task, document, model, settings, state."""
    return {"format": payload_format, "version": PAYLOAD_VERSION, "task": task, "doc_id": doc_id, "model": model,
            "settings": settings.to_dict(), "state": state, "record": dataclasses.asdict(record)}


class ProbeBackend:
    """What the lmms-eval backend `vrp` and the lm-eval model `vrp-lm` share: the probe settings from
    the model arguments, per-task settings from the task's generation arguments, and answering one
    task's requests with the very `run_probe` of `vrp-eval run` (records to `RECORDS`, plain answers
    back). A subclass sets `payload_format`, `loaded`, `settings` and `explicit` (the model arguments
    given) and turns its harness's requests into examples."""

    payload_format: str
    loaded: Any
    settings: Any
    explicit: set[str]

    def settings_for(self, task: str, gen_kwargs: dict[str, Any], **changes: Any) -> Any:
        """The probe settings of one task: its name as the dataset and, unless `max_new_tokens` was a
        model argument, the task's answer length (`max_new_tokens`, lm-eval's `max_gen_toks`)."""
        changes = {"dataset": task, **changes}
        if "max_new_tokens" not in self.explicit:
            tokens = gen_kwargs.get("max_new_tokens", gen_kwargs.get("max_gen_toks"))
            if tokens:
                changes["max_new_tokens"] = int(tokens)
        return dataclasses.replace(self.settings, **changes)

    def probe_task(self, task: str, doc_ids: list[int], examples: list[Any], docs: list[dict[str, Any]],
                   settings: Any, answer: Callable[[Any, int], str] = lambda record, doc_id: record.answer,
                   **run_options: Any) -> dict[int, str]:
        """{doc id: response} for one task: `run_probe` over its examples (in doc order, no aggregate:
        the task's aggregation makes it), each record left in `RECORDS` for its document and answer.
        A skipped sample (an image that does not decode, `on_bad_image=skip`) answers "" and has no
        record, so the aggregation counts it as skipped."""
        from vrp_eval.probe import run_probe
        from vrp_eval.records import model_block

        report = run_probe(self.loaded, settings, examples=examples, summarize=False, **run_options)
        state, model = state_to_json(report.state), model_block(self.loaded)
        records, skipped = iter(report.records), list(report.skipped)
        responses = {}
        for doc_id, example, doc in zip(doc_ids, examples, docs):
            if example.question_id in skipped:
                skipped.remove(example.question_id)
                responses[doc_id] = ""
                continue
            record = next(records)
            responses[doc_id] = answer(record, doc_id)
            RECORDS.put(doc, responses[doc_id], make_payload(self.payload_format, task, doc_id, model, settings,
                                                             state, record))
        return responses


def spread(responses: dict[int, str], positions_of: dict[int, list[int]], into: list[Any]) -> None:
    """Each document's response at every position a harness asked it (repeats, rank padding)."""
    for doc_id, text in responses.items():
        for position in positions_of[doc_id]:
            into[position] = text


def group_requests(requests: list[Any], key: Callable[[Any], tuple[Any, int]]) -> dict[Any, dict[int, list[int]]]:
    """{task key: {doc id: positions of its requests}}: each document is probed once per task, in doc
    order, however often a harness repeats it (rank padding, repeats)."""
    groups: dict[Any, dict[int, list[int]]] = {}
    for position, request in enumerate(requests):
        task, doc_id = key(request)
        groups.setdefault(task, {}).setdefault(int(doc_id), []).append(position)
    return groups


# --------------------------------------------------------------------------------------------
# Task side: per-sample values and the aggregations
# --------------------------------------------------------------------------------------------

class RecordSample:
    """One sample's value for every reliability metric: the task's score and, under a vrp-eval
    backend, the record (payload).

    Harnesses log per-sample metric values with `str()`, so the record (already in the response)
    is not written again for every metric."""

    __slots__ = ("doc_id", "key", "payload", "task_score")

    def __init__(self, doc_id: Any, task_score: float, payload: dict[str, Any] | None, key: str | None = None):
        self.doc_id = doc_id
        self.task_score = task_score
        self.payload = payload
        if key is None:
            text = json.dumps(payload, sort_keys=True, default=json_default) if payload is not None else ""
            key = hashlib.sha1(f"{doc_id}\x00{task_score}\x00{text}".encode()).hexdigest()
        self.key = key

    def __str__(self) -> str:
        return "vrp-record" if self.payload is not None else "no-vrp-record"

    __repr__ = __str__

    def logged(self) -> LoggedRecord:
        """The same sample, written out in full by a samples log (`n_probed`'s per-sample value)."""
        return LoggedRecord(self.doc_id, self.task_score, self.payload, key=self.key)

    def __getstate__(self):  # RecordSample's slots: a subclass (LoggedRecord) adds none and must send these
        return {name: getattr(self, name) for name in RecordSample.__slots__}

    def __setstate__(self, state):
        for name, value in state.items():
            setattr(self, name, value)


class LoggedRecord(RecordSample):
    """A `RecordSample` whose text (what harnesses write to the samples log) is its record as JSON,
    or "no-vrp-record"."""

    __slots__ = ()

    def __str__(self) -> str:
        if self.payload is None:
            return "no-vrp-record"
        return json.dumps(self.payload, default=json_default, separators=(",", ":"))

    __repr__ = __str__


def logged_payload(value: Any) -> dict[str, Any] | None:
    """The record a samples log holds as `n_probed`'s value (`LoggedRecord`), else None."""
    if not isinstance(value, str) or not value.startswith("{"):
        return None
    payload = json.loads(value)
    return payload if isinstance(payload, dict) and "record" in payload else None


def sample_values(sample: RecordSample, names: tuple[str, ...]) -> dict[str, RecordSample]:
    """Every reliability metric's per-sample value: the sample, and for `n_probed` the logged record."""
    return {name: sample.logged() if name == "n_probed" else sample for name in names}


def records_from_payloads(payloads: list[dict[str, Any]]):
    """(records, ProbeSettings, EngineState) of one task's payloads, ready for `aggregation.aggregate`;
    in dataset order when the payloads carry `doc_id`. Fields that this vrp-eval does not know are
    dropped (newer payloads); a payload without settings gets the defaults."""
    from vrp_eval.records import ProbeSettings, SampleRecord

    if all("doc_id" in p for p in payloads):
        payloads = sorted(payloads, key=lambda p: p["doc_id"])
    record_fields = {f.name for f in dataclasses.fields(SampleRecord)}
    settings_fields = {f.name for f in dataclasses.fields(ProbeSettings)}
    records = [SampleRecord(**{k: v for k, v in p["record"].items() if k in record_fields}) for p in payloads]
    saved_settings = payloads[0].get("settings") or {}
    settings = ProbeSettings(**{k: v for k, v in saved_settings.items() if k in settings_fields})
    return records, settings, state_from_json(payloads[0].get("state"))


class Summaries:
    """`compute(samples)` once per task's samples, shared by every metric's aggregation (a harness
    calls each aggregation with the same list); keeps the last 16."""

    def __init__(self, compute: Callable[[list[RecordSample]], dict[str, Any]]):
        self._compute = compute
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, ...], dict[str, Any]] = OrderedDict()

    def __call__(self, samples: list[RecordSample]) -> dict[str, Any]:
        key = tuple(sample.key for sample in samples)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        summary = self._compute(samples)
        with self._lock:
            self._cache[key] = summary
            while len(self._cache) > 16:
                self._cache.popitem(last=False)
        return summary

    def aggregation(self, name: str) -> Callable[[list[RecordSample]], Any]:
        """The harness aggregation of metric `name`: its value in the summary, NaN if absent."""

        def aggregation(samples: list[RecordSample]) -> Any:
            return self(samples).get(name, math.nan)

        aggregation.__name__ = aggregation.__qualname__ = f"vrp_{name}"
        return aggregation


def aggregate_probed(samples: list[RecordSample], warn_none: Callable[[], None]) -> dict[str, Any]:
    """`aggregation.aggregate` of the samples that carry a record (`n_skipped` counts the others); with
    none, `warn_none()` and only `n_samples`."""
    from vrp_eval.aggregation import aggregate

    probed = [s for s in samples if s.payload is not None]
    if not probed:
        warn_none()
        return {"n_samples": len(samples), "n_probed": 0}
    metrics, _ = aggregate(*records_from_payloads([s.payload for s in probed]))
    metrics["n_probed"] = len(probed)
    if len(probed) < len(samples):
        metrics["n_skipped"] = len(samples) - len(probed)
    return metrics
