"""Read an lmms-eval run of a vrp_* task back into vrp-eval's records and report.

    run = read_lmms_results("out/llava-hf__llava-1.5-7b-hf/20260101_120000_results.json")
    run.metrics["ece"], run.records[0].confidence, run.config["model_name"]

lmms-eval writes `<date>_results.json` and, with `--log_samples`, `<date>_samples_<task>.jsonl`
beside it. Under `--model vrp` every logged sample holds its record as `n_probed`'s value (see
`vrp_eval.lmms`; logs of earlier vrp-eval versions carry it at the end of the response), so the
records, the probe settings and the run-wide choices all come back, and `aggregation.aggregate` recomputes
the same metrics and the details the pictures need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vrp_eval.errors import VrpError


class LmmsResultsError(VrpError, ValueError):
    """An lmms-eval output that cannot be read back, with what to do about it."""


@dataclass
class LmmsRun:
    task: str
    records: list[Any]  # probe.SampleRecord, in dataset order
    settings: Any  # probe.ProbeSettings
    metrics: dict[str, Any]  # recomputed with aggregation.aggregate: what `vrp-eval run` reports
    details: dict[str, Any]  # reliability bins, IE curves, knockout curve (for the pictures)
    config: dict[str, Any]  # the results.json `config` block (model, probe settings, versions)
    reported: dict[str, Any]  # the task's metrics as the lmms-eval results file has them


def _samples_path(results_path: Path, task: str) -> Path:
    stem = results_path.name[: -len("_results.json")] if results_path.name.endswith("_results.json") else ""
    path = results_path.with_name(f"{stem}_samples_{task}.jsonl")
    if not path.exists():
        raise LmmsResultsError(
            f"no samples log for task {task!r} beside {results_path} (looked for {path.name}): rerun "
            "lmms-eval with `--log_samples`, or pass the samples file"
        )
    return path


def read_lmms_results(results_path: str | Path, task: str | None = None,
                      samples_path: str | Path | None = None) -> LmmsRun:
    """Records, settings and metrics of one vrp_* task of an lmms-eval results file + samples log."""
    from vrp_eval.aggregation import aggregate
    from vrp_eval.harness import logged_payload
    from vrp_eval.lmms import PAYLOAD_FORMAT, decode_response, records_from_payloads

    results_path = Path(results_path)
    try:
        results = json.loads(results_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LmmsResultsError(f"cannot read lmms-eval results {results_path}: {error}") from None
    except RecursionError:
        raise LmmsResultsError(f"{results_path} is nested too deeply to be an lmms-eval results file") from None
    if not isinstance(results, dict) or not isinstance(results.get("results", {}), dict):
        raise LmmsResultsError(f"{results_path} is not an lmms-eval results file (a JSON object with a `results` "
                               "object); pass the `<date>_results.json` that lmms-eval wrote")
    tasks = sorted(results.get("results", {}))
    if task is None:
        candidates = [t for t in tasks if t.startswith("vrp_")] or tasks
        if len(candidates) != 1:
            raise LmmsResultsError(f"{results_path} holds tasks {', '.join(tasks) or 'none'}: choose one")
        task = candidates[0]
    elif task not in tasks:
        raise LmmsResultsError(f"task {task!r} is not in {results_path}; it has {', '.join(tasks)}")
    samples_path = Path(samples_path) if samples_path is not None else _samples_path(results_path, task)
    payloads = []
    for number, line in enumerate(samples_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            logged = json.loads(line)
            response = logged["filtered_resps"]
            payload = logged_payload(logged.get("n_probed"))
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError, RecursionError):
            raise LmmsResultsError(f"{samples_path}:{number} is not an lmms-eval samples-log line (JSON with "
                                   "`filtered_resps`); pass the `--log_samples` file of the same run") from None
        if payload is None:  # a log of an earlier vrp-eval: the record ends the response
            if isinstance(response, list):  # lmms-eval flattens one response per doc; older logs may not
                response = response[0]
            _, payload = decode_response(str(response))
        if payload is None or payload.get("format") != PAYLOAD_FORMAT:
            raise LmmsResultsError(
                f"{samples_path}:{number} carries no vrp-eval record: the run used another backend. "
                "Rerun with `lmms-eval --model vrp --model_args pretrained=<model>`."
            )
        payloads.append(payload)
    if not payloads:
        raise LmmsResultsError(f"{samples_path} holds no samples")
    records, settings, state = records_from_payloads(payloads)
    metrics, details = aggregate(records, settings, state)
    reported = {key.split(",")[0]: value for key, value in results["results"][task].items()
                if key.endswith(",none") and "_stderr" not in key}
    created = results.get("date")
    from vrp_eval import __version__
    from vrp_eval.results import dataset_label, utc_created_at

    config = {
        "vrp_eval_version": __version__,  # logs written before payloads carried it
        **payloads[0]["model"],
        "dataset": dataset_label((results.get("configs", {}).get(task) or {}).get("dataset_path"), task),
        "split": settings.split, "task": task, "probe": settings.to_dict(),
        "versions": {"lmms-eval": results.get("lmms_eval_version")},
        "source": {"harness": "lmms-eval", "results": str(results_path), "samples": str(samples_path),
                   "n-samples": results.get("n-samples", {}).get(task)},
        # lmms-eval 0.7.3 writes `date` as YYYYMMDD_HHMMSS in its --timezone (default Asia/Singapore, not the
        # machine's zone), which its CLI records in config.resolved_cli_args
        "created_at": None if created is None else utc_created_at(
            created, zone=((results.get("config") or {}).get("resolved_cli_args") or {}).get("timezone")),
    }
    return LmmsRun(task=task, records=records, settings=settings, metrics=metrics, details=details,
                   config=config, reported=reported)
