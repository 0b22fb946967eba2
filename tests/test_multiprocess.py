"""`lmms-eval --model vrp` with two real processes reports what one process reports.

Only the public CLI: the same `lmms-eval ... --tasks vrp_synth` command runs once in one process and
once under each two-process launcher of docs/multi-process.md (torchrun, and `accelerate launch
--multi_gpu`, which on a CPU machine needs ACCELERATE_USE_CPU=true to build a gloo group; `accelerate
launch --cpu --num_processes 2` starts one process). The results JSONs must agree.

That two ranks really ran is read from lmms-eval's own log, not assumed: rank 1 announces itself, and
rank 0 post-processes only its shard while the results count every sample (so the shards were
gathered). Checked by hand on mutated copies of vrp_eval/lmms.py: the test fails when the noise
scale is calibrated on each rank's own first samples, or when the circuit is chosen per rank.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TASK = "vrp_synth"
# Small enough that each rank's half of the discovery samples alone would choose another circuit
# than all of them (rank 1 picks layers 1-2, the whole run 4-5): a run that skipped the all-gather
# before the circuit choice fails here, not only in theory. Odd on purpose: rank 0 gets 9 documents,
# rank 1 gets 8 plus one repeat of its own last request (lmms-eval pads ranks to equal length), which
# the backend must probe once and which must not count.
LIMIT = 17
RANK0_DOCS = (LIMIT + 1) // 2
# n_calibration 8 < the 9 documents of rank 0: the noise scale must come from the 8 smallest doc ids
# over both ranks, as in one process; a rank-local choice estimates another sigma. --batch_size 4 gives
# each rank several batches. n_noise / n_bootstrap keep the run short.
MODEL_ARGS = "pretrained=tiny-llava,device=cpu,n_noise=2,n_calibration=8,n_bootstrap=200"
COMMAND = ["--model", "vrp", "--model_args", MODEL_ARGS, "--tasks", TASK, "--limit", str(LIMIT),
           "--batch_size", "4", "--verbosity", "INFO"]
LAUNCHERS = {
    "torchrun": [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lmms_eval"],
    "accelerate": [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "lmms_eval"],
}
# Decided by discrete events (answers, counts, the chosen layer windows): nothing may differ.
EXACT = ("accuracy", "n_samples", "n_heldout", "circuit_layers", "control_layers", "integration_layer")
# Every other metric is a float64 aggregate of per-sample float32 values (confidences, attention
# masses, sharpness) that the model computes batch by batch, and the batches differ: one process
# batches docs 0-3, 4-7, ...; rank 0 batches docs 0, 2, 4, 6. A prompt computed beside other prompts
# (other left padding, other matrix shapes) rounds differently in float32. Measured at this size with
# --log_samples: 4 of 17 confidences move, by at most 3.6e-7 (4.8e-7 relative, a few float32 ulps);
# the knockout windows, the circuit and every answer are identical. In the aggregates: Pearson p-values
# up to 4.3e-7, r up to 1.5e-7, mce 2.4e-7 (its worst bin holds one sample, whose shift it carries
# undiluted), ECE and means 4e-8 or less; at 47 and 48 samples (batch 8) the largest was 6.6e-7 (mce).
# 1e-5 is 15x that, and far below the smallest change a real disagreement makes (one answer, one bin
# or one bootstrap draw moves a metric by about 1/17 = 0.06).
FLOAT_TOLERANCE = 1e-5


def _environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            # A CPU test on every machine: gloo, not NCCL, even where a GPU is visible.
            "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}


def _evaluate(launcher: list[str], out: Path) -> tuple[dict, str]:
    """(the task's metrics from the results JSON, the combined log) of one run."""
    run = subprocess.run([*launcher, *COMMAND, "--output_path", str(out / "results")], check=False, cwd=out,
                         env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    log = run.stdout
    # lmms-eval reports an evaluation error in the log and still exits 0.
    assert run.returncode == 0 and "Error during evaluation" not in log, log[-4000:]
    (path,) = (out / "results").glob("*/*_results.json")
    results = json.loads(path.read_text())
    assert results["n-samples"][TASK]["effective"] == LIMIT
    metrics = {key.split(",")[0]: value for key, value in results["results"][TASK].items()
               if key != "alias" and "_stderr" not in key}
    return metrics, log


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    metrics, log = _evaluate([str(BIN / "lmms-eval")], tmp_path_factory.mktemp("one"))
    assert "Running on rank 1" not in log
    assert f"Postprocessed {LIMIT} docs for {TASK}" in log, log[-4000:]
    # A comparison with an empty or NaN run would pass for the wrong reason.
    assert metrics["n_samples"] == LIMIT and metrics["n_heldout"] > 0
    assert metrics["circuit_layers"] and metrics["control_layers"]
    assert all(math.isfinite(metrics[name]) for name in ("ece", "brier", "attn_conf_r", "causal_acc_drop"))
    return metrics


def _differences(one: dict, two: dict) -> dict[str, tuple]:
    """{metric: (one process, two processes)} of the metrics that disagree beyond the rules above."""
    wrong = {}
    for name in one.keys() | two.keys():
        a, b = one.get(name), two.get(name)
        if name in EXACT or not (isinstance(a, float) and isinstance(b, float)):
            same = a == b
        else:
            same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= FLOAT_TOLERANCE
        if not same:
            wrong[name] = (a, b)
    return wrong


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_report_what_one_process_reports(launcher, one_process, tmp_path):
    two, log = _evaluate(LAUNCHERS[launcher], tmp_path)
    # Two ranks ran, each on its shard, and rank 0 aggregated both shards.
    assert "Running on rank 1 (local rank 1)" in log, log[-4000:]
    assert f"Postprocessed {RANK0_DOCS} docs for {TASK}" in log, log[-4000:]
    assert two["n_samples"] == LIMIT
    assert _differences(one_process, two) == {}


def test_the_comparison_catches_a_disagreement(one_process):
    """The rules can fail: a moved window, a changed count or a float shift beyond float32 noise."""
    assert _differences(one_process, dict(one_process)) == {}
    for name, value in [("circuit_layers", [*one_process["circuit_layers"], 99]), ("n_samples", LIMIT - 1), ("ece", one_process["ece"] + 1e-4),
                        ("accuracy", one_process["accuracy"] + 1e-9)]:
        assert name in _differences(one_process, {**one_process, name: value})
    assert "ece" in _differences(one_process, {k: v for k, v in one_process.items() if k != "ece"})
