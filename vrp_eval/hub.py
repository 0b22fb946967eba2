"""Publish results: push results files to a Hub results dataset and write model-card metadata.

    from vrp_eval.hub import push_results, card_metadata, push_card
    report = push_results("runs/x/results.json", "my-org/vrp-results")   # token: HF_TOKEN or stored login
    print(card_metadata("runs/x/results.json"))                           # model-index YAML

Each takes a results object, a vrp-eval results file, or an lmms-eval results file of a `--model vrp`
run (`load_publishable`), so `vrp-eval push` and `vrp-eval card` accept the same files.

The dataset layout is the one template leaderboards read: `<org>/<model>/results_<timestamp>.json`,
the timestamp being the results' own `config.created_at` in UTC. The same results therefore always
go to the same path, and a file whose bytes (git blob id) are already in the model's folder is not
pushed again. Tokens are passed to huggingface_hub and never printed, logged or put in a report.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vrp_eval.errors import VrpError
from vrp_eval.results import (
    LAYER_RANGE_METRICS,
    METRICS,
    SCHEMA,
    ResultsError,
    build_results,
    dumps_results,
    model_slug,
    read_results,
    utc_created_at,
    validate_results,
)

#: Metrics that go into a model card's model-index (scalar SPEC metrics; CIs go into metric_args).
CARD_METRICS = tuple(m for m in METRICS if m not in LAYER_RANGE_METRICS and m != "n_samples")
SOURCE_NAME = "vrp-eval"
SOURCE_URL = "https://github.com/vrp-eval/vrp-eval"


class PushError(VrpError, RuntimeError):
    """Pushing to the Hub failed or was refused; the message says why and what to do (never the token)."""


@dataclass(frozen=True)
class PushReport:
    """What `push_results` did: `action` is "uploaded", "skipped" (identical file already there) or "dry-run"."""

    repo_id: str
    path_in_repo: str
    action: str
    blob_id: str
    size: int
    existing_path: str | None = None
    commit_url: str | None = None

    def summary(self) -> str:
        where = f"datasets/{self.repo_id}/{self.path_in_repo}"
        if self.action == "dry-run":
            return f"dry run: would write {where} ({self.size} bytes, git blob {self.blob_id[:12]}); nothing uploaded"
        if self.action == "skipped":
            return (f"skipped: identical results are already in datasets/{self.repo_id}/{self.existing_path} "
                    f"(git blob {self.blob_id[:12]})")
        return f"uploaded {where} ({self.size} bytes): {self.commit_url}"


def git_blob_id(data: bytes) -> str:
    """The git object id of `data` as a blob: what the Hub reports as a regular file's `oid`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def results_path(obj: dict) -> str:
    """`<org>/<model>/results_<UTC timestamp>.json` from `config.created_at`.

    Results without `created_at` (e.g. converted from another tool) are named by their content hash,
    which is just as deterministic.
    """
    slug = model_slug(obj["config"])
    created = obj["config"].get("created_at")
    if created:
        when = datetime.fromisoformat(utc_created_at(created))
        stamp = when.strftime("%Y-%m-%dT%H-%M-%S")
        if when.microsecond:
            stamp += f".{when.microsecond:06d}"
    else:
        stamp = hashlib.sha256(dumps_results(obj).encode()).hexdigest()[:16]
    return f"{slug}/results_{stamp}.json"


def load_publishable(source: str | Path | dict, lmms_task: str | None = None) -> dict:
    """Validated results from an object, a vrp-eval results file, or an lmms-eval results file of a
    `--model vrp` run: that one is converted through the samples log beside it, as `vrp-eval run
    --from-lmms` does, with `lmms_task` choosing among several vrp_* tasks. ResultsError or
    LmmsResultsError (both ValueErrors) say what is wrong."""
    if isinstance(source, dict):
        return validate_results(source)
    try:  # a sniff for lmms-eval files only: read_results below validates (and reports) everything else
        head = json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        head = None
    if isinstance(head, dict) and head.get("schema") != SCHEMA and "lmms_eval_version" in head:
        from vrp_eval.lmms_results import read_lmms_results

        run = read_lmms_results(source, task=lmms_task)
        return build_results(config=run.config, task=run.task, metrics=run.metrics, details=run.details)
    return read_results(source)


def _resolve_token(token: str | None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()  # HF_TOKEN, then the token stored by `hf auth login`
    if not found:
        raise PushError("no Hugging Face token: set HF_TOKEN (or the variable named by --token-env) "
                        "or run `hf auth login` first")
    return found


def _api(token: str | None, endpoint: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=_resolve_token(token))


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a Hub call raises when the Hub answers with an error or cannot be reached at all (no route,
    connection refused, time-out, TLS): HTTP errors and the transport errors of the HTTP client
    huggingface_hub uses (httpx2 in huggingface_hub 2, httpx before)."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_error(action: str, error: Exception) -> PushError:
    # huggingface_hub's messages carry the URL and request id, never the Authorization header.
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return PushError(f"{action} failed: {error}")
    return PushError(f"{action} failed: the Hub cannot be reached ({type(error).__name__}: {error}); check the "
                     "network, HF_ENDPOINT or --endpoint, then run the same command again (nothing was committed)")


def push_results(path_or_obj: str | Path | dict, repo_id: str, *, token: str | None = None,
                 endpoint: str | None = None, dry_run: bool = False) -> PushReport:
    """Validate results and commit them to the dataset repo `repo_id` (created if needed).

    Nothing touches the network before validation passes, and `dry_run=True` never does. An identical
    file anywhere in the model's folder means nothing is committed (`action="skipped"`); a *different*
    file at the same path (same `created_at`, other content) is refused rather than overwritten.
    """
    obj = load_publishable(path_or_obj)
    data = dumps_results(obj).encode("utf-8")
    path_in_repo = results_path(obj)
    blob_id = git_blob_id(data)
    report = {"repo_id": repo_id, "path_in_repo": path_in_repo, "blob_id": blob_id, "size": len(data)}
    if dry_run:
        return PushReport(action="dry-run", **report)

    from huggingface_hub.errors import EntryNotFoundError

    api = _api(token, endpoint)
    try:
        api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
        try:
            existing = [f for f in api.list_repo_tree(repo_id, path_in_repo=path_in_repo.rsplit("/", 1)[0],
                                                      recursive=True, repo_type="dataset")
                        if hasattr(f, "blob_id")]
        except EntryNotFoundError:  # first results for this model
            existing = []
        for entry in existing:
            if entry.blob_id == blob_id:
                return PushReport(action="skipped", existing_path=entry.path, **report)
        if any(entry.path == path_in_repo for entry in existing):
            raise PushError(f"datasets/{repo_id}/{path_in_repo} already holds different results with the same "
                            "created_at; give these results their own config.created_at before pushing")
        info = api.upload_file(path_or_fileobj=data, path_in_repo=path_in_repo, repo_id=repo_id,
                               repo_type="dataset",
                               commit_message=f"Add vrp-eval results for {model_slug(obj['config'])}",
                               commit_description=f"tasks: {', '.join(obj['results'])}")
    except hub_errors() as error:
        raise _hub_error(f"pushing to datasets/{repo_id}", error) from None
    return PushReport(action="uploaded", commit_url=str(info.commit_url), **report)


def eval_results(obj: dict) -> list:
    """`huggingface_hub.EvalResult`s for every finite scalar SPEC metric of every task in `obj`."""
    from huggingface_hub import EvalResult

    config = obj["config"]
    out = []
    for task, metrics in obj["results"].items():
        circuit = metrics.get("circuit_layers")
        for name in CARD_METRICS:
            value = metrics.get(name)
            if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            args: dict[str, Any] = {}
            low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
            if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)):
                args["ci95"] = [low, high]
            if name == "causal_acc_drop" and circuit:
                args["circuit_layers"] = list(circuit)
            if isinstance(metrics.get("n_samples"), int):
                args["n_samples"] = metrics["n_samples"]
            out.append(EvalResult(
                task_type="visual-question-answering", task_name=task,
                dataset_type=config["dataset"], dataset_name=config["dataset"],
                dataset_split=config["split"], dataset_revision=config.get("dataset_revision"),
                metric_type=name, metric_name=name, metric_value=value, metric_args=args or None,
                source_name=SOURCE_NAME, source_url=SOURCE_URL,
            ))
    if not out:
        raise ResultsError("results hold no finite card metric (accuracy, ece, ...); nothing to put in a model card")
    return out


def _merged_card(obj: dict, existing_text: str | None):
    """A ModelCard with vrp-eval's eval results replaced (same task, dataset, split, metric) or added."""
    from huggingface_hub import ModelCard, ModelCardData

    new = eval_results(obj)
    if existing_text is None:
        data = ModelCardData(model_name=obj["config"]["model_name"], eval_results=new)
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(obj)}")
    card = ModelCard(existing_text)
    keep = [r for r in (card.data.eval_results or [])
            if not any(r.is_equal_except_value(n) for n in new)]
    card.data.eval_results = keep + new
    if not card.data.model_name:
        card.data.model_name = obj["config"]["model_name"]
    return card


def _card_body(obj: dict) -> str:
    config = obj["config"]
    lines = [f"# {config['model_name']}", "",
             (f"Reliability results from [vrp-eval]({SOURCE_URL}) {config['vrp_eval_version']} "
              f"on `{config['dataset']}` ({config['split']})."), "", "| task | metric | value |", "|---|---|---|"]
    for result in eval_results(obj):
        lines.append(f"| {result.task_name} | {result.metric_type} | {result.metric_value:.4g} |")
    return "\n".join(lines) + "\n"


def card_metadata(results: dict | str | Path) -> str:
    """The model-index YAML (no `---` fences) for `results` (an object or a results file)."""
    from huggingface_hub import ModelCardData

    obj = load_publishable(results)
    return ModelCardData(model_name=obj["config"]["model_name"], eval_results=eval_results(obj)).to_yaml()


def write_card(results: dict | str | Path, path: str | Path) -> Path:
    """Write or update the card at `path`: vrp-eval's model-index entries are replaced, the rest is kept."""
    obj = load_publishable(results)
    path = Path(path)
    existing = path.read_text(encoding="utf-8") if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(_merged_card(obj, existing)), encoding="utf-8")
    return path


def push_card(results: dict | str | Path, repo_id: str, *, token: str | None = None,
              endpoint: str | None = None) -> str:
    """Open a pull request on model repo `repo_id` whose README carries the results' model-index; its URL."""
    from huggingface_hub.errors import EntryNotFoundError

    obj = load_publishable(results)
    api = _api(token, endpoint)
    try:
        # A throwaway cache: the card is read once, and a stale cached README must not be merged.
        with tempfile.TemporaryDirectory() as cache:
            try:
                existing = Path(api.hf_hub_download(repo_id, "README.md", cache_dir=cache)).read_text(encoding="utf-8")
            except EntryNotFoundError:
                existing = None
        card = _merged_card(obj, existing)
        info = api.upload_file(path_or_fileobj=str(card).encode("utf-8"), path_in_repo="README.md",
                               repo_id=repo_id, create_pr=True,
                               commit_message="Add vrp-eval reliability results to the model card",
                               commit_description=f"model-index entries from vrp-eval {obj['config']['vrp_eval_version']}")
    except hub_errors() as error:
        raise _hub_error(f"opening a card pull request on {repo_id}", error) from None
    return str(info.pr_url)


def token_from_env(var: str) -> str | None:
    """The token in environment variable `var` (None when unset); used by `--token-env`."""
    return os.environ.get(var) or None
