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
`null` inside `details` is left as `None`. A file with `NaN` / `Infinity` literals (Python's json writes
them) is read like the same object in memory: allowed where `null` is, refused where a finite number
is needed.

Times: `config.created_at` is stored as ISO 8601 in UTC (`2026-12-01T21:10:09+00:00`), whatever wrote
it; `validate_results` rewrites the other forms it accepts (another offset, lmms-eval's `20261202_051009`)
into that one, so readers compare times, not strings (`utc_created_at`).

Hostile files: `validate_results` is the one gate for `vrp-eval push`, `vrp-eval run --from-lmms`,
`vrp-eval card` and the leaderboard Space; it checks every field they read, so that what it accepts
they can show and what it refuses gets a message naming the field and the fix. `read_results` also
refuses files over MAX_FILE_BYTES and nesting deeper than MAX_DEPTH (docs/bad-inputs-results.md).
"""
from __future__ import annotations

import json
import math
import re
import reprlib
import unicodedata
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from vrp_eval import metric_table

SCHEMA = "vrp-eval/results"
SCHEMA_VERSION = 1

REQUIRED_CONFIG = ("model_name", "model_sha", "model_dtype", "vrp_eval_version", "dataset", "split")
OPTIONAL_CONFIG = ("model_family", "model_num_parameters", "dataset_revision", "task", "probe",
                   "versions", "created_at")

#: The SPEC vocabulary (the metric table's `spec` rows). Extend it, never rename a published name.
METRICS = metric_table.spec_names()
#: Suffixes a metric may carry: 95% CI bounds, p-value, Spearman rho.
METRIC_SUFFIXES = metric_table.COMPANION_SUFFIXES
#: Metrics whose value is a layer range [first, last] (decoder layer indices, inclusive).
LAYER_RANGE_METRICS = metric_table.layer_range_names()

#: A results file is tens of kilobytes; one this large is not one (and would stall the Space).
MAX_FILE_BYTES = 10 * 1024 * 1024
#: Results hold flat tables and short lists, six levels deep at most.
MAX_DEPTH = 32
#: Names the leaderboard shows (model, task, metric, dataset, ...); a Hub id is under 100 characters.
MAX_NAME_LENGTH = 512
#: Integers beyond 2**53 are not exact in float64 or JavaScript; no count or layer index is that large.
MAX_INT = 2**53

#: How lmms-eval 0.7.3 writes a run's time (`results["date"]`, also its file names): wall-clock time in the
#: zone of its `--timezone` option, with no offset (`lmms_eval.utils.get_datetime_str`).
LMMS_DATE = re.compile(r"\d{8}_\d{6}")
#: lmms-eval's default `--timezone`: not the machine's local zone. A run that kept the default and a run whose
#: zone is lost (a results file converted before vrp-eval read `resolved_cli_args.timezone`) are read in it.
LMMS_DEFAULT_TIMEZONE = "Asia/Singapore"
#: Singapore has kept UTC+8, without daylight saving, since 1982: exact for every lmms-eval run, and it needs no
#: zone database (a slim Space image may have none).
_LMMS_DEFAULT_ZONE = timezone(timedelta(hours=8), LMMS_DEFAULT_TIMEZONE)

#: `datasets` builders that read local files (lmms-eval's `dataset_path: parquet` + `data_files`): a loader,
#: not a dataset, so `dataset_label` names such data by its task instead.
FILE_BUILDERS = frozenset({"arrow", "csv", "json", "pandas", "parquet", "text", "imagefolder", "audiofolder",
                           "videofolder", "webdataset"})

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
    """A real number as the schema allows it in memory: NaN and +/-inf stand for `null` (`write_results`
    writes them so); integers are bounded, since beyond 2**53 neither float64 nor JavaScript holds them."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -MAX_INT <= value <= MAX_INT
    return isinstance(value, float)


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _is_layer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _short(value: Any) -> str:
    """A bounded repr for messages: a hostile value must not flood the leaderboard's note."""
    return _REPR.repr(value)


def _fail(field: str, problem: str, fix: str) -> ResultsError:
    return ResultsError(f"results field `{field}` {problem}; {fix}")


def _name_problem(value: Any) -> str | None:
    """Why `value` cannot be a name the leaderboard shows (model, task, metric, dataset, ...), or None."""
    if not isinstance(value, str) or not value.strip():
        return f"is {_short(value)}, not a non-empty string"
    if len(value) > MAX_NAME_LENGTH:
        return f"is {len(value)} characters long (at most {MAX_NAME_LENGTH})"
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        return f"is {_short(value)}, which holds a control character (newline, tab, ...)"
    return None


def _check_name(field: str, value: Any, fix: str = "give a one-line name") -> None:
    problem = _name_problem(value)
    if problem:
        raise _fail(field, problem, fix)


def _check_keys(field: str, mapping: Mapping, what: str) -> None:
    for key in mapping:
        problem = _name_problem(key)
        if problem:
            raise _fail(field, f"has a {what} that {problem}", f"name every {what} with a one-line string")


def _check_shape(obj: Mapping) -> None:
    """Nesting depth of everything in `obj` and integers within 64 bits. Iterative, so that a
    pathological file meets a ResultsError before anything recursive (repr, copy, dumps) does; a path
    is only spelled out for the error."""
    stack: list[tuple[Any, Any, int]] = [(obj, None, 1)]  # (container, its path as a linked list, depth)
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _fail(_field(path), f"nests more than {MAX_DEPTH} levels deep",
                        "results hold flat {name: value} tables and lists of numbers: flatten it")
        keyed = isinstance(node, Mapping)
        for key, value in node.items() if keyed else enumerate(node):
            kind = type(value)
            if kind is str or kind is float or value is None or kind is bool:  # common leaves first: files can be large
                continue
            if kind is int:
                if not -(2**64) < value < 2**64:
                    raise _fail(_field((path, str(key) if keyed else key)), "is an integer beyond 64 bits",
                                "counts, sizes and layer indices are far smaller: write the real value (or null)")
            elif kind is dict or kind is list or isinstance(value, (Mapping, list, tuple)):
                stack.append((value, (path, str(key) if keyed else key), depth + 1))


def _field(path: Any) -> str:
    """`a.b[0].c` from _check_shape's linked-list path, long keys and long paths cut."""
    parts = []
    while path is not None:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else "." + (key if len(key) <= 40 else key[:40] + "…"))
    text = "".join(reversed(parts)).lstrip(".") or "(top level)"
    return text if len(text) <= 120 else text[:120] + "…"


def validate_results(obj: dict) -> dict:
    """Check `obj` against the schema and return it; ResultsError names the field and the fix.

    Every field the leaderboard Space or the model card reads is checked, so that what this accepts
    they can show: names are one-line strings of at most MAX_NAME_LENGTH characters, numbers are
    numbers (NaN / inf only where the schema allows null), layer ranges are non-negative integers, and
    nothing nests deeper than MAX_DEPTH. One field is rewritten in place: `config.created_at` becomes
    ISO 8601 UTC (`utc_created_at`). Other keys are kept as they are.
    """
    if not isinstance(obj, Mapping):
        raise ResultsError(f"a results object must be a JSON object, got {type(obj).__name__}; "
                           "write it with vrp_eval.results.build_results")
    _check_shape(obj)
    schema = obj.get("schema")
    if schema != SCHEMA:
        raise _fail("schema", f"is {_short(schema)}, not {SCHEMA!r} (not a vrp-eval results file?)",
                    "create results with vrp_eval.results.build_results or `vrp-eval run`")
    version = obj.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail("schema_version", f"is {_short(version)}", f"set it to {SCHEMA_VERSION}")
    if version > SCHEMA_VERSION:
        raise _fail("schema_version", f"is {version}, newer than this vrp-eval understands ({SCHEMA_VERSION})",
                    "upgrade vrp-eval (pip install -U vrp-eval)")
    _check_config(obj.get("config"))

    results = obj.get("results")
    if not isinstance(results, Mapping) or not results:
        raise _fail("results", "is missing or empty", "add {task: {metric: value}} for at least one task")
    _check_keys("results", results, "task")
    for task, metrics in results.items():
        if not isinstance(metrics, Mapping):
            raise _fail(f"results.{task}", "is not an object", "give {metric: value} for the task")
        _check_keys(f"results.{task}", metrics, "metric")
        for name, value in metrics.items():
            _check_metric(f"results.{task}.{name}", name, value)

    details = obj.get("details", {})
    if not isinstance(details, Mapping):
        raise _fail("details", "is not an object", "give {task: {...}} or leave it out")
    _check_keys("details", details, "task")
    for task, entry in details.items():
        if not isinstance(entry, Mapping):
            raise _fail(f"details.{task}", "is not an object", "give {reliability_bins: [...], ...} for the task")
        _check_details(f"details.{task}", entry)
    return obj


def _check_config(config: Any) -> None:
    if not isinstance(config, Mapping):
        raise _fail("config", "is missing or not an object", f"add a config object with {', '.join(REQUIRED_CONFIG)}")
    for key in REQUIRED_CONFIG:
        value = config.get(key)
        if not isinstance(value, str) or not value.strip():
            raise _fail(f"config.{key}", "is missing or not a non-empty string",
                        "set it (use \"unknown\" for a model_sha that cannot be resolved)")
        _check_name(f"config.{key}", value)
    for key in ("model_family", "dataset_revision", "task"):
        if config.get(key) is not None:
            _check_name(f"config.{key}", config[key], "give a one-line string or leave it out")
    for key in ("probe", "versions"):
        if key in config and config[key] is not None and not isinstance(config[key], Mapping):
            raise _fail(f"config.{key}", "is not an object", f"give {key} as a {{name: value}} mapping")
    model_slug(config)
    n_params = config.get("model_num_parameters")
    if n_params is not None and (not _is_finite(n_params) or n_params < 0):
        raise _fail("config.model_num_parameters", f"is {_short(n_params)}",
                    "give the parameter count as a finite non-negative number, or null when it is unknown")
    created = config.get("created_at")
    if created is not None:
        if not isinstance(created, str):  # a number could be unix seconds, milliseconds or 20250101: refuse to guess
            raise _fail("config.created_at", f"is {_short(created)}, {_NOT_A_TIME}", _WRITE_A_TIME)
        config["created_at"] = utc_created_at(created)


_NOT_A_TIME = "not an ISO 8601 time (in UTC's range)"
_WRITE_A_TIME = "write datetime.now(timezone.utc).isoformat()"


def utc_created_at(value: str | float, zone: str | None = None) -> str:
    """A run's time as ISO 8601 text in UTC (`2026-12-01T21:10:09+00:00`): how `config.created_at` is stored.

    `value` is ISO 8601 text (an offset is honoured), lmms-eval's `YYYYMMDD_HHMMSS`, or unix seconds (a
    number: what lm-eval-style harnesses write). `zone` is the IANA zone of a time written without an offset;
    by default ISO text without an offset is UTC (vrp-eval has always written UTC) and `YYYYMMDD_HHMMSS` is
    in lmms-eval's default `--timezone`, LMMS_DEFAULT_TIMEZONE. ResultsError (naming `config.created_at`,
    the field this fills) for anything else.

    >>> utc_created_at("20261202_051009")
    '2026-12-01T21:10:09+00:00'
    >>> utc_created_at("2026-12-02T06:10:09+01:00")
    '2026-12-02T05:10:09+00:00'
    """
    # Python's fromisoformat reads "20261202_051009" too (any separator), as a time without an offset:
    # lmms-eval's form is recognised first, so that it is read in lmms-eval's zone.
    compact = isinstance(value, str) and LMMS_DATE.fullmatch(value.strip()) is not None
    name = zone or (LMMS_DEFAULT_TIMEZONE if compact else None)
    unzoned = _zone(name) if name else timezone.utc
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # sub-second digits of time.time() name nothing a reader needs
            return datetime.fromtimestamp(value, timezone.utc).isoformat(timespec="seconds")
        if not isinstance(value, str):
            raise TypeError
        when = (datetime.strptime(value.strip(), "%Y%m%d_%H%M%S") if compact
                else datetime.fromisoformat(value.strip()))
        return (when if when.tzinfo else when.replace(tzinfo=unzoned)).astimezone(timezone.utc).isoformat()
    except (TypeError, ValueError, OverflowError, OSError):
        raise _fail("config.created_at", f"is {_short(value)}, {_NOT_A_TIME}", _WRITE_A_TIME) from None


def _zone(name: str) -> tzinfo:
    if name == LMMS_DEFAULT_TIMEZONE:
        return _LMMS_DEFAULT_ZONE
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise _fail("config.created_at", f"is in time zone {_short(name)}, which is unknown here",
                    "give an IANA zone name such as Asia/Singapore (without a system zone database: "
                    "pip install tzdata)") from None


def _check_layer_range(field: str, value: Any, what: str) -> None:
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_layer(v) for v in value)
            or value[0] > value[1]):
        raise _fail(field, f"is {_short(value)}",
                    f"give the {what} as [first, last]: decoder-layer indices, integers >= 0, first <= last")


def _check_metric(field: str, name: str, value: Any) -> None:
    if name in LAYER_RANGE_METRICS:
        if value is not None:
            _check_layer_range(field, value, "layer range")
        return
    if value is None or _is_number(value):
        return
    if isinstance(value, (list, tuple)) and all(v is None or _is_number(v) for v in value):
        return
    raise _fail(field, f"is {_short(value)} ({type(value).__name__})",
                "metric values must be numbers (null/NaN when not computable) or lists of numbers")


def _check_details(field: str, entry: Mapping) -> None:
    bins = entry.get("reliability_bins")
    if bins is not None:
        if not isinstance(bins, (list, tuple)):
            raise _fail(f"{field}.reliability_bins", "is not a list", "give a list of {lo, hi, count, ...} objects")
        for i, b in enumerate(bins):
            if not isinstance(b, Mapping) or any(k not in b for k in _BIN_KEYS):
                raise _fail(f"{field}.reliability_bins[{i}]", f"is {_short(b)}",
                            f"each bin needs {', '.join(_BIN_KEYS)} (mean_* may be null for an empty bin)")
            for k, fix in (("lo", "give the bin's lower edge as a finite number"),
                           ("hi", "give the bin's upper edge as a finite number"),
                           ("count", "give the number of samples in the bin (>= 0)")):
                if not _is_finite(b[k]) or (k == "count" and b[k] < 0):
                    raise _fail(f"{field}.reliability_bins[{i}].{k}", f"is {_short(b[k])}", fix)
            for k in ("mean_confidence", "mean_score"):
                if b[k] is not None and not _is_number(b[k]):
                    raise _fail(f"{field}.reliability_bins[{i}].{k}", f"is {_short(b[k])}", "give a number or null")
    for name, what in (("ie_curves", "IE"), ("nie_curves", "NIE"), ("ie_proxy_curves", "proxy IE"),
                       ("proxy_per_layer_pearson", "Pearson r")):
        curves = entry.get(name)
        if curves is None:
            continue
        if not isinstance(curves, Mapping):
            raise _fail(f"{field}.{name}", "is not an object", f"give {{group: [{what} per layer]}} (image, text, last)")
        _check_keys(f"{field}.{name}", curves, "position group")
        for group, curve in curves.items():
            if not isinstance(curve, (list, tuple)) or not all(v is None or _is_number(v) for v in curve):
                raise _fail(f"{field}.{name}.{group}", "is not a list of numbers",
                            f"give one {what} value per layer (null where it could not be computed)")
    for name in ("proxy_circuit_layers", "ie_rise_layers"):
        if entry.get(name) is not None:
            _check_layer_range(f"{field}.{name}", entry[name], "window")
    if entry.get("proxy_integration_layer") is not None and not _is_layer(entry["proxy_integration_layer"]):
        raise _fail(f"{field}.proxy_integration_layer", f"is {_short(entry['proxy_integration_layer'])}",
                    "give a decoder-layer index (an integer >= 0) or null")
    found = entry.get("proxy_agreement")
    if found is not None:
        if not isinstance(found, Mapping):
            raise _fail(f"{field}.proxy_agreement", "is not an object", "give {statistic: number or null}")
        _check_keys(f"{field}.proxy_agreement", found, "statistic")
        for key, value in found.items():
            if value is not None and not _is_number(value):
                raise _fail(f"{field}.proxy_agreement.{key}", f"is {_short(value)}", "give a number or null")
    if entry.get("signal_comparison") is not None:
        _check_signal_comparison(f"{field}.signal_comparison", entry["signal_comparison"])
    knockout = entry.get("knockout_curve")
    if knockout is not None:
        if not isinstance(knockout, (list, tuple)):
            raise _fail(f"{field}.knockout_curve", "is not a list", "give one {window, accuracy, drop} per knockout window")
        for i, point in enumerate(knockout):
            if not isinstance(point, Mapping):
                raise _fail(f"{field}.knockout_curve[{i}]", f"is {_short(point)}",
                            "give an object {window: [first, last], accuracy, drop}")
            _check_layer_range(f"{field}.knockout_curve[{i}].window", point.get("window"), "knocked-out window")
            for k in ("accuracy", "drop"):
                if point.get(k) is not None and not _is_number(point[k]):
                    raise _fail(f"{field}.knockout_curve[{i}].{k}", f"is {_short(point[k])}", "give a number or null")


def _check_signal_comparison(field: str, table: Any) -> None:
    """details.signal_comparison (`vrp_eval.signal_comparison.compare_signals`)."""
    if not isinstance(table, Mapping):
        raise _fail(field, f"is {_short(table)}", "give the object compare_signals returns, or leave it out")
    rows = table.get("signals")
    if not isinstance(rows, (list, tuple)):
        raise _fail(f"{field}.signals", f"is {_short(rows)}", "give a list of one object per signal")
    for i, row in enumerate(rows):
        where = f"{field}.signals[{i}]"
        if not isinstance(row, Mapping):
            raise _fail(where, f"is {_short(row)}", "give an object {name, label, auroc, aurc, e_aurc, ...}")
        _check_name(f"{where}.name", row.get("name"), "give the signal's name")
        if row.get("higher_means") not in ("right", "wrong"):
            raise _fail(f"{where}.higher_means", f"is {_short(row.get('higher_means'))}",
                        "say what a higher value claims: 'right' or 'wrong'")
        for key in ("auroc", "aurc", "e_aurc", "spearman_overconfidence"):
            if row.get(key) is not None and not _is_number(row[key]):
                raise _fail(f"{where}.{key}", f"is {_short(row[key])}", "give a number or null")
        curve = row.get("curve")
        if curve is not None and (not isinstance(curve, Mapping) or any(
                not isinstance(curve.get(k), (list, tuple)) or not all(_is_finite(v) for v in curve[k])
                for k in ("coverage", "risk")) or len(curve["coverage"]) != len(curve["risk"])):
            raise _fail(f"{where}.curve", "is not {coverage: [...], risk: [...]} of equal length",
                        "give the risk-coverage curve as two lists of finite numbers")


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


def _too_large(source: str, size: int) -> ResultsError:
    return ResultsError(f"{source} is {size} bytes, more than the {MAX_FILE_BYTES} bytes a results file may hold; "
                        "keep per-sample data in samples.jsonl, not in results")


def loads_results(text: str | bytes, source: str = "results") -> dict:
    """Parse and validate results text; `null` metrics come back as NaN."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > MAX_FILE_BYTES:
        raise _too_large(source, size)
    try:
        obj = json.loads(text)
    except RecursionError:
        raise ResultsError(f"{source} nests too deeply to read (a results file is at most {MAX_DEPTH} levels deep); "
                           "regenerate it with `vrp-eval run`") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        problem = ("holds an integer of thousands of digits" if "integer string conversion" in str(error)
                   else f"is not valid JSON ({error})")
        raise ResultsError(f"{source} {problem}; regenerate it with `vrp-eval run` or fix the file by hand") from None
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
    """Read and validate a results file; ResultsError on malformed JSON, a schema violation or a file over
    MAX_FILE_BYTES (checked before reading it)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _too_large(str(path), size)
        text = path.read_bytes()
    except OSError as error:
        raise ResultsError(f"cannot read results file {path}: {error.strerror}") from None
    return loads_results(text, source=str(path))


def dataset_label(dataset: str | None, task: str) -> str:
    """What to call a run's data: `dataset` itself (a Hub id or a path), or `task` when `dataset` is only a
    file builder's name (FILE_BUILDERS) or missing. The task's YAML names the data files; their path on the
    machine that ran it (a home folder, a virtual environment) is neither portable nor for publishing."""
    return task if not dataset or dataset in FILE_BUILDERS else dataset


def model_slug(config: Mapping) -> str:
    """`<org>/<model>` for `config.model_name`: a Hub id as it is, a local path or zoo name as `local/<name>`."""
    name = str(config.get("model_name", "")).strip().rstrip("/")
    if not name:
        raise _fail("config.model_name", f"is {_short(config.get('model_name'))}, which names no model",
                    "set it to the model's Hub id or folder name")
    parts = [p for p in name.split("/") if p not in ("", ".", "..")]
    if len(parts) == 2 and not name.startswith(("/", ".", "~")):
        org, model = parts
    else:
        org, model = "local", parts[-1] if parts else name
    org, model = (_SLUG_PART.sub("-", s).strip("-.") or "unknown" for s in (org, model))
    return f"{org}/{model}"


__all__ = [
    "FILE_BUILDERS",
    "LMMS_DEFAULT_TIMEZONE",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NAME_LENGTH",
    "METRICS",
    "METRIC_SUFFIXES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "ResultsError",
    "build_results",
    "dataset_label",
    "dumps_results",
    "loads_results",
    "model_slug",
    "read_results",
    "to_jsonable",
    "utc_created_at",
    "validate_results",
    "write_results",
]
