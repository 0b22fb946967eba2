"""The installed wheel is the product: built from this checkout, installed into a fresh venv, and used
offline from a folder outside the checkout, as a `pip install vrp-eval` user would.

The one test that sees what a checkout hides: package data that the wheel leaves out, an entry point
that only an editable install provides, a requirement the wheel declares that the lock does not meet.

The fresh venv gets the wheel alone (`--no-deps`); its dependencies are the locked ones `make setup`
installed, seen through a `.pth` line. A second copy of torch and friends is 7 GB of disk and 2-3
minutes for nothing this test checks (`make setup` on a fresh clone already installs the lock), and on a
shared CI disk it was the difference between green and `No space left on device`. A `.pth` line adds
the folder to `sys.path` without running the `.pth` files inside it, so the checkout's editable finder
stays out: the import test below proves the wheel's copy is the one used.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from vrp_eval.spaces import METRIC_NAMES

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"

pytestmark = pytest.mark.slow


def _run(command, cwd, env=None, timeout=900):
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, a work folder outside the checkout, offline environment)."""
    root = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: build with the locked setuptools already here, without the registry.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
          "-w", root / "dist", REPO], cwd=root)
    (wheel,) = (root / "dist").glob("vrp_eval-*.whl")
    # --without-pip: the venv's own pip and setuptools 65 would shadow the locked ones; the locked pip,
    # seen through the .pth line, installs into this venv (its sys.prefix).
    _run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], cwd=root)
    bin_dir = root / "venv" / "bin"
    site = Path(_run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    locked = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (site / "vrp-eval-locked-deps.pth").write_text("".join(f"{path}\n" for path in locked))
    _run([bin_dir / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], cwd=root)
    # Every requirement the wheel declares is met by the locked set, at the locked versions.
    _run([bin_dir / "python", "-m", "pip", "check"], cwd=root)
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    return wheel, bin_dir, work, env


def test_the_wheel_carries_every_public_feature(installed):
    wheel, *_ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in METRIC_NAMES:
        assert f"vrp_eval/metrics/{name}/{name}.py" in names
        assert f"vrp_eval/metrics/{name}/README.md" in names
    for path in ("vrp_eval/leaderboard/app.py", "vrp_eval/tasks/vrp_synth.yaml", "vrp_eval/tasks/utils.py",
                 "vrp_eval/tasks_lm/vrp_text_synth.yaml", "vrp_eval/zoo/tiny-llava/config.json"):
        assert path in names, path


def test_installed_package_is_used_not_the_checkout(installed):
    _, bin_dir, work, env = installed
    done = _run([bin_dir / "python", "-c", "import vrp_eval, vrp_eval.spaces as s; print(vrp_eval.__file__); "
                 "print(s.metric_path('vrp_ece'))"], cwd=work, env=env)
    module_file, metric = done.stdout.split()
    assert str(REPO) not in module_file and str(REPO) not in metric
    assert Path(metric, "vrp_ece.py").is_file()


def test_run_from_the_wheel(installed):
    _, bin_dir, work, env = installed
    out = work / "run"
    _run([bin_dir / "vrp-eval", "run", "--limit", "8", "--output", out, "--n-bootstrap", "50"], cwd=work, env=env)
    results = json.loads((out / "results.json").read_text())
    (metrics,) = results["results"].values()
    assert metrics["n_samples"] == 8
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["ece"] <= 1.0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 8


def test_the_four_metrics_load_and_compute_from_the_wheel(installed):
    _, bin_dir, work, env = installed
    code = """
import json, evaluate, scipy.stats
from vrp_eval.spaces import metric_path
conf, score = [0.9, 0.8, 0.3, 0.6], [1.0, 0.0, 0.0, 1.0]
out = {
    "vrp_ece": evaluate.load(metric_path("vrp_ece")).compute(confidences=conf, scores=score, n_bins=2)["ece"],
    "vrp_attention_confidence": evaluate.load(metric_path("vrp_attention_confidence")).compute(
        sharpness=[0.1, 0.2, 0.3, 0.4], confidences=conf, scores=score)["attn_conf_r"],
    "vrp_causal_drop": evaluate.load(metric_path("vrp_causal_drop")).compute(
        clean_scores=[1, 1, 1, 0], corrupted_scores=[0, 1, 0, 0], n_bootstrap=20)["causal_acc_drop"],
    "vrp_vqa_accuracy": evaluate.load(metric_path("vrp_vqa_accuracy")).compute(
        predictions=["Two."], references=[["2"] * 3 + ["3"] * 7])["accuracy"],
    "scipy_pearson": float(scipy.stats.pearsonr([0.1, 0.2, 0.3, 0.4], conf).statistic),
}
print(json.dumps(out))
"""
    values = json.loads(_run([bin_dir / "python", "-c", code], cwd=work, env=env).stdout.splitlines()[-1])
    # Hand-computed. ECE, 2 bins (0, .5], (.5, 1]: {0.3} gap 0.3, {0.6, 0.8, 0.9} mean 0.7667 vs 2/3.
    assert values["vrp_ece"] == pytest.approx((0.3 + 3 * (2.3 / 3 - 2 / 3)) / 4, abs=1e-12)  # float64 sums of 4 terms
    # scipy's Pearson is the oracle; both are float64 sums over 4 values: round-off ~1e-16.
    assert values["vrp_attention_confidence"] == pytest.approx(values["scipy_pearson"], abs=1e-12)
    # Relative drop (corrupted - clean) / clean = (0.25 - 0.75) / 0.75; "Two." normalises to "2",
    # which 3 of 10 humans gave -> 0.9. Both are a few float64 operations.
    assert values["vrp_causal_drop"] == pytest.approx((1 / 4 - 3 / 4) / (3 / 4), abs=1e-12)
    assert values["vrp_vqa_accuracy"] == pytest.approx(0.9, abs=1e-12)


def test_lmms_eval_backend_and_task_from_the_wheel(installed):
    _, bin_dir, work, env = installed
    out = work / "lmms"
    # What the `lmms-eval` console script runs (the script itself belongs to lmms-eval's install).
    lmms_eval = [bin_dir / "python", "-c", "import sys; from lmms_eval.cli.dispatch import main; "
                 "sys.argv[0] = 'lmms-eval'; sys.exit(main())"]
    done = _run([*lmms_eval, "--model", "vrp", "--model_args", "pretrained=tiny-llava,device=cpu,n_bootstrap=20",
                 "--tasks", "vrp_synth", "--limit", "4", "--batch_size", "4", "--output_path", out,
                 "--verbosity", "WARNING"], cwd=work, env=env)
    assert "Error during evaluation" not in done.stdout + done.stderr
    (results_file,) = out.glob("**/*_results.json")
    results = json.loads(results_file.read_text())["results"]["vrp_synth"]
    accuracy = {k.split(",")[0]: v for k, v in results.items()}["accuracy"]
    assert 0.0 <= accuracy <= 1.0
