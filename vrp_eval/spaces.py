"""Deployable Hugging Face Spaces from the installed package: the leaderboard and the `evaluate` metrics.

    from vrp_eval.spaces import metric_path, build_space, publish_spaces
    evaluate.load(metric_path("vrp_ece"))                      # a metric, from an installed wheel
    build_space("leaderboard", "out/leaderboard")              # a folder to deploy as a Gradio Space
    publish_spaces(METRIC_NAMES, org="my-org")                 # then evaluate.load("my-org/vrp_ece")

The same from the shell: `vrp-eval space path vrp_ece`, `vrp-eval space build leaderboard OUT`,
`vrp-eval space publish --org my-org`.

A Space needs a few hundred lines of numpy / scipy maths or the results schema, not the probe, so a
built folder is slim: the app, its README card, the pure-Python modules of vrp_eval it imports
(`LIGHT_MODULES`, which import nothing heavier than numpy and scipy), lmms-eval's one-file VQA answer
processor for `vrp_vqa_accuracy` (MIT, see `vrp_eval.vqa`), and a requirements.txt naming only what
those import, pinned to the versions installed here (the locked, tested set in a `make setup`
environment). No torch, transformers, lmms-eval or lm-eval. gradio itself comes from the card's
`sdk_version`, as on every Gradio Space.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from vrp_eval.errors import VrpError

PACKAGE = Path(__file__).resolve().parent
METRIC_NAMES = ("vrp_ece", "vrp_attention_confidence", "vrp_causal_drop", "vrp_vqa_accuracy")
SPACE_NAMES = ("leaderboard", *METRIC_NAMES)
#: The vrp_eval modules a Space imports; each imports only the stdlib, numpy, scipy or each other.
LIGHT_MODULES = ("__init__.py", "metric_table.py", "results.py", "statistics.py", "calibration.py", "vqa.py")
#: Distributions each kind of Space imports (the metrics: `import evaluate, datasets`; the maths: numpy, scipy).
REQUIREMENTS = {"leaderboard": ("huggingface_hub", "pandas"), "metric": ("evaluate", "datasets", "numpy", "scipy")}
#: Files of a source folder that are not part of the Space.
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


class SpaceError(VrpError, ValueError):
    """An unknown Space name, an unusable output folder or a failed publish; the message says what to do."""


def _check_name(name: str) -> None:
    if name not in SPACE_NAMES:
        raise SpaceError(f"unknown Space {name!r}: choose one of {', '.join(SPACE_NAMES)}.")


def source_dir(name: str) -> Path:
    """The shipped folder of a Space (inside the installed package, so it works outside a checkout)."""
    _check_name(name)
    return PACKAGE / ("leaderboard" if name == "leaderboard" else f"metrics/{name}")


def metric_path(name: str) -> str:
    """What to pass to `evaluate.load` for a shipped metric: `evaluate.load(metric_path("vrp_ece"))`."""
    if name not in METRIC_NAMES:
        raise SpaceError(f"unknown metric {name!r}: choose one of {', '.join(METRIC_NAMES)}.")
    return str(source_dir(name))


def requirements(name: str) -> list[str]:
    """The Space's requirements.txt lines: what it imports, pinned to the versions installed here."""
    _check_name(name)
    lines = []
    for dist in REQUIREMENTS["leaderboard" if name == "leaderboard" else "metric"]:
        try:
            lines.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            lines.append(dist)
    return lines


def build_space(name: str, out: str | Path) -> Path:
    """Write a deployable Space folder for `name` into `out` (which must not exist or be empty)."""
    from vrp_eval.vqa import VENDORED_PROCESSOR, upstream_processor_file

    source, out = source_dir(name), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpaceError(f"{out} already exists and is not an empty folder: choose a new output folder.")
    shutil.copytree(source, out, ignore=_IGNORE, dirs_exist_ok=True)
    package = out / "vrp_eval"
    package.mkdir()
    for module in LIGHT_MODULES:
        shutil.copy2(PACKAGE / module, package / module)
    processor = upstream_processor_file()
    if processor is None:
        raise SpaceError("lmms-eval is not installed, and a Space carries its VQA answer processor: "
                         "build Spaces from a full install (`pip install vrp-eval`).")
    shutil.copy2(processor, package / VENDORED_PROCESSOR.name)
    (out / "requirements.txt").write_text(
        "# Written by `vrp-eval space build`: only what this Space imports, pinned to the tested versions.\n"
        "# gradio comes from the README's sdk_version; vrp_eval/ holds the pure-Python modules it uses.\n"
        + "\n".join(requirements(name)) + "\n")
    return out


def publish_spaces(names: Iterable[str], org: str, *, token: str | None = None, endpoint: str | None = None,
                   private: bool = False) -> list[str]:
    """Build and upload each named Space as `org/<name>` (a Gradio Space); returns the repo ids.

    A metric Space published this way loads with `evaluate.load("<org>/<name>")` wherever vrp-eval is
    installed (the module imports `vrp_eval`). The token comes from `token`, HF_TOKEN or the stored
    login, and is never printed; Hub failures raise `vrp_eval.hub.PushError`.
    """
    import tempfile

    from vrp_eval.hub import _api, _hub_error, hub_errors

    names = list(names)
    for name in names:
        _check_name(name)
    if not org or "/" in org:
        raise SpaceError(f"--org must be a Hub user or organisation name without '/', got {org!r}.")
    api = _api(token, endpoint)
    published = []
    for name in names:
        repo_id = f"{org}/{name}"
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_space(name, Path(tmp) / name)
            try:
                api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
                api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="space",
                                  commit_message=f"vrp-eval: publish {name}")
            except hub_errors() as error:
                raise _hub_error(f"publishing the Space {repo_id}", error) from error
        published.append(repo_id)
    return published
