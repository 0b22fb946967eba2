"""`vrp-eval push` / `vrp-eval card` with the real huggingface_hub client against a loopback fake Hub."""
from __future__ import annotations

import json
import logging

import pytest
import yaml
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.repocard_data import model_index_to_eval_results
from sample_results import TASK, sample_results

from vrp_eval.cli import main as cli
from vrp_eval.hub import (
    PushError,
    card_metadata,
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
