"""Spaces from the installed package (vrp_eval.spaces): slim deployable folders, metric Spaces published
to a loopback Hub and loaded back with `evaluate.load("ORG/name")`, and each kind of Space imported in
a fresh venv built from its own requirements.txt alone (no torch, no lmms-eval)."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sample_results import sample_results

from vrp_eval.results import write_results
from vrp_eval.spaces import (
    LIGHT_MODULES,
    METRIC_NAMES,
    SPACE_NAMES,
    SpaceError,
    build_space,
    publish_spaces,
)

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
HEAVY = ("torch", "transformers", "lmms_eval", "lm_eval", "accelerate")
CONF, SCORE = [0.9, 0.8, 0.3, 0.6, 0.55], [1.0, 0.0, 0.0, 1.0, 1.0]


def _card(folder: Path) -> dict:
    return yaml.safe_load(folder.joinpath("README.md").read_text(encoding="utf-8").split("---")[1])


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_built_space_is_slim_and_complete(name, tmp_path):
    folder = build_space(name, tmp_path / name)
    card = _card(folder)
    assert card["sdk"] == "gradio" and (folder / card["app_file"]).is_file()
    for module in LIGHT_MODULES:
        assert (folder / "vrp_eval" / module).is_file()
    assert (folder / "vrp_eval" / "_lmms_eval_vqa_eval_metric.py").is_file()
    requirements = [line for line in (folder / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert all("==" in line for line in requirements), requirements  # pinned to the tested versions
    assert not {line.split("==")[0] for line in requirements} & {"torch", "transformers", "lmms_eval", "lm_eval",
                                                                  "vrp-eval", "vrp_eval"}
    # The light modules import nothing heavy: checked by source, the venv test below checks by running.
    for module in LIGHT_MODULES:
        tree = ast.parse((folder / "vrp_eval" / module).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        assert imported <= {"vrp_eval", "numpy", "scipy", "__future__"} | set(sys.stdlib_module_names), (module, imported)


def test_leaderboard_card_matches_the_locked_gradio(tmp_path):
    # The Space installs gradio from sdk_version: it must be the gradio the tests ran with.
    from importlib.metadata import version

    card = _card(build_space("leaderboard", tmp_path / "lb"))
    assert str(card["sdk_version"]) == version("gradio")


def test_build_refuses_a_used_folder_and_unknown_names(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    with pytest.raises(SpaceError, match="not an empty folder"):
        build_space("vrp_ece", tmp_path / "used")
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    with pytest.raises(SpaceError, match="unknown Space 'vrp_nope'.*vrp_ece"):
        build_space("vrp_nope", tmp_path / "x")


def test_cli_path_build_and_errors(tmp_path, capsys):
    from vrp_eval.cli import main

    assert main(["space", "path", "vrp_ece"]) == 0
    assert Path(capsys.readouterr().out.strip(), "vrp_ece.py").is_file()
    assert main(["space", "build", "leaderboard", str(tmp_path / "lb")]) == 0
    assert (tmp_path / "lb" / "app.py").is_file()
    assert main(["space", "build", "leaderboard", str(tmp_path / "lb")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_publish_then_evaluate_load_from_the_hub(fake_hub, tmp_path):
    published = publish_spaces(METRIC_NAMES, "vrp-org", token=fake_hub.token, endpoint=fake_hub.url)
    assert published == [f"vrp-org/{name}" for name in METRIC_NAMES]
    files = fake_hub.files("space", "vrp-org/vrp_ece")
    assert {"vrp_ece.py", "app.py", "README.md", "requirements.txt", "vrp_eval/calibration.py"} <= set(files)
    # A user elsewhere: evaluate resolves "ORG/name" against HF_ENDPOINT, read at import, so a fresh interpreter.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")}
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf-home"))
    code = ("import json, evaluate\n"
            "from vrp_eval.calibration import calibration_summary\n"
            f"hub = evaluate.load('vrp-org/vrp_ece').compute(confidences={CONF}, scores={SCORE}, n_bins=5)\n"
            f"core = calibration_summary({CONF}, {SCORE}, n_bins=5)\n"
            "vqa = evaluate.load('vrp-org/vrp_vqa_accuracy').compute(predictions=['Two.'], references=[['2'] * 10])\n"
            "print(json.dumps([hub['ece'], core['ece'], hub['bins'] == core['bins'], vqa['accuracy']]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    hub_ece, core_ece, same_bins, vqa = json.loads(done.stdout.splitlines()[-1])
    assert hub_ece == core_ece and same_bins  # the same code on the same float64 inputs: bit-equal
    assert vqa == 1.0
    assert ("GET", "/spaces/vrp-org/vrp_ece/resolve/main/vrp_ece.py") in fake_hub.requests


def test_publish_without_a_token_names_the_fix(fake_hub, monkeypatch, tmp_path):
    from vrp_eval.hub import PushError

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login either
    with pytest.raises(PushError, match="no Hugging Face token"):
        publish_spaces(["vrp_ece"], "vrp-org", endpoint=fake_hub.url)
    assert fake_hub.requests == []  # refused before anything was sent


# --- each Space in a venv built from its requirements.txt alone ---------------------------------------
def _slim_venv(root: Path, folder: Path, extra: list[str]) -> Path:
    """A fresh venv with only the Space's requirements (plus what its SDK provides), as the Space builds it."""
    subprocess.run([sys.executable, "-m", "venv", root], check=True)
    python = root / "bin" / "python"
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", "-c", LOCK, "-r", folder / "requirements.txt", *extra],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def _run_in(python: Path, folder: Path, code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([python, "-c", code], cwd=folder, capture_output=True, text=True, timeout=300,
                          env={**clean, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


_NOTHING_HEAVY = (f"import importlib.util\nheavy = [m for m in {HEAVY!r} if importlib.util.find_spec(m)]\n"
                  "assert not heavy, f'installed in the slim venv: {heavy}'\n")


@pytest.mark.slow
def test_leaderboard_space_runs_from_its_requirements_alone(tmp_path):
    from importlib.metadata import version

    folder = build_space("leaderboard", tmp_path / "space")
    python = _slim_venv(tmp_path / "venv", folder, [f"gradio=={version('gradio')}"])  # the SDK's gradio
    results = tmp_path / "results"
    for i, obj in enumerate(sample_results()):
        write_results(obj, results / f"m{i}" / "results.json")
    out = _run_in(python, folder, _NOTHING_HEAVY + "import app\nboard = app.load_leaderboard(app.os.environ['VRP_RESULTS_DIR'])\n"
                  "print(len(board.results), len(board.skipped), type(app.demo).__name__)",
                  VRP_RESULTS_DIR=str(results))
    assert out.split() == ["3", "0", "Blocks"]


@pytest.mark.slow
def test_metric_spaces_compute_from_their_requirements_alone(tmp_path):
    from vrp_eval.calibration import calibration_summary
    from vrp_eval.vqa import vqa_accuracy

    folders = [build_space(name, tmp_path / name) for name in METRIC_NAMES]
    # The four metric Spaces share one requirements set (the test relies on it to build one venv).
    assert len({(f / "requirements.txt").read_text() for f in folders}) == 1
    python = _slim_venv(tmp_path / "venv", folders[0], [])
    code = (_NOTHING_HEAVY + "import json, evaluate\n"
            f"ece = evaluate.load('vrp_ece.py').compute(confidences={CONF}, scores={SCORE}, n_bins=5)['ece']\n"
            "print(json.dumps(ece))\n")
    assert json.loads(_run_in(python, folders[0], code)) == calibration_summary(CONF, SCORE, n_bins=5)["ece"]
    code = (_NOTHING_HEAVY + "import json, evaluate\n"
            "m = evaluate.load('vrp_vqa_accuracy.py')\n"
            "print(json.dumps(m.compute(predictions=['Two dogs.', 'dont'], references=[['2 dogs'] * 10, ['no'] * 10])))\n")
    expected = (vqa_accuracy("Two dogs.", ["2 dogs"] * 10) + vqa_accuracy("dont", ["no"] * 10)) / 2
    assert expected == 0.5  # the normaliser ran: "Two dogs." -> "2 dogs"
    assert json.loads(_run_in(python, folders[3], code))["accuracy"] == expected
