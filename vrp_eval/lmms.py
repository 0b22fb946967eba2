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
aggregations rebuild the records in dataset order and call `aggregation.aggregate`, so lmms-eval and
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

import functools
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def MANIFESTS():  # upper case: the entry point's name in pyproject.toml
    """The `lmms_eval.models` entry point: model `vrp`.

    A callable (lmms-eval's loader accepts one) defined before this module imports lmms-eval:
    importing lmms-eval loads the entry points, which may re-enter this half-imported module."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="vrp", simple_class_path="vrp_eval.lmms.VRP")]


from lmms_eval.api.model import lmms

from vrp_eval import harness
from vrp_eval.harness import RECORDS

PAYLOAD_FORMAT = "vrp-eval/lmms-record"

#: What every `vrp_*` task reports beside `accuracy`, each aggregated over all samples by
#: `aggregation.aggregate` (SPEC names, their CIs / p-values / Spearman). tasks/_vrp_template_yaml lists
#: the same names; a test keeps the two in step.
RELIABILITY_METRICS: tuple[str, ...] = harness.RELIABILITY_METRICS



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
    """Split lmms-eval's `--model_args` (plus batch_size, device ...) into (model id, ProbeSettings,
    load_model keywords) (`harness.parse_probe_args`)."""
    import inspect

    from vrp_eval.loading import load_model
    from vrp_eval.zoo import DEFAULT_MODEL

    args = dict(args)
    model_id = str(harness.strip_quotes(args.pop("pretrained", None) or DEFAULT_MODEL))
    load_options = [name for name, p in inspect.signature(load_model).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY]
    load_kwargs, settings = harness.parse_probe_args(
        args, backend="vrp", harness_name="lmms-eval", load_options=load_options,
        model_hint="pretrained=<Hub id | local folder | zoo name>")
    return model_id, settings, load_kwargs


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------

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


class VRP(harness.ProbeBackend, lmms):
    """lmms-eval model `vrp`: vrp-eval's loader and probe engine behind lmms-eval's CLI.

    `--model_args pretrained=<Hub id | local folder | zoo name>,<option>=<value>,...` where the
    options are `load_model`'s (dtype, device_map, revision, trust_remote_code, attn_implementation,
    device) and `ProbeSettings`' fields (the probe options of `vrp-eval run`; lists as `a;b;c` or
    `[a,b,c]`). `max_new_tokens` defaults to the task's generation_kwargs.
    """

    is_simple = True
    payload_format = PAYLOAD_FORMAT

    def __init__(self, pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        from accelerate import Accelerator

        from vrp_eval.loading import load_model

        if pretrained is not None:
            kwargs["pretrained"] = pretrained
        self.explicit = set(kwargs)
        model_id, self.settings, load_kwargs = parse_model_args(kwargs)
        accelerator = Accelerator()
        if accelerator.num_processes > 1 and not (load_kwargs.get("device") or load_kwargs.get("device_map")):
            load_kwargs["device"] = str(accelerator.device)  # one device per process
        self.loaded = load_model(model_id, **load_kwargs)
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

    def generate_until(self, requests) -> list[str]:
        """Probe every request (one `run_probe` per task, in dataset order), answer with the plain
        answer and leave each record in `harness.RECORDS` (see the module docstring)."""
        from vrp_eval.data import to_example, with_prompt

        by_task = harness.group_requests(requests, lambda r: ((r.args[4], r.args[5]), r.args[3]))
        responses: list[str | None] = [None] * len(requests)
        RECORDS.clear()
        for (task, split), positions_of in by_task.items():
            doc_ids = sorted(positions_of)
            examples, docs = [], []
            for doc_id in doc_ids:
                context, gen_kwargs, doc_to_visual, _, _, _ = requests[positions_of[doc_id][0]].args
                doc = self.task_dict[task][split][doc_id]
                docs.append(doc)
                visuals = [v for v in (doc_to_visual(doc) or []) if v is not None]
                row = {**doc, "image": visuals[0] if visuals else None}
                examples.append(with_prompt(to_example(row, doc_id), context))
            settings = self.settings_for(task, gen_kwargs, split=split)
            distributed = {}
            if self._world_size > 1:
                distributed = {"reduce": _gather_records, "calibration": _global_first(
                    examples, doc_ids, settings.n_calibration, skip_bad=settings.on_bad_image == "skip")}
            harness.spread(self.probe_task(task, doc_ids, examples, docs, settings, progress=self.rank == 0,
                                           **distributed), positions_of, responses)
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
    sample's `harness.RecordSample`. `task` (the task's name) tells apart the records of one document that
    several tasks of a run asked with the same answer."""
    answer, payload = record_of(doc, results[0], task)
    upstream = score(doc, [answer])
    task_score = float(upstream[score_key])
    doc_id = payload["doc_id"] if payload else None
    sample = harness.RecordSample(doc_id, task_score, payload)
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


def _summarise(samples: list[harness.RecordSample]) -> dict[str, Any]:
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
