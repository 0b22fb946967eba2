"""lmms-eval integration: the `vrp` backend, the vrp_* tasks and the records they carry.

The end-to-end tests run the real `lmms-eval` CLI in a subprocess (offline) and compare its results
file with `run_probe` on the same samples and settings, in this process.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vrp_eval import lmms
from vrp_eval.lmms import (
    RELIABILITY_METRICS,
    decode_response,
    encode_response,
    parse_model_args,
)

SPEC_METRICS = ("accuracy", "ece", "mce", "ace", "brier", "attn_conf_r", "attn_acc_r", "attn_overconf_r",
                "causal_acc_drop", "control_acc_drop", "circuit_layers", "integration_layer", "n_samples")
TASKS = ("vrp_vqav2", "vrp_vqav2_lite", "vrp_okvqa", "vrp_scienceqa_img", "vrp_pope", "vrp_synth", "vrp_synth_mc")
LMMS_EVAL = Path(sys.executable).with_name("lmms-eval")
SYNTH = lmms.tasks_dir() / "vrp_synth" / "validation.parquet"

# Small but every signal on: what both runs below use (model_args <-> ProbeSettings).
LIMIT, BATCH = 16, 8
PROBE_OPTIONS = {"n_bootstrap": 200, "n_noise": 2, "n_calibration": 8}


def _offline_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _lmms_eval(args, tmp_path):
    run = subprocess.run([str(LMMS_EVAL), *args, "--output_path", str(tmp_path), "--verbosity", "WARNING"],
                         capture_output=True, text=True, env=_offline_env(), cwd=tmp_path, timeout=600)
    assert run.returncode == 0 and "Error during evaluation" not in run.stdout, run.stdout[-4000:] + run.stderr[-4000:]
    (results,) = tmp_path.glob("**/*_results.json")
    return json.loads(results.read_text()), run.stdout + run.stderr


# --- the payload ------------------------------------------------------------------------------

def test_earlier_inline_payloads_still_round_trip_through_lmms_eval_stripping():
    """vrp-eval before the record channel appended the record to the answer; its cached responses
    and samples logs still read."""
    record = {"answer": "two </vrp-record> <vrp-record>", "confidence": 0.25, "ie": {"last": [0.1, float("nan")]}}
    text = encode_response(record["answer"], {"format": lmms.PAYLOAD_FORMAT, "doc_id": 3, "record": record})
    answer, payload = decode_response(("  " + text + "\n").strip())  # lmms-eval strips responses
    assert answer == record["answer"]
    assert payload["doc_id"] == 3 and payload["record"]["confidence"] == 0.25
    assert math.isnan(payload["record"]["ie"]["last"][1])
    assert decode_response("yes") == ("yes", None)
    assert decode_response("a <vrp-record>{}</vrp-record>") == ("a <vrp-record>{}</vrp-record>", None)


# --- model arguments --------------------------------------------------------------------------

def test_model_args_become_probe_settings_and_loading_options():
    # As lmms-eval's simple_parse_args_string leaves them: numbers converted, the rest strings.
    model_id, settings, load = parse_model_args({
        "pretrained": "tiny-llava", "signals": "attention;tracing", "layers": "[2,3,5]", "window": 2,
        "noise_scale": 2, "noise": "mean", "n_noise": "4", "seed": 7, "dtype": "float32", "device": "cpu",
        "batch_size": "4", "max_batch_size": None,
    })
    assert model_id == "tiny-llava" and load == {"dtype": "float32", "device": "cpu"}
    assert settings.signals == ("attention", "tracing") and settings.layers == (2, 3, 5)
    assert (settings.window, settings.noise_scale, settings.noise, settings.n_noise) == (2, 2.0, "mean", 4)
    assert (settings.seed, settings.batch_size) == (7, 4)
    assert parse_model_args({"batch_size": "auto"})[1].batch_size == type(settings)().batch_size


@pytest.mark.parametrize("args, message", [
    ({"temperature": 0.5}, "unknown model argument 'temperature'"),
    ({"limit": 5}, "--limit"),
    ({"n_noise": "many"}, r"n_noise \(--n-noise\) = 'many': must be an integer >= 1"),
])
def test_bad_model_args_say_what_to_do(args, message):
    with pytest.raises(ValueError, match=message):
        parse_model_args(args)


# --- the tasks --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task_manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager("ERROR")  # lmms_eval.models imported vrp_eval.lmms: our folder is indexed


def test_tasks_are_found_without_include_path_and_list_every_metric(task_manager):
    from lmms_eval.utils import load_yaml_config

    manager = task_manager
    for task in TASKS:
        assert task in manager.all_tasks, task
        config = load_yaml_config(manager.task_index[task]["yaml_path"], mode="full")
        metrics = [m["metric"] for m in config["metric_list"]]
        assert metrics[: len(RELIABILITY_METRICS) + 1] == ["accuracy", *RELIABILITY_METRICS], task
        assert set(SPEC_METRICS) <= set(metrics)
        assert callable(config["process_results"]) and callable(config["doc_to_text"])
    # a built-in task keeps its own definition
    assert "site-packages" in manager.task_index["vqav2_val"]["yaml_path"]


def test_task_prompts_are_the_upstream_tasks_prompts(task_manager):
    import datasets
    from lmms_eval.utils import load_yaml_config

    from vrp_eval.adapters import DEFAULT_POST_PROMPT
    from vrp_eval.data import to_example

    manager = task_manager
    for task, upstream in (("vrp_synth", "vqav2_val"), ("vrp_scienceqa_img", "scienceqa_img")):
        ours = load_yaml_config(manager.task_index[task]["yaml_path"], mode="full")
        theirs = load_yaml_config(manager.task_index[upstream]["yaml_path"], mode="full")
        # the same function (lmms-eval loads the upstream utils.py by path, we import it)
        assert ours["doc_to_text"].__code__.co_filename == theirs["doc_to_text"].__code__.co_filename
        assert ours["doc_to_text"].__qualname__ == theirs["doc_to_text"].__qualname__
        assert ours["lmms_eval_specific_kwargs"]["default"] == theirs["lmms_eval_specific_kwargs"]["default"]
    # vrp_synth and vrp_synth_mc ask what `vrp-eval run` asks on the same row (multiple choice under
    # the default likelihood scoring: the open question; the options are scored, not listed)
    for task in ("vrp_synth", "vrp_synth_mc"):
        ours = load_yaml_config(manager.task_index[task]["yaml_path"], mode="full")
        data = Path(lmms.tasks_dir(), ours["dataset_kwargs"]["data_files"]["validation"])
        doc = datasets.load_dataset("parquet", data_files=str(data), split="train")[0]
        context = ours["doc_to_text"](doc, ours["lmms_eval_specific_kwargs"]["default"])
        assert context == to_example(doc, 0).prompt_text(DEFAULT_POST_PROMPT)
        assert context.endswith(DEFAULT_POST_PROMPT) and "A. " not in context


def test_the_probe_sees_the_task_context(random_tiny_dirs, monkeypatch):
    from vrp_eval.data import load_examples, with_prompt
    from vrp_eval.loading import load_model
    from vrp_eval.probe import ProbeSettings, run_probe

    loaded = load_model(str(random_tiny_dirs["llava"]), device="cpu")
    seen = []
    build = loaded.adapter.build_prompt
    monkeypatch.setattr(loaded.adapter, "build_prompt", lambda text: seen.append(text) or build(text))
    example = with_prompt(load_examples(str(SYNTH), limit=1)[0], "PRE what color is it? POST")
    run_probe(loaded, ProbeSettings(signals=(), n_bootstrap=10), examples=[example], progress=False)
    assert seen and set(seen) == {"PRE what color is it? POST"}


def test_process_results_scores_the_plain_answer_with_the_upstream_metric(task_manager):
    import copy

    import datasets
    from lmms_eval.tasks.vqav2.utils import vqav2_process_results
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(task_manager.task_index["vrp_synth"]["yaml_path"], mode="full")
    docs = datasets.load_dataset("parquet", data_files=str(SYNTH), split="train").select(range(40))
    # minority answers of the hard items give fractional VQA accuracy
    for doc in docs:
        for answer in {a["answer"] for a in doc["answers"]}:
            expected = vqav2_process_results(copy.deepcopy(doc), [answer])["exact_match"]
            lmms.RECORDS.clear()
            plain = config["process_results"](doc, [answer])
            payload = {"format": lmms.PAYLOAD_FORMAT, "doc_id": 0, "record": {"answer": answer}}
            # the backend's record, left in the channel for this document (with its image; the
            # harness passes the document without it) and this answer
            lmms.RECORDS.put(dict(doc), answer, payload)
            probed = config["process_results"]({k: v for k, v in doc.items() if k != "image"}, [answer])
            inline = config["process_results"](doc, [encode_response(answer, payload)])  # an earlier vrp-eval
            assert plain["accuracy"] == probed["accuracy"] == inline["accuracy"] == expected
            assert plain["ece"].payload is None and probed["ece"].payload == inline["ece"].payload == payload
            # the samples log gets the record once, as n_probed's value
            assert json.loads(str(probed["n_probed"])) == payload and str(probed["ece"]) == "vrp-record"
    lmms.RECORDS.clear()
    assert len({a["answer"] for doc in docs for a in doc["answers"]}) > 5
    assert math.isnan(lmms.reliability_aggregation("ece")([plain["ece"]]))
    assert lmms.reliability_aggregation("n_samples")([plain["n_samples"]] * 3) == 3


# --- end to end: the real CLI ------------------------------------------------------------------

def _model(family, random_tiny_dirs):
    """The zoo model of `family` once its weights exist, a random-init one of the same build until then."""
    from vrp_eval.zoo import zoo_path

    name = f"tiny-{family}"
    return name if (zoo_path(name) / "config.json").exists() else str(random_tiny_dirs[family])


def _model_args(path):
    options = ",".join(f"{k}={';'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in PROBE_OPTIONS.items())
    return f"pretrained={path},device=cpu,{options}"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_lmms_eval_cli_reports_what_run_probe_computes(family, random_tiny_dirs, tmp_path):
    from vrp_eval.data import load_examples
    from vrp_eval.loading import load_model
    from vrp_eval.probe import ProbeSettings, run_probe

    model = _model(family, random_tiny_dirs)
    results, _ = _lmms_eval(["--model", "vrp", "--model_args", _model_args(model),
                             "--tasks", "vrp_synth", "--limit", str(LIMIT), "--batch_size", str(BATCH),
                             "--log_samples"], tmp_path)
    reported = {key.split(",")[0]: value for key, value in results["results"]["vrp_synth"].items()}

    loaded = load_model(model, device="cpu")
    settings = ProbeSettings(dataset=str(SYNTH), limit=LIMIT, batch_size=BATCH, **PROBE_OPTIONS)
    report = run_probe(loaded, settings, examples=load_examples(str(SYNTH), limit=LIMIT), progress=False)

    for name in SPEC_METRICS:
        assert name in reported, name
    for name, expected in report.metrics.items():
        if name in ("n_skipped",):
            continue
        assert name in reported, f"{name} is in vrp-eval's aggregate but not in the vrp_* tasks' metric_list"
        _assert_close(reported[name], expected, name)
    # the per-sample records travel in the samples log
    (samples,) = tmp_path.glob("**/*_samples_vrp_synth.jsonl")
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    # the responses are the plain answers, as any backend's; the records are n_probed's values
    responses = [r if isinstance(r := line["filtered_resps"], str) else r[0] for line in lines]  # logged unwrapped
    assert responses == [r.answer for r in report.records]
    logged = [json.loads(line["n_probed"])["record"] for line in lines]
    assert len(logged) == LIMIT
    for record, expected in zip(logged, report.records):
        for key, value in expected.__dict__.items():
            _assert_close(record[key], value, f"{expected.question_id}.{key}")
    # ... and come back as vrp-eval's report (`vrp-eval run --from-lmms`)
    from vrp_eval.lmms_results import read_lmms_results

    run = read_lmms_results(next(tmp_path.glob("**/*_results.json")))
    assert (run.task, run.config["model_sha"], run.settings.batch_size) == ("vrp_synth", loaded.model_sha, BATCH)
    _assert_close(run.metrics, report.metrics, "metrics")
    assert run.details.keys() == report.details.keys()
    # ... and reach a results dataset unchanged: `vrp-eval push` takes the lmms-eval file itself.
    from vrp_eval.cli import main as vrp_eval_main

    results_file = str(next(tmp_path.glob("**/*_results.json")))
    assert vrp_eval_main(["push", results_file, "--repo", "me/vrp-results", "--dry-run"]) == 0


def _assert_close(got, expected, name):
    """Equal, NaN equal to NaN (or JSON null). Exact by construction: the `vrp` backend runs this very
    run_probe once per task on the same samples in dataset order, so the same batches through the same
    kernels, with the same seeds; JSON keeps every float's repr. Measured: all 2864 numbers identical
    in both families (also with two threads in this process against one in lmms-eval's)."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), name
        for key in expected:
            _assert_close(got[key], expected[key], f"{name}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), name
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_close(g, e, f"{name}[{i}]")
    elif isinstance(expected, float) and math.isnan(expected):
        assert got is None or (isinstance(got, float) and math.isnan(got)), (name, got)
    else:
        assert got == expected, (name, got, expected)


@pytest.mark.slow
def test_an_ordinary_backend_reports_accuracy_and_warns_once(tmp_path):
    results, output = _lmms_eval(["--model", "dummy", "--model_args", "response=yes",
                                  "--tasks", "vrp_synth,vrp_synth_mc", "--limit", "12"], tmp_path)
    for task in ("vrp_synth", "vrp_synth_mc"):
        values = results["results"][task]
        assert values["accuracy,none"] >= 0 and values["n_samples,none"] == 12 and values["n_probed,none"] == 0
        assert all(math.isnan(values[f"{name},none"]) for name in RELIABILITY_METRICS
                   if name not in ("n_samples", "n_probed"))
    # 'yes' is right on the synth existence / spatial yes-no questions: the task's own metric scored it
    assert results["results"]["vrp_synth"]["accuracy,none"] > 0
    assert output.count("--model vrp") == 1


def test_samples_survive_the_pickling_that_gathers_them_across_processes():
    """lmms-eval sends every rank's per-sample metric values to rank 0 with pickle."""
    import pickle

    from vrp_eval.harness import LoggedRecord, RecordSample

    payload = {"format": lmms.PAYLOAD_FORMAT, "doc_id": 4, "record": {"answer": "red", "confidence": 0.5}}
    sample = RecordSample(4, 1.0, payload)
    for value in (sample, sample.logged()):
        back = pickle.loads(pickle.dumps(value))
        assert type(back) is type(value)
        assert (back.doc_id, back.task_score, back.payload, back.key) == (4, 1.0, payload, sample.key)
        assert str(back) == str(value)
    assert isinstance(sample.logged(), LoggedRecord) and json.loads(str(sample.logged())) == payload


def test_sharded_calibration_skips_images_that_do_not_decode():
    """With on_bad_image=skip, each process offers only samples whose image decodes for the shared
    noise calibration, as one process calibrates after dropping the bad ones."""
    from vrp_eval.data import load_examples

    examples = load_examples(str(SYNTH), limit=5)
    examples[1].image = b"not an image"
    kept, ids = lmms._usable(examples, [10, 11, 12, 13, 14], 3, skip_bad=True)
    assert ids == [10, 12, 13] and kept == [examples[0], examples[2], examples[3]]
    assert lmms._usable(examples, [10, 11, 12, 13, 14], 3, skip_bad=False)[1] == [10, 11, 12, 13, 14]
