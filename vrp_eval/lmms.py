"""lmms-eval glue: the `vrp` model backend and the functions behind the `vrp_*` tasks.

    lmms-eval --model vrp --model_args pretrained=llava-hf/llava-1.5-7b-hf --tasks vrp_vqav2

How a record reaches the metrics. lmms-eval hands a backend all requests at once, takes back one
string per request and gives a task's `process_results` only (doc, responses). `VRP.generate_until`
builds an `Example` per request (the task's doc, its visual and the task's own prompt string), runs
the very `run_probe` that `vrp-eval run` runs, once per task, and answers each request with the plain
answer, as any backend does: every task, `vrp_*` or not, scores exactly that text with its own code.
Each sample's record goes to `harness.RECORDS` (this process's channel, keyed by the document's
content and the answer). A `vrp_*` task's `process_results` scores the plain answer with the upstream
task's own function, takes the record from the channel and emits per metric a `RecordSample`; the
aggregations rebuild the records in dataset order and call `probe.aggregate`, so lmms-eval and
`vrp-eval run` report the same numbers from the same code. With `--log_samples`, `n_probed`'s
per-sample value is the record as JSON (`vrp-eval run --from-lmms` reads it back). Run with any other
backend, or on responses replayed by `--use_cache`, the tasks still report accuracy; the reliability
metrics are NaN and one warning says why.

Task discovery. lmms-eval imports this module through the `lmms_eval.models` entry point when
`lmms_eval.models` is first imported, which its CLI does before it builds the TaskManager; importing
it adds `tasks_dir()` to every TaskManager's include paths (after the built-in tasks, which win).
`--include_path $(vrp-eval tasks-dir)` does the same explicitly (Python API, `lmms-eval tasks`).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from vrp_eval import __version__


def MANIFESTS():  # upper case: the entry point's name in pyproject.toml
    """The `lmms_eval.models` entry point: model `vrp`.

    A callable (lmms-eval's loader accepts one) defined before this module imports lmms-eval:
    importing lmms-eval loads the entry points, which may re-enter this half-imported module."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="vrp", simple_class_path="vrp_eval.lmms.VRP")]


from lmms_eval.api.model import lmms

from vrp_eval import harness
from vrp_eval.data import Example
from vrp_eval.harness import PAYLOAD_VERSION, RECORDS
from vrp_eval.options import OPTIONS, option

PAYLOAD_FORMAT = "vrp-eval/lmms-record"

#: What every `vrp_*` task reports beside `accuracy`, each aggregated over all samples by
#: `probe.aggregate` (SPEC names, their CIs / p-values / Spearman). tasks/_vrp_template_yaml lists
#: the same names; a test keeps the two in step.
RELIABILITY_METRICS: tuple[str, ...] = harness.RELIABILITY_METRICS

# Options of `run_probe` that the task decides, not the model arguments.
_TASK_DECIDES = harness.TASK_DECIDES


def tasks_dir() -> Path:
    """The folder of the `vrp_*` lmms-eval task YAMLs (inside the installed package)."""
    return Path(__file__).resolve().parent / "tasks"


def encode_response(answer: str, payload: dict[str, Any]) -> str:
    """`answer` followed by `payload` between the vrp-record markers: how earlier vrp-eval backends
    answered (`harness.encode_response`); kept to read their cached responses and samples logs."""
    return harness.encode_response(answer, payload)


def decode_response(text: str) -> tuple[str, dict[str, Any] | None]:
    """(plain answer, payload or None) of a response; the payload only in an earlier vrp-eval response."""
    return harness.decode_response(text, PAYLOAD_FORMAT)


# --------------------------------------------------------------------------------------------
# Model arguments -> ProbeSettings + load_model keywords
# --------------------------------------------------------------------------------------------

def parse_model_args(args: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """Split lmms-eval's `--model_args` (plus batch_size, device ...) into
    (model id, ProbeSettings, load_model keywords). Every ProbeSettings field is an option, under
    its own name, converted to the field's type; anything else is an error that lists the options."""
    import inspect

    from vrp_eval.loading import load_model
    from vrp_eval.probe import ProbeSettings
    from vrp_eval.zoo import DEFAULT_MODEL

    args = dict(args)
    model_id = str(harness.strip_quotes(args.pop("pretrained", DEFAULT_MODEL)))
    args.pop("max_batch_size", None)  # lmms-eval passes it to every backend
    if str(args.get("batch_size", "")).startswith("auto"):
        args.pop("batch_size")  # no automatic batch size: ProbeSettings' default
    load_params = {name for name, p in inspect.signature(load_model).parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY}
    load_kwargs = {name: harness.strip_quotes(args.pop(name)) for name in list(args)
                   if name in load_params and args[name] is not None}
    probe_fields = {opt.name for opt in OPTIONS}
    settings_kwargs: dict[str, Any] = {}
    for name in list(args):
        value = args.pop(name)
        if name in _TASK_DECIDES:
            raise ValueError(f"model argument {name!r} is set by lmms-eval ({_TASK_DECIDES[name]}), not by --model_args")
        if name not in probe_fields:
            raise ValueError(
                f"unknown model argument {name!r} for --model vrp; use pretrained=<Hub id | local folder | zoo "
                f"name>, loading options ({', '.join(sorted(load_params))}) or probe options "
                f"({', '.join(sorted(probe_fields - set(_TASK_DECIDES)))})"
            )
        if value is None:
            continue
        settings_kwargs[name] = option(name).parse(value)  # OptionError names the option, the value and the range
    return model_id, ProbeSettings(**settings_kwargs), load_kwargs


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ContextExample(Example):
    """An `Example` whose prompt text is lmms-eval's context string (the task's own prompt)."""

    context: str = ""

    def prompt_text(self, post_prompt: str, mc_scoring: str = "likelihood") -> str:
        return self.context


def _context_example(example: Example, context: str) -> ContextExample:
    values = {f.name: getattr(example, f.name) for f in dataclasses.fields(example)}
    return ContextExample(**values, context=context)


def _gather_records(records: list[Any]) -> list[Any]:
    """`run_probe`'s `reduce` under several processes: every process's records, in rank order."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(records))
    return [record for part in gathered for record in part]


def _usable(examples: list[Any], doc_ids: list[int], n: int, skip_bad: bool) -> tuple[list[Any], list[int]]:
    """With `skip_bad` (on_bad_image=skip), this process's first `n` examples whose image decodes (the
    run drops the others before it calibrates); else all of them."""
    if not skip_bad:
        return examples, doc_ids
    from vrp_eval.data import DataError, load_image

    kept: list[tuple[Any, int]] = []
    for doc_id, example in sorted(zip(doc_ids, examples), key=lambda pair: pair[0]):
        try:
            load_image(example)
        except DataError:
            continue
        kept.append((example, doc_id))
        if len(kept) == n:
            break
    return [e for e, _ in kept], [i for _, i in kept]


def _global_first(examples: list[Any], doc_ids: list[int], n: int, skip_bad: bool = False) -> list[Any]:
    """The examples of the `n` smallest doc ids over every process, in doc order (with `skip_bad`,
    of those whose image decodes): what a single process calibrates the noise scale on, so sharded
    runs estimate the same sigma."""
    import torch.distributed as dist

    examples, doc_ids = _usable(examples, doc_ids, n, skip_bad)
    world = dist.get_world_size()
    all_ids: list[Any] = [None] * world
    dist.all_gather_object(all_ids, list(doc_ids))
    wanted = set(sorted(i for part in all_ids for i in part)[:n])
    mine = [(i, e) for i, e in zip(doc_ids, examples) if i in wanted]
    shared: list[Any] = [None] * world
    dist.all_gather_object(shared, mine)
    return [e for _, e in sorted((pair for part in shared for pair in part), key=lambda pair: pair[0])]


def _engine_state(report) -> dict[str, Any]:
    """The run-wide choices `aggregate` needs beside the records (the knockout windows, the circuit
    and its control window), as JSON; read from the report's metrics and details."""
    curve = report.details.get("knockout_curve") or []
    return {"windows": [list(point["window"]) for point in curve],
            "circuit": report.metrics.get("circuit_layers"), "control": report.metrics.get("control_layers")}


class VRP(lmms):
    """lmms-eval model `vrp`: vrp-eval's loader and probe engine behind lmms-eval's CLI.

    `--model_args pretrained=<Hub id | local folder | zoo name>,<option>=<value>,...` where the
    options are `load_model`'s (dtype, device_map, revision, trust_remote_code, attn_implementation,
    device) and `ProbeSettings`' fields (the probe options of `vrp-eval run`; lists as `a;b;c` or
    `[a,b,c]`). `max_new_tokens` defaults to the task's generation_kwargs.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        from accelerate import Accelerator

        from vrp_eval.loading import load_model

        if pretrained is not None:
            kwargs["pretrained"] = pretrained
        self._explicit = set(kwargs)
        model_id, self.settings, load_kwargs = parse_model_args(kwargs)
        accelerator = Accelerator()
        if accelerator.num_processes > 1 and not (load_kwargs.get("device") or load_kwargs.get("device_map")):
            load_kwargs["device"] = str(accelerator.device)  # one device per process
        self.loaded = load_model(model_id, **load_kwargs)
        self._num_parameters = self.loaded.num_parameters()
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self._device = self.loaded.device

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def _settings_for(self, task: str, split: str, gen_kwargs: dict[str, Any]):
        changes: dict[str, Any] = {"dataset": task, "split": split}
        if "max_new_tokens" not in self._explicit and gen_kwargs.get("max_new_tokens"):
            changes["max_new_tokens"] = int(gen_kwargs["max_new_tokens"])
        return dataclasses.replace(self.settings, **changes)

    def _payload(self, task: str, doc_id: int, record, settings, state: dict[str, Any]) -> dict[str, Any]:
        loaded = self.loaded
        return {
            "format": PAYLOAD_FORMAT, "version": PAYLOAD_VERSION, "task": task, "doc_id": doc_id,
            "model": {"model_name": loaded.model_name, "model_sha": loaded.model_sha,
                      "model_dtype": loaded.dtype, "model_family": loaded.family,
                      "model_num_parameters": self._num_parameters, "vrp_eval_version": __version__},
            "settings": settings.to_dict(),
            "state": state,
            "record": dataclasses.asdict(record),
        }

    def generate_until(self, requests) -> list[str]:
        """Probe every request (one `run_probe` per task, in dataset order), answer with the plain
        answer and leave each record in `harness.RECORDS` (see the module docstring)."""
        from vrp_eval.data import to_example
        from vrp_eval.probe import run_probe

        by_task: dict[tuple[str, str], dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
        for position, request in enumerate(requests):
            _, _, _, doc_id, task, split = request.args
            # Rank padding repeats a request: probe each document once.
            by_task[(task, split)][int(doc_id)].append(position)
        responses: list[str | None] = [None] * len(requests)
        RECORDS.clear()
        for (task, split), positions_of in by_task.items():
            examples, docs = [], []
            for doc_id in sorted(positions_of):
                context, gen_kwargs, doc_to_visual, _, _, _ = requests[positions_of[doc_id][0]].args
                doc = self.task_dict[task][split][doc_id]
                docs.append(doc)
                visuals = [v for v in (doc_to_visual(doc) or []) if v is not None]
                row = {**doc, "image": visuals[0] if visuals else None}
                examples.append(_context_example(to_example(row, doc_id), context))
            settings = self._settings_for(task, split, gen_kwargs)
            reduce, calibration = None, None
            if self._world_size > 1:
                reduce = _gather_records
                calibration = _global_first(examples, sorted(positions_of), settings.n_calibration,
                                            skip_bad=settings.on_bad_image == "skip")
            report = run_probe(self.loaded, settings, examples=examples, progress=self.rank == 0, reduce=reduce,
                               calibration=calibration)
            state = _engine_state(report)
            records = iter(report.records)
            skipped = list(report.skipped)
            for doc_id, example, doc in zip(sorted(positions_of), examples, docs):
                if example.question_id in skipped:
                    skipped.remove(example.question_id)
                    text = ""  # no record: the aggregation counts it as skipped
                else:
                    record = next(records)
                    text = record.answer
                    RECORDS.put(doc, text, self._payload(task, doc_id, record, settings, state))
                for position in positions_of[doc_id]:
                    responses[position] = text
        return responses  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """What any lmms-eval backend returns to a log-likelihood request: (log p(continuation |
        context, image), whether greedy decoding writes the continuation), with the context in the
        family's chat template and the continuation scored as the answer (leading whitespace
        dropped, as a generated answer is stripped; `generation.continuation_loglikelihoods`).
        No probe: such a task has no generated answer to probe."""
        from tqdm import tqdm

        from vrp_eval.data import DataError
        from vrp_eval.generation import continuation_loglikelihoods

        adapter = self.loaded.adapter
        out: list[tuple[float, bool]] = []
        size = self.settings.batch_size
        for start in tqdm(range(0, len(requests), size), desc="vrp loglikelihood", disable=self.rank != 0):
            images, prompts, continuations = [], [], []
            for request in requests[start:start + size]:
                context, target, doc_to_visual, doc_id, task, split = request.args
                doc = self.task_dict[task][split][doc_id]
                visuals = [v for v in (doc_to_visual(doc) or []) if v is not None]
                if len(visuals) != 1:
                    raise DataError(f"{task} document {doc_id} has {len(visuals)} images; the vrp backend scores "
                                    "log-likelihoods of single-image documents")
                images.append(visuals[0].convert("RGB"))
                prompts.append(adapter.build_prompt(context))
                continuations.append((target if isinstance(target, str) else target(doc)).lstrip())
            out += continuation_loglikelihoods(self.loaded, adapter.encode(images, prompts), continuations)
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the vrp backend probes single-turn generate_until tasks only")


# --------------------------------------------------------------------------------------------
# Task side: process_results and the aggregations
# --------------------------------------------------------------------------------------------

VRPSample = harness.RecordSample  # the name lmms-eval task code has used


def record_of(doc: dict[str, Any], response: str, task: str | None = None) -> tuple[str, dict[str, Any] | None]:
    """(plain answer, the sample's record or None): the record the `vrp` backend left for this
    document, answer and task in this process (earlier vrp-eval responses carry it inline)."""
    answer, payload = decode_response(response)
    if payload is None:
        payload = RECORDS.get(doc, answer, task)
    if payload is not None and payload.get("format") != PAYLOAD_FORMAT:
        payload = None
    return answer, payload


def process_results(doc: dict[str, Any], results: list[str], *, score: Callable[[dict, list[str]], dict],
                    score_key: str, extra_metrics: Iterable[str] = (), task: str | None = None) -> dict[str, Any]:
    """Score the plain answer with the upstream task's `score(doc, [answer])`: `accuracy` is its
    `score_key`, `extra_metrics` pass through unchanged, and each reliability metric gets the
    sample's `VRPSample`. `task` (the task's name) tells apart the records of one document that
    several tasks of a run asked with the same answer."""
    answer, payload = record_of(doc, results[0], task)
    upstream = score(doc, [answer])
    task_score = float(upstream[score_key])
    doc_id = payload["doc_id"] if payload else None
    sample = VRPSample(doc_id, task_score, payload)
    return {"accuracy": task_score, **harness.sample_values(sample, RELIABILITY_METRICS),
            **{name: upstream[name] for name in extra_metrics}}


_lock = threading.Lock()
_warned: set[str] = set()


def _warn_once(kind: str, message: str) -> None:
    from loguru import logger

    with _lock:
        if kind in _warned:
            return
        _warned.add(kind)
    logger.warning(message)


records_from_payloads = harness.records_from_payloads


def _summarise(samples: list[VRPSample]) -> dict[str, Any]:
    metrics = harness.aggregate_probed(samples, lambda: _warn_once("backend", (
        "vrp-eval: no vrp-eval record reached these responses, so the reliability metrics of the vrp_* "
        "tasks (ece, attn_conf_r, causal_acc_drop, ...) are NaN; accuracy is unaffected. Run with "
        "`--model vrp --model_args pretrained=<Hub id | local folder | zoo name>` to compute them "
        "(without `--use_cache`: replayed responses carry no record)."
    )))
    if RECORDS.ambiguous:
        _warn_once("ambiguous", (
            f"vrp-eval: {RECORDS.ambiguous} documents appear more than once with the same answer but "
            "different records (the same rows in two vrp_* tasks of one run?); they count as unprobed. "
            "Run those tasks separately."
        ))
    probed = [s for s in samples if s.payload is not None]
    if not probed:
        return metrics
    task = probed[0].payload.get("task")
    disagree = sum(abs(s.task_score - float(s.payload["record"].get("score", s.task_score))) > 1e-9 for s in probed)
    if disagree:
        _warn_once(f"scorer-{task}", (
            f"vrp-eval: on {task}, vrp-eval's scorer and the task's own metric disagree on {disagree} of "
            f"{len(probed)} samples; `accuracy` is the task's metric, the reliability metrics use "
            "vrp-eval's per-sample scores (as `vrp-eval run` does)."
        ))
    return metrics


#: The aggregate metrics of one task's samples (computed once, shared by every metric).
summarise = harness.Summaries(_summarise)
reliability_aggregation = summarise.aggregation


# --------------------------------------------------------------------------------------------
# Task discovery without --include_path
# --------------------------------------------------------------------------------------------

def _register_tasks_dir() -> None:
    """Make every lmms-eval TaskManager index `tasks_dir()` after the built-in tasks."""
    try:
        from lmms_eval.tasks import TaskManager
    except Exception:  # an lmms-eval without this layout: --include_path still works
        return
    original = TaskManager.initialize_tasks
    if getattr(original, "_vrp_eval", False):
        return
    ours = os.path.realpath(tasks_dir())

    @functools.wraps(original)
    def initialize_tasks(self, include_path=None, include_defaults=True):
        paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
        if not any(os.path.realpath(str(p)) == ours for p in paths):
            paths.append(ours)
        return original(self, include_path=paths, include_defaults=include_defaults)

    initialize_tasks._vrp_eval = True  # type: ignore[attr-defined]
    TaskManager.initialize_tasks = initialize_tasks


_register_tasks_dir()
