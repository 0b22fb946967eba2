"""The versioned results schema: build, validate, NaN round trip, clear errors."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from sample_results import TASK, sample_results

from vrp_eval.results import (
    SCHEMA,
    SCHEMA_VERSION,
    ResultsError,
    build_results,
    model_slug,
    read_results,
    validate_results,
    write_results,
)

CONFIG = {"model_name": "llava-hf/llava-1.5-7b-hf", "model_sha": "abc123", "model_dtype": "bfloat16",
          "vrp_eval_version": "0.1.0", "dataset": "vrp-synth", "split": "validation",
          "created_at": "2025-06-01T10:00:00+00:00"}


def test_build_results_is_a_superset_of_the_template_leaderboard_format():
    obj = build_results(config=CONFIG, task="vrp_synth", metrics={"accuracy": 0.5, "ece": 0.1},
                        details={"reliability_bins": []})
    assert obj["schema"] == SCHEMA and obj["schema_version"] == SCHEMA_VERSION
    # what template leaderboards read
    assert {"model_name", "model_sha", "model_dtype"} <= set(obj["config"])
    assert obj["results"]["vrp_synth"]["ece"] == 0.1
    assert obj["config"]["task"] == "vrp_synth"
    assert obj["details"] == {"vrp_synth": {"reliability_bins": []}}


def test_numpy_values_nan_and_layer_ranges_round_trip(tmp_path):
    metrics = {"accuracy": np.float32(0.25), "n_samples": np.int64(8), "ece": float("nan"),
               "attn_conf_r_p": np.float64("nan"), "circuit_layers": (3, 5), "new_metric": np.array([1.0, 2.0])}
    details = {"ie_curves": {"image": np.array([0.5, float("nan")])},
               "reliability_bins": [{"lo": 0.0, "hi": 0.5, "count": 0, "mean_confidence": None, "mean_score": None}]}
    path = write_results(build_results(config=CONFIG, task="t", metrics=metrics, details=details), tmp_path / "r.json")

    text = path.read_text()
    assert "NaN" not in text  # strict JSON on disk: NaN is written as null
    raw = json.loads(text)
    assert raw["results"]["t"]["ece"] is None and raw["details"]["t"]["ie_curves"]["image"] == [0.5, None]

    back = read_results(path)
    assert math.isnan(back["results"]["t"]["ece"]) and math.isnan(back["results"]["t"]["attn_conf_r_p"])
    assert back["results"]["t"]["accuracy"] == 0.25 and back["results"]["t"]["n_samples"] == 8
    assert back["results"]["t"]["circuit_layers"] == [3, 5]
    assert back["results"]["t"]["new_metric"] == [1.0, 2.0]


def test_sample_results_files_are_valid_and_carry_every_spec_metric(tmp_path):
    for obj in sample_results():
        back = read_results(write_results(obj, tmp_path / "r.json"))
        metrics = back["results"][TASK]
        for name in ("accuracy", "ece", "mce", "ace", "brier", "attn_conf_r", "attn_acc_r", "attn_overconf_r",
                     "causal_acc_drop", "control_acc_drop", "circuit_layers", "integration_layer", "n_samples"):
            assert name in metrics
        assert len(back["details"][TASK]["reliability_bins"]) == 15


@pytest.mark.parametrize("mutate, field", [
    (lambda o: o.pop("schema"), "`schema`"),
    (lambda o: o.update(schema_version=99), "`schema_version`"),
    (lambda o: o["config"].pop("model_sha"), "`config.model_sha`"),
    (lambda o: o["config"].update(created_at="yesterday"), "`config.created_at`"),
    (lambda o: o["config"].update(probe=[1, 2]), "`config.probe`"),
    (lambda o: o.update(results={}), "`results`"),
    (lambda o: o["results"]["t"].update(ece="0.1"), "`results.t.ece`"),
    (lambda o: o["results"]["t"].update(circuit_layers=[5, 3]), "`results.t.circuit_layers`"),
    (lambda o: o["details"]["t"].update(reliability_bins=[{"lo": 0}]), "`details.t.reliability_bins[0]`"),
    (lambda o: o["details"]["t"].update(ie_curves={"image": ["x"]}), "`details.t.ie_curves.image`"),
])
def test_validation_errors_name_the_field_and_the_fix(mutate, field):
    obj = build_results(config=CONFIG, task="t", metrics={"ece": 0.1, "circuit_layers": [1, 2]},
                        details={"reliability_bins": []})
    broken = copy.deepcopy(obj)
    mutate(broken)
    with pytest.raises(ResultsError) as error:
        validate_results(broken)
    message = str(error.value)
    assert field in message and ";" in message  # "<field> <problem>; <fix>"


def test_newer_schema_version_asks_for_an_upgrade():
    obj = build_results(config=CONFIG, task="t", metrics={"ece": 0.1})
    obj["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ResultsError, match="upgrade vrp-eval"):
        validate_results(obj)


def test_read_results_reports_malformed_json_with_the_path(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema": "vrp-eval/results", ')
    with pytest.raises(ResultsError, match=r"broken\.json is not valid JSON"):
        read_results(path)
    with pytest.raises(ResultsError, match="cannot read results file"):
        read_results(tmp_path / "missing.json")


@pytest.mark.parametrize("name, slug", [
    ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-1.5-7b-hf"),
    ("tiny-llava", "local/tiny-llava"),
    ("/home/me/models/my model/", "local/my-model"),
    ("./runs/ckpt", "local/ckpt"),
])
def test_model_slug(name, slug):
    assert model_slug({"model_name": name}) == slug
