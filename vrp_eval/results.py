"""The versioned results schema: build, validate, read and write `results.json`.

One results file describes one model on one or more tasks:

    from vrp_eval.results import build_results, write_results, read_results
    obj = build_results(config={...}, task="vrp_synth", metrics=report.metrics, details=report.details)
    write_results(obj, "runs/x/results.json")
    read_results("runs/x/results.json")["results"]["vrp_synth"]["ece"]

`config` + `results.<task>.<metric>` is a superset of the template-leaderboard format, so tools that
read `{"config": {"model_name", "model_sha", "model_dtype"}, "results": {task: {metric: value}}}`
keep working. The full layout is documented in docs/results-schema.md.

Non-finite numbers: files are strict JSON. NaN (and +/-inf) are written as `null`; `read_results`
turns a `null` metric in `results` back into `float("nan")`, so a NaN metric round-trips as NaN.
`null` inside `details` is left as `None`.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA = "vrp-eval/results"
SCHEMA_VERSION = 1

REQUIRED_CONFIG = ("model_name", "model_sha", "model_dtype", "vrp_eval_version", "dataset", "split")
OPTIONAL_CONFIG = ("model_family", "model_num_parameters", "dataset_revision", "task", "probe",
                   "versions", "created_at")

#: The SPEC vocabulary. Extend it, never rename a published name.
METRICS = ("accuracy", "ece", "mce", "ace", "brier", "attn_conf_r", "attn_acc_r", "attn_overconf_r",
           "causal_acc_drop", "control_acc_drop", "circuit_layers", "integration_layer", "n_samples")
#: Suffixes a metric may carry: 95% CI bounds, p-value, Spearman rho.
METRIC_SUFFIXES = ("_ci_low", "_ci_high", "_p", "_rho")
#: Metrics whose value is a layer range [first, last] (decoder layer indices, inclusive).
LAYER_RANGE_METRICS = ("circuit_layers", "control_layers")

_BIN_KEYS = ("lo", "hi", "count", "mean_confidence", "mean_score")
_SLUG_PART = re.compile(r"[^A-Za-z0-9._-]+")


class ResultsError(ValueError):
    """A results object or file does not follow the schema; the message names the field and the fix."""


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from numpy scalars / arrays, tuples and Paths; non-finite floats become None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy array or scalar
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def build_results(*, config: dict, task: str, metrics: dict, details: dict | None = None) -> dict:
    """A validated results object for one task.

    `metrics` is `{metric: value}` with SPEC names (NaN allowed); `details` holds the data behind the
    pictures for this task (`reliability_bins`, `ie_curves`, `knockout_curve`, ...). `config.task` is
    filled in with `task` when missing. NaN stays NaN in the returned object; `write_results` turns it
    into `null`.
    """
    config = dict(config)
    config.setdefault("task", task)
    obj = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "config": _plain(config),
        "results": {task: _plain(metrics)},
        "details": {task: _plain(details or {})},
    }
    return validate_results(obj)


def _plain(value: Any) -> Any:
    """Like `to_jsonable`, but keeps NaN as float NaN (for in-memory objects)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(field: str, problem: str, fix: str) -> ResultsError:
    return ResultsError(f"results field `{field}` {problem}; {fix}")


def validate_results(obj: dict) -> dict:
    """Check `obj` against the schema and return it unchanged; ResultsError names the field and the fix."""
    if not isinstance(obj, Mapping):
        raise ResultsError(f"a results object must be a JSON object, got {type(obj).__name__}; "
                           "write it with vrp_eval.results.build_results")
    schema = obj.get("schema")
    if schema != SCHEMA:
        raise _fail("schema", f"is {schema!r}, not {SCHEMA!r} (not a vrp-eval results file?)",
                    "create results with vrp_eval.results.build_results or `vrp-eval run`")
    version = obj.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail("schema_version", f"is {version!r}", f"set it to {SCHEMA_VERSION}")
    if version > SCHEMA_VERSION:
        raise _fail("schema_version", f"is {version}, newer than this vrp-eval understands ({SCHEMA_VERSION})",
                    "upgrade vrp-eval (pip install -U vrp-eval)")

    config = obj.get("config")
    if not isinstance(config, Mapping):
        raise _fail("config", "is missing or not an object", f"add a config object with {', '.join(REQUIRED_CONFIG)}")
    for key in REQUIRED_CONFIG:
        value = config.get(key)
        if not isinstance(value, str) or not value.strip():
            raise _fail(f"config.{key}", "is missing or not a non-empty string",
                        "set it (use \"unknown\" for a model_sha that cannot be resolved)")
    for key in ("probe", "versions"):
        if key in config and config[key] is not None and not isinstance(config[key], Mapping):
            raise _fail(f"config.{key}", "is not an object", f"give {key} as a {{name: value}} mapping")
    n_params = config.get("model_num_parameters")
    if n_params is not None and (not _is_number(n_params) or n_params < 0):
        raise _fail("config.model_num_parameters", f"is {n_params!r}", "give the parameter count as a number")
    created = config.get("created_at")
    if created is not None:
        from datetime import datetime

        try:
            datetime.fromisoformat(str(created))
        except ValueError:
            raise _fail("config.created_at", f"is {created!r}, not an ISO 8601 time",
                        "write datetime.now(timezone.utc).isoformat()") from None

    results = obj.get("results")
    if not isinstance(results, Mapping) or not results:
        raise _fail("results", "is missing or empty", "add {task: {metric: value}} for at least one task")
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            raise _fail(f"results.{task}", "is not an object", "give {metric: value} for the task")
        for name, value in metrics.items():
            _check_metric(f"results.{task}.{name}", name, value)

    details = obj.get("details", {})
    if not isinstance(details, Mapping):
        raise _fail("details", "is not an object", "give {task: {...}} or leave it out")
    for task, entry in details.items():
        if not isinstance(entry, Mapping):
            raise _fail(f"details.{task}", "is not an object", "give {reliability_bins: [...], ...} for the task")
        _check_details(f"details.{task}", entry)
    return obj


def _check_metric(field: str, name: str, value: Any) -> None:
    if name in LAYER_RANGE_METRICS:
        if value is None:
            return
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or value[0] > value[1]):
            raise _fail(field, f"is {value!r}", "give the layer range as [first, last] integers with first <= last")
        return
    if value is None or _is_number(value):
        return
    if isinstance(value, (list, tuple)) and all(v is None or _is_number(v) for v in value):
        return
    raise _fail(field, f"is {value!r} ({type(value).__name__})",
                "metric values must be numbers (null/NaN when not computable) or lists of numbers")


def _check_details(field: str, entry: Mapping) -> None:
    bins = entry.get("reliability_bins")
    if bins is not None:
        if not isinstance(bins, (list, tuple)):
            raise _fail(f"{field}.reliability_bins", "is not a list", "give a list of {lo, hi, count, ...} objects")
        for i, b in enumerate(bins):
            if not isinstance(b, Mapping) or any(k not in b for k in _BIN_KEYS):
                raise _fail(f"{field}.reliability_bins[{i}]", f"is {b!r}",
                            f"each bin needs {', '.join(_BIN_KEYS)} (mean_* may be null for an empty bin)")
            for k in _BIN_KEYS:
                if b[k] is not None and not _is_number(b[k]):
                    raise _fail(f"{field}.reliability_bins[{i}].{k}", f"is {b[k]!r}", "give a number or null")
    curves = entry.get("ie_curves")
    if curves is not None:
        if not isinstance(curves, Mapping):
            raise _fail(f"{field}.ie_curves", "is not an object", "give {group: [IE per layer]} (image, text, last)")
        for group, curve in curves.items():
            if not isinstance(curve, (list, tuple)) or not all(v is None or _is_number(v) for v in curve):
                raise _fail(f"{field}.ie_curves.{group}", "is not a list of numbers", "give one IE value per layer")
    knockout = entry.get("knockout_curve")
    if knockout is not None and not isinstance(knockout, (list, tuple)):
        raise _fail(f"{field}.knockout_curve", "is not a list", "give one entry per knockout window")


def dumps_results(obj: dict) -> str:
    """The canonical text of a results file (strict JSON, NaN as null, 2-space indent, newline at end).

    Identical results give identical bytes, which is what `vrp-eval push` compares to avoid duplicates.
    """
    validate_results(obj)
    return json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_results(obj: dict, path: str | Path) -> Path:
    """Validate and write `obj` to `path` (parent folders are created); returns the path."""
    path = Path(path)
    text = dumps_results(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def loads_results(text: str | bytes, source: str = "results") -> dict:
    """Parse and validate results text; `null` metrics come back as NaN."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(f"{source} is not valid JSON ({error}); "
                           "regenerate it with `vrp-eval run` or fix the file by hand") from None
    try:
        validate_results(obj)
    except ResultsError as error:
        raise ResultsError(f"{source}: {error}") from None
    for metrics in obj["results"].values():
        for name, value in metrics.items():
            if value is None and name not in LAYER_RANGE_METRICS:
                metrics[name] = float("nan")
    obj.setdefault("details", {})
    return obj


def read_results(path: str | Path) -> dict:
    """Read and validate a results file; ResultsError on malformed JSON or a schema violation."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as error:
        raise ResultsError(f"cannot read results file {path}: {error.strerror}") from None
    return loads_results(text, source=str(path))


def model_slug(config: Mapping) -> str:
    """`<org>/<model>` for `config.model_name`: a Hub id as it is, a local path or zoo name as `local/<name>`."""
    name = str(config.get("model_name", "")).strip().rstrip("/")
    if not name:
        raise _fail("config.model_name", "is empty", "set it to the model's Hub id or folder name")
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    if len(parts) == 2 and not name.startswith(("/", ".", "~")):
        org, model = parts
    else:
        org, model = "local", parts[-1] if parts else name
    org, model = (_SLUG_PART.sub("-", s).strip("-.") or "unknown" for s in (org, model))
    return f"{org}/{model}"


__all__ = [
    "METRICS",
    "METRIC_SUFFIXES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "ResultsError",
    "build_results",
    "dumps_results",
    "loads_results",
    "model_slug",
    "read_results",
    "to_jsonable",
    "validate_results",
    "write_results",
]
