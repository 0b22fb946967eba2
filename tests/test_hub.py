"""`vrp-eval push` / `vrp-eval card` with the real huggingface_hub client against a loopback fake Hub."""
from __future__ import annotations

import calendar
import json
import logging

import pytest
import yaml
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.repocard_data import model_index_to_eval_results
from sample_results import LMMS_TASK, TASK, sample_results, write_lmms_run

from vrp_eval.cli import main as cli
from vrp_eval.hub import (
    PushError,
    card_metadata,
    load_publishable,
    push_card,
    push_results,
    results_path,
    write_card,
)
from vrp_eval.results import dumps_results, read_results, write_results

REPO = "vrp-org/vrp-results"


@pytest.fixture
def results_file(tmp_path):
    return write_results(sample_results()[0], tmp_path / "results.json")


def test_push_then_snapshot_download_gives_back_the_same_results(fake_hub, tmp_path):
    paths = []
    for obj in sample_results():
        report = push_results(obj, REPO, token=fake_hub.token, endpoint=fake_hub.url)
        assert report.action == "uploaded" and report.commit_url.startswith(fake_hub.url)
        paths.append(report.path_in_repo)
    assert paths == ["llava-hf/llava-1.5-7b-hf/results_2025-06-01T10-00-00.json",
                     "google/paligemma-3b-mix-224/results_2025-06-02T11-30-00.json",
                     "Qwen/Qwen2-VL-7B-Instruct/results_2025-06-03T09-15-00.json"]

    local = snapshot_download(REPO, repo_type="dataset", endpoint=fake_hub.url, token=fake_hub.token,
                              cache_dir=tmp_path / "cache")
    for obj, path in zip(sample_results(), paths):
        downloaded = tmp_path / "cache" / local / path
        assert downloaded.read_text() == dumps_results(obj)
        back = read_results(downloaded)
        assert back["config"] == obj["config"]
        assert back["results"][TASK]["ece"] == obj["results"][TASK]["ece"]
        assert back["details"][TASK]["ie_curves"] == obj["details"][TASK]["ie_curves"]


def test_pushing_the_same_results_twice_does_not_duplicate(fake_hub, results_file):
    first = push_results(results_file, REPO, token=fake_hub.token, endpoint=fake_hub.url)
    commits = fake_hub.commits("dataset", REPO)
    second = push_results(results_file, REPO, token=fake_hub.token, endpoint=fake_hub.url)
    assert (first.action, second.action) == ("uploaded", "skipped")
    assert second.existing_path == first.path_in_repo
    assert fake_hub.commits("dataset", REPO) == commits
    assert list(fake_hub.files("dataset", REPO)) == [first.path_in_repo]


def test_different_results_with_the_same_timestamp_are_refused_not_overwritten(fake_hub, results_file):
    push_results(results_file, REPO, token=fake_hub.token, endpoint=fake_hub.url)
    changed = read_results(results_file)
    changed["results"][TASK]["ece"] = 0.5
    with pytest.raises(PushError, match="already holds different results"):
        push_results(changed, REPO, token=fake_hub.token, endpoint=fake_hub.url)
    stored = json.loads(fake_hub.files("dataset", REPO)[results_path(changed)])
    assert stored["results"][TASK]["ece"] == 0.21


def test_cli_push_takes_the_token_from_env_and_never_shows_it(fake_hub, results_file, monkeypatch, capsys, caplog):
    monkeypatch.setenv("VRP_TEST_TOKEN", fake_hub.token)
    caplog.set_level(logging.DEBUG)
    code = cli(["push", str(results_file), "--repo", REPO, "--endpoint", fake_hub.url, "--token-env", "VRP_TEST_TOKEN"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "uploaded datasets/vrp-org/vrp-results/llava-hf/llava-1.5-7b-hf/results_2025-06-01T10-00-00.json" in out
    assert fake_hub.token not in out + err + caplog.text
    # ... and it was the token that the Hub saw (the fake refuses writes without it)
    assert list(fake_hub.files("dataset", REPO)) == ["llava-hf/llava-1.5-7b-hf/results_2025-06-01T10-00-00.json"]

    monkeypatch.setenv("HF_TOKEN", fake_hub.token)  # default: HF_TOKEN
    assert cli(["push", str(results_file), "--repo", REPO, "--endpoint", fake_hub.url]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("skipped: identical results") and fake_hub.token not in out + err + caplog.text


def test_a_wrong_token_fails_cleanly_without_echoing_it(fake_hub, results_file, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_abcdef")
    assert cli(["push", str(results_file), "--repo", REPO, "--endpoint", fake_hub.url]) == 2
    out, err = capsys.readouterr()
    assert "401" in err and "hf_wrong_token_abcdef" not in out + err
    assert ("dataset", REPO) not in fake_hub.repos


def test_missing_token_is_a_clear_error(fake_hub, results_file, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    assert cli(["push", str(results_file), "--repo", REPO, "--endpoint", fake_hub.url]) == 2
    assert "no Hugging Face token: set HF_TOKEN" in capsys.readouterr().err
    assert fake_hub.requests == []


def test_dry_run_shows_the_path_and_writes_nothing(fake_hub, results_file, capsys):
    assert cli(["push", str(results_file), "--repo", REPO, "--dry-run", "--endpoint", fake_hub.url]) == 0
    out = capsys.readouterr().out
    assert "would write datasets/vrp-org/vrp-results/llava-hf/llava-1.5-7b-hf/results_2025-06-01T10-00-00.json" in out
    assert fake_hub.requests == [] and fake_hub.repos == {}


def test_malformed_results_are_refused_before_any_upload(fake_hub, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    obj = sample_results()[0]
    obj["config"].pop("model_dtype")
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps(obj))
    for path, message in ((broken, "is not valid JSON"), (invalid, "`config.model_dtype` is missing")):
        assert cli(["push", str(path), "--repo", REPO, "--endpoint", fake_hub.url, "--token-env", "HF_TOKEN_X"]) == 2
        assert message in capsys.readouterr().err
    assert fake_hub.requests == []  # the fake Hub was never contacted


def test_card_metadata_is_model_index_yaml_with_the_spec_metrics():
    obj = sample_results()[0]
    meta = yaml.safe_load(card_metadata(obj))
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "llava-hf/llava-1.5-7b-hf"
    by_metric = {r.metric_type: r for r in results}
    assert by_metric["ece"].metric_value == 0.21
    # sample_results writes ece -/+ 0.03: one float64 add, at most an ulp off the decimal (YAML keeps repr)
    assert by_metric["ece"].metric_args["ci95"] == [pytest.approx(0.18, abs=1e-12), pytest.approx(0.24, abs=1e-12)]
    assert by_metric["causal_acc_drop"].metric_args["circuit_layers"] == [16, 24]
    assert by_metric["accuracy"].dataset_type == "lmms-lab/LMMs-Eval-Lite"
    assert by_metric["accuracy"].dataset_split == "lite" and by_metric["accuracy"].task_name == TASK
    assert "spearman_untested_extra" not in by_metric  # NaN metrics are left out of cards


def test_card_output_updates_an_existing_readme_without_duplicating(results_file, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: apache-2.0\n---\n\n# My model\n\nHand-written text.\n")
    assert cli(["card", str(results_file), "--output", str(readme)]) == 0
    obj = read_results(results_file)
    obj["results"][TASK]["ece"] = 0.19  # a newer run of the same task
    write_card(obj, readme)
    text = readme.read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["license"] == "apache-2.0" and "Hand-written text." in text
    _, results = model_index_to_eval_results(meta["model-index"])
    eces = [r.metric_value for r in results if r.metric_type == "ece"]
    assert eces == [0.19]


def test_card_push_opens_a_pull_request_and_leaves_main_alone(fake_hub, results_file, capsys):
    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    api.create_repo("llava-hf/llava-1.5-7b-hf")
    api.upload_file(path_or_fileobj=b"---\nlicense: llama2\n---\n# LLaVA\n", path_in_repo="README.md",
                    repo_id="llava-hf/llava-1.5-7b-hf")
    main_before = fake_hub.files("model", "llava-hf/llava-1.5-7b-hf")

    url = push_card(results_file, "llava-hf/llava-1.5-7b-hf", token=fake_hub.token, endpoint=fake_hub.url)
    assert url == f"{fake_hub.url}/llava-hf/llava-1.5-7b-hf/discussions/1"
    assert fake_hub.files("model", "llava-hf/llava-1.5-7b-hf") == main_before
    card = fake_hub.files("model", "llava-hf/llava-1.5-7b-hf", ref="refs/pr/1")["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "llama2" and meta["model-index"][0]["name"] == "llava-hf/llava-1.5-7b-hf"

    # the CLI: the repo defaults to the results' model_name, which is a Hub id here
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_TOKEN", fake_hub.token)
        assert cli(["card", str(results_file), "--push", "--endpoint", fake_hub.url]) == 0
    out, err = capsys.readouterr()
    assert "opened a pull request: " in out and "discussions/2" in out and fake_hub.token not in out + err


# --- lmms-eval results files: what `push` takes, `card` takes too --------------------------------

#: write_lmms_run's samples: confidences 0.3, 0.45, 0.6, 0.75, 0.9 (i mod 5), right when i is even. Each
#: confidence has its own 15-bin ECE bin, so ECE = sum over them of n_c/16 * |c - accuracy_c|:
#: 4/16*|.3-2/4| + 3/16*|.45-1/3| + 3/16*|.6-2/3| + 3/16*|.75-1/3| + 3/16*|.9-2/3|.
LMMS_ECE = 4 / 16 * 0.2 + 3 / 16 * (0.45 - 1 / 3) + 3 / 16 * (2 / 3 - 0.6) + 3 / 16 * (0.75 - 1 / 3) + 3 / 16 * (0.9 - 2 / 3)


@pytest.mark.parametrize("date, timezone, created, path", [
    # lmms-eval 0.7.3's default --timezone is Asia/Singapore (UTC+8), whatever the machine's zone
    ("20261202_051009", None, "2026-12-01T21:10:09+00:00", "results_2026-12-01T21-10-09.json"),
    # a run with --timezone America/Los_Angeles (December: PST, UTC-8), which the CLI records
    ("20261202_051009", "America/Los_Angeles", "2026-12-02T13:10:09+00:00", "results_2026-12-02T13-10-09.json"),
    # unix seconds, as lm-eval-style harnesses write `date`
    (calendar.timegm((2026, 12, 2, 5, 10, 9)) + 0.25, None, "2026-12-02T05:10:09+00:00",
     "results_2026-12-02T05-10-09.json"),
])
def test_an_lmms_eval_run_is_published_with_its_time_in_utc_and_its_data_named(tmp_path, date, timezone, created,
                                                                               path):
    obj = load_publishable(write_lmms_run(tmp_path, date=date, timezone=timezone))
    assert obj["config"]["created_at"] == created
    assert results_path(obj) == f"llava-hf/llava-1.5-7b-hf/{path}"
    # `dataset_path: parquet` is a file loader: the task, whose YAML names the files, stands for the data
    assert obj["config"]["dataset"] == LMMS_TASK and obj["config"]["task"] == LMMS_TASK
    assert obj["results"][LMMS_TASK]["n_samples"] == 16


def test_card_accepts_the_lmms_eval_files_that_push_accepts(tmp_path, capsys):
    results_file = write_lmms_run(tmp_path / "out")
    assert cli(["push", str(results_file), "--repo", REPO, "--dry-run"]) == 0
    assert "llava-hf/llava-1.5-7b-hf/results_2026-12-01T21-10-09.json" in capsys.readouterr().out

    readme = tmp_path / "README.md"
    assert cli(["card", str(results_file), "--output", str(readme)]) == 0
    assert capsys.readouterr().out == f"wrote {readme}\n"
    name, results = model_index_to_eval_results(yaml.safe_load(readme.read_text().split("---")[1])["model-index"])
    by_metric = {r.metric_type: r for r in results}
    assert name == "llava-hf/llava-1.5-7b-hf"
    assert by_metric["accuracy"].metric_value == 0.5  # 8 of the 16 samples are right
    # the same sums in another order: a few ulps apart at most
    assert by_metric["ece"].metric_value == pytest.approx(LMMS_ECE, abs=1e-12)
    assert by_metric["ece"].task_name == LMMS_TASK and by_metric["ece"].dataset_type == LMMS_TASK
    assert by_metric["ece"].metric_args["n_samples"] == 16

    assert cli(["card", str(results_file), "--lmms-task", LMMS_TASK]) == 0  # the YAML on stdout
    assert yaml.safe_load(capsys.readouterr().out)["model-index"][0]["name"] == "llava-hf/llava-1.5-7b-hf"
    # what push refuses, card refuses with the same message
    for command in ("push", "card"):
        args = ["--repo", REPO, "--dry-run"] if command == "push" else []
        assert cli([command, str(results_file), "--lmms-task", "vrp_other", *args]) == 2
        assert "task 'vrp_other' is not in" in capsys.readouterr().err
