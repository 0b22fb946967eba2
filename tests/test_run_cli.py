"""`vrp-eval run` end to end on the shipped tiny-llava, its files, resume, and bad input."""
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vrp_eval.cli import main
from vrp_eval.results import read_results

SPEC_METRICS = ("accuracy", "ece", "mce", "ace", "brier", "attn_conf_r", "attn_acc_r", "attn_overconf_r",
                "causal_acc_drop", "control_acc_drop", "circuit_layers", "integration_layer", "n_samples")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The real console command, as a user types it (offline), on 48 samples with every default signal."""
    out = tmp_path_factory.mktemp("run") / "tiny-llava"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).with_name("vrp-eval")), "run", "--limit", "48", "--output", str(out),
               "--n-bootstrap", "200"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


@pytest.mark.slow
def test_run_writes_a_complete_report(full_run):
    out, stdout = full_run
    results = read_results(out / "results.json")
    metrics = results["results"]["vrp_synth"]
    for name in SPEC_METRICS:
        assert name in metrics, name
    assert metrics["n_samples"] == 48
    assert results["config"]["model_name"] == "tiny-llava" and results["config"]["model_family"] == "llava"
    assert results["config"]["probe"]["limit"] == 48 and "transformers" in results["config"]["versions"]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 48
    record = lines[0]
    for key in ("question_id", "question", "answer", "score", "confidence", "p_clean", "p_corrupted", "ie",
                "sharpness", "sharpness_per_layer", "image_attention_mass", "half"):
        assert key in record, key
    assert set(record["ie"]) == {"image", "text", "last"} and len(record["ie"]["image"]) == 8
    # The aggregate is the mean of what samples.jsonl says: the two files agree. JSON keeps the floats'
    # repr, so only float64 summation order may differ: <= 48 eps ~ 1e-14 (measured exact).
    assert metrics["accuracy"] == pytest.approx(sum(r["score"] for r in lines) / 48, abs=1e-12)
    for r in lines:
        assert 0.0 <= r["score"] <= 1.0 and 0.0 < r["confidence"] <= 1.0
        # float64 round-off: the run stores exp(sum of logs), this is the product (measured exact)
        assert r["confidence"] == pytest.approx(math.prod(r["token_probs"]), rel=1e-12)
        if r["half"] == "discovery":
            assert r["knockout_scores"] is not None and r["corrupted_score"] is None
        else:
            assert r["corrupted_score"] is not None and r["sharpness_corrupted"] is not None
    first, last = metrics["circuit_layers"]
    assert 0 <= first <= last < 8 and last - first + 1 == 2  # ceil(8 / 4)
    for picture in ("reliability.png", "trace_heatmap.png", "ie_curves.png", "sharpness_confidence.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    assert "ece" in stdout and "causal_acc_drop" in stdout


@pytest.mark.slow
def test_rerun_resumes_from_what_was_written(full_run, capsys):
    out, _ = full_run
    before = (out / "samples.jsonl").read_text()
    code = main(["run", "--limit", "48", "--output", str(out), "--n-bootstrap", "200"])
    assert code == 0
    assert (out / "samples.jsonl").read_text() == before  # nothing recomputed differently
    capsys.readouterr()
    code = main(["run", "--limit", "48", "--output", str(out), "--n-bootstrap", "100"])
    assert code == 2
    assert "other settings" in capsys.readouterr().err


def _err(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_a_partial_run_from_another_version_is_refused_with_the_fix(capsys, tmp_path):
    """Resuming reads pass1.partial.jsonl back into records: rows another vrp-eval version wrote (a field
    this one does not have) get the folder, the field and the fix, not a TypeError."""
    code, err = _err(capsys, ["run", "--limit", "4", "--signals", "", "--output", str(tmp_path)])
    assert code == 0, err
    partial = tmp_path / "pass1.partial.jsonl"
    partial.write_text('{"question_id": 1, "seconds": {"answer": 0.1}}\n')
    (tmp_path / "samples.jsonl").unlink()
    code, err = _err(capsys, ["run", "--limit", "4", "--signals", "", "--output", str(tmp_path)])
    assert code == 2 and "pass1.partial.jsonl" in err and "unknown fields seconds" in err and "--overwrite" in err


def test_unknown_model_name(capsys, tmp_path):
    code, err = _err(capsys, ["run", "--model", "tiny-llavaa", "--limit", "2", "--output", str(tmp_path)])
    assert code == 2 and "tiny-llavaa" in err and "zoo model" in err


def test_missing_split(capsys, tmp_path):
    code, err = _err(capsys, ["run", "--split", "dev", "--limit", "2", "--output", str(tmp_path)])
    assert code == 2 and "dev" in err and "validation" in err


def test_limit_zero(capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:  # an option error: argparse reports it, before anything runs
        main(["run", "--limit", "0", "--output", str(tmp_path)])
    assert exited.value.code == 2 and "argument --limit: '0': must be an integer >= 1" in capsys.readouterr().err


def test_layer_out_of_range(capsys, tmp_path):
    code, err = _err(capsys, ["run", "--limit", "4", "--layers", "3-9", "--output", str(tmp_path)])
    assert code == 2 and "out of range" in err and "0..7" in err


def _parquet_with_a_corrupt_image(tmp_path):
    import datasets

    from vrp_eval import synth

    rows = synth.generate("validation", n=6)
    records = []
    for i, row in enumerate(rows):
        buffer = io.BytesIO()
        row["image"].save(buffer, format="PNG")
        data = buffer.getvalue() if i != 3 else b"\x89PNG not really an image"
        records.append({"question_id": row["question_id"], "question": row["question"],
                        "image": {"bytes": data, "path": None},
                        "answers": [a["answer"] for a in row["answers"]]})
    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "image": datasets.Image(), "answers": datasets.Sequence(datasets.Value("string"))})
    path = tmp_path / "validation.parquet"
    datasets.Dataset.from_list(records, features=features).to_parquet(str(path))
    return path, rows[3]["question_id"]


def test_corrupt_image_names_the_sample_and_keeps_finished_work(capsys, tmp_path):
    path, bad_id = _parquet_with_a_corrupt_image(tmp_path)
    out = tmp_path / "out"
    code, err = _err(capsys, ["run", "--dataset", str(path), "--batch-size", "2", "--signals", "attention",
                              "--output", str(out)])
    assert code == 2 and str(bad_id) in err and "--on-bad-image skip" in err
    # The first full batches were written before the bad one and are kept for a resume.
    assert len((out / "pass1.partial.jsonl").read_text().splitlines()) == 2
    code = main(["run", "--dataset", str(path), "--batch-size", "2", "--signals", "attention",
                 "--on-bad-image", "skip", "--output", str(tmp_path / "skip")])
    assert code == 0
    results = read_results(tmp_path / "skip" / "results.json")
    assert results["results"]["vrp_validation"]["n_samples"] == 5
    assert results["results"]["vrp_validation"]["n_skipped"] == 1
