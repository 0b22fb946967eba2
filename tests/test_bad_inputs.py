"""Every row of docs/bad-inputs.md, run as written: one clear line on stderr, the documented exit code,
and nothing written where it should not be. Plus the behaviours behind the table that are not one
command: validation before the model loads, one option parser for the CLI and both harnesses,
output folders that never mix two runs, and --debug."""
from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest
from sample_results import sample_results

from vrp_eval.cli import main
from vrp_eval.results import write_results

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
ROW = re.compile(r"^\| `(vrp-eval [^`]+)` \| `([^`]+)` \| (\d) \|$")


def table() -> list[tuple[str, str, int]]:
    rows = [(m[1], m[2], int(m[3])) for m in map(ROW.match, DOC.read_text(encoding="utf-8").splitlines()) if m]
    assert len(rows) >= 40, "the table in docs/bad-inputs.md was not found or lost rows"
    return rows


def _synth_rows(n: int) -> list[dict]:
    from vrp_eval import synth

    rows = []
    for row in synth.generate("validation", n=n):
        buffer = io.BytesIO()
        row["image"].save(buffer, format="PNG")
        rows.append({"question_id": row["question_id"], "question": row["question"],
                     "image": {"bytes": buffer.getvalue(), "path": None},
                     "answers": [a["answer"] for a in row["answers"]]})
    return rows


def _parquet(rows: list[dict], path: Path, keep: int | None = None) -> str:
    import datasets

    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "image": datasets.Image(), "answers": datasets.Sequence(datasets.Value("string"))})
    data = datasets.Dataset.from_list(rows, features=features)
    data.select(range(keep if keep is not None else len(data))).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """The placeholders of the table."""
    import shutil

    from vrp_eval.zoo import zoo_path

    root = tmp_path_factory.mktemp("bad-inputs")
    rows = _synth_rows(6)
    dupes = [dict(r) for r in rows]
    dupes[4]["question_id"] = dupes[1]["question_id"]  # two different questions under one id
    (root / "file.txt").write_text("not a folder, not a dataset\n")
    badconfig = root / "badconfig"
    shutil.copytree(zoo_path("tiny-llava"), badconfig)
    (badconfig / "config.json").write_text("{not json")
    (root / "noanswer.jsonl").write_text('{"question_id": 1, "question": "what?", "image": "x.png"}\n')
    (root / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "list.json").write_text("[1, 2]")
    finished = root / "finished"
    finished.mkdir()
    (finished / "results.json").write_text("{}")
    (finished / "samples.jsonl").write_text("")
    write_results(sample_results()[0], root / "results.json")
    return {"file": str(root / "file.txt"), "dupes": _parquet(dupes, root / "dupes.parquet"),
            "empty": _parquet(rows, root / "empty.parquet", keep=0), "noanswer": str(root / "noanswer.jsonl"),
            "badconfig": str(badconfig), "nested": str(root / "nested.json"), "jsonlist": str(root / "list.json"),
            "finished": str(finished), "results": str(root / "results.json"), "dead": "http://127.0.0.1:9"}


@pytest.mark.parametrize(("command", "message", "code"), table(), ids=[row[0][9:60] for row in table()])
def test_documented_bad_input(command, message, code, files, tmp_path, capsys, monkeypatch):
    import torch

    if "--device cuda" in command and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: `--device cuda` is not a bad input here")
    out = tmp_path / "out"
    argv = [part.format(out=out, **files) for part in shlex.split(command)][1:]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token, no cache from elsewhere
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("VRP_TEST_TOKEN", "hf_test_token_not_real")
    if "{dead}" in command:  # the only rows that talk to a "Hub": a loopback port where nothing listens
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    try:
        result = main(argv)
    except SystemExit as exited:  # argparse reports option errors itself, also with exit code 2
        result = exited.code
    err = capsys.readouterr().err
    assert result == code, err
    assert message in err, err
    assert "Traceback" not in err
    # One message line (progress bars of transformers / datasets may precede it on stderr).
    ours = [line for line in err.splitlines() if line.startswith(f"vrp-eval {argv[0]}")]
    assert len(ours) == 1, f"one message expected, got:\n{err}"
    assert "hf_test_token_not_real" not in err
    if "{out}" in command and "space build" not in command:
        assert not (out / "results.json").exists() and not (out / "samples.jsonl").exists()


# --- behaviours behind the table ---------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--n-noise", "0"], ["--dataset", "{dupes}"], ["--dataset", "{noanswer}"],
                                  ["--device", "tpu9"], ["--output", "/dev/null/x"]])
def test_bad_input_is_refused_before_the_model_loads(argv, files, monkeypatch, capsys, tmp_path):
    import vrp_eval.loading

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(vrp_eval.loading, "load_model", load_model)
    argv = ["run", "--output", str(tmp_path / "o"), *(a.format(**files) for a in argv)]
    try:
        code = main(argv)
    except SystemExit as exited:  # argparse's own exit for an option error
        code = exited.code
    assert code == 2, capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "many"])
def test_one_parser_for_cli_lmms_and_lm_eval(value):
    # The same option, the same message, whichever front end it came through.
    from vrp_eval.lm import parse_model_args as lm_args
    from vrp_eval.lmms import parse_model_args as lmms_args
    from vrp_eval.options import OptionError, option
    from vrp_eval.probe import ProbeSettings

    with pytest.raises(OptionError) as direct:
        option("n_noise").parse(value)
    for front in (lambda: lmms_args({"pretrained": "tiny-llava", "n_noise": value}),
                  lambda: lm_args({"pretrained": "tiny-text-llama", "n_noise": value}),
                  lambda: ProbeSettings(n_noise=value)):
        with pytest.raises(OptionError) as caught:
            front()
        assert str(caught.value) == str(direct.value)
    assert "n_noise (--n-noise)" in str(direct.value) and repr(value) in str(direct.value)


def test_settings_are_normalised_once():
    from vrp_eval.options import DEFAULTS
    from vrp_eval.probe import ProbeSettings

    settings = ProbeSettings(layers="6-7,2", signals="tracing;attention", n_noise="3", noise_scale="1.5")
    assert settings.layers == (2, 6, 7) and settings.signals == ("tracing", "attention")
    assert settings.n_noise == 3 and settings.noise_scale == 1.5
    assert ProbeSettings(signals="").signals == ()  # the probe off: answers and calibration only
    assert ProbeSettings().to_dict() == {**DEFAULTS, "signals": list(DEFAULTS["signals"])}


def test_n_calibration_above_64_is_used(monkeypatch):
    # It was capped at 64 without a word (prepare_engine did not pass the count on).
    from tracing_models import tiny_loaded

    import vrp_eval.intervention
    from vrp_eval.data import load_examples
    from vrp_eval.probe import ProbeSettings, prepare_engine

    seen = {}
    real = vrp_eval.intervention.estimate_sigma

    def spy(loaded, batches, max_samples=64, **kwargs):
        batches = list(batches)
        seen["samples"] = min(max_samples, sum(b["input_ids"].shape[0] for b in batches))
        return real(loaded, batches, max_samples=max_samples, **kwargs)

    monkeypatch.setattr(vrp_eval.intervention, "estimate_sigma", spy)
    loaded = tiny_loaded("llava")
    examples = load_examples("vrp-synth", "validation", 80)
    prepare_engine(loaded, examples, ProbeSettings(n_calibration=80, batch_size=40, signals=("tracing",)))
    assert seen["samples"] == 80


def test_overwrite_leaves_no_file_of_the_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["run", "--limit", "6", "--n-bootstrap", "10", "--output", str(out)]
    assert main([*common, "--signals", "attention,tracing", "--n-noise", "1"]) == 0
    assert {"trace_heatmap.png", "ie_curves.png"} <= {p.name for p in out.iterdir()}
    (out / "mine.txt").write_text("not vrp-eval's")
    assert main([*common, "--signals", "", "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "trace_heatmap.png" not in names and "ie_curves.png" not in names  # stale pictures are gone
    assert "sharpness_confidence.png" not in names and "mine.txt" in names  # ... and only ours
    # Without --overwrite, other settings are refused and the finished run is untouched.
    before = (out / "results.json").read_bytes()
    assert main([*common, "--signals", "attention"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_debug_shows_the_traceback(capsys, monkeypatch):
    from vrp_eval.data import DataError

    with pytest.raises(DataError, match="unknown split"):
        main(["--debug", "run", "--split", "dev", "--output", "/tmp/vrp-never-written"])
    monkeypatch.setenv("VRP_EVAL_DEBUG", "1")
    with pytest.raises(DataError, match="unknown split"):
        main(["run", "--split", "dev", "--output", "/tmp/vrp-never-written"])
    monkeypatch.delenv("VRP_EVAL_DEBUG")
    assert main(["run", "--split", "dev", "--output", "/tmp/vrp-never-written"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
