"""The versioned results schema: build, validate, NaN round trip, clear errors."""
from __future__ import annotations

import calendar
import copy
import json
import math
import re
from dataclasses import MISSING, fields

import numpy as np
import pytest
from sample_results import TASK, sample_results

from vrp_eval.results import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    SCHEMA,
    SCHEMA_VERSION,
    ResultsError,
    build_results,
    dumps_results,
    loads_results,
    model_slug,
    read_results,
    utc_created_at,
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


BIN = {"lo": 0.0, "hi": 0.5, "count": 2, "mean_confidence": 0.3, "mean_score": 0.5}


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
    (lambda o: o["details"]["t"].update(nie_curves={"image": ["x"]}), "`details.t.nie_curves.image`"),
    (lambda o: o["details"]["t"].update(nie_curves=[0.5]), "`details.t.nie_curves`"),
    # what the leaderboard Space and the model card read, and would choke on
    (lambda o: o["config"].update(model_num_parameters=float("inf")), "`config.model_num_parameters`"),
    (lambda o: o["config"].update(model_num_parameters=float("nan")), "`config.model_num_parameters`"),
    (lambda o: o["config"].update(model_name="/"), "`config.model_name`"),
    (lambda o: o["config"].update(model_name="org/a\nb"), "`config.model_name`"),
    (lambda o: o["config"].update(model_name="m" * 513), "`config.model_name`"),
    (lambda o: o["config"].update(model_family=["llava"]), "`config.model_family`"),
    (lambda o: o["config"].update(created_at=20250101), "`config.created_at`"),
    (lambda o: o["config"].update(created_at="0001-01-01T00:00:00+14:00"), "`config.created_at`"),
    (lambda o: o["config"].update(created_at="20251301_000000"), "`config.created_at`"),  # lmms-eval form, month 13
    (lambda o: o["results"].update({"": {"ece": 0.1}}), "`results`"),
    (lambda o: o["results"]["t"].update(n_samples=2**60), "`results.t.n_samples`"),
    (lambda o: o["results"]["t"].update(circuit_layers=[-1, 2]), "`results.t.circuit_layers`"),
    (lambda o: o["details"]["t"].update(reliability_bins=[dict(BIN, lo=None)]), "`details.t.reliability_bins[0].lo`"),
    (lambda o: o["details"]["t"].update(reliability_bins=[dict(BIN, count=-1)]), "`details.t.reliability_bins[0].count`"),
    (lambda o: o["details"]["t"].update(ie_curves={"a\tb": [0.1]}), "`details.t.ie_curves`"),
    (lambda o: o["details"]["t"].update(knockout_curve=[{"window": "ab"}]), "`details.t.knockout_curve[0].window`"),
    (lambda o: o["details"]["t"].update(knockout_curve=[{"window": [3, 1]}]), "`details.t.knockout_curve[0].window`"),
    (lambda o: o["details"]["t"].update(knockout_curve=[7]), "`details.t.knockout_curve[0]`"),
    (lambda o: o["details"]["t"].update(knockout_curve=[{"window": [0, 1], "drop": "x"}]),
     "`details.t.knockout_curve[0].drop`"),
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


@pytest.mark.parametrize("written, zone, stored", [
    ("2025-06-01T10:00:00+00:00", None, "2025-06-01T10:00:00+00:00"),  # what `vrp-eval run` writes: unchanged
    ("2025-06-01T12:00:00+02:00", None, "2025-06-01T10:00:00+00:00"),  # another offset: the same moment
    ("2025-06-01T10:00:00", None, "2025-06-01T10:00:00+00:00"),  # no offset: UTC, as vrp-eval always wrote
    ("2025-06-01T10:00:00.250000Z", None, "2025-06-01T10:00:00.250000+00:00"),  # fractions are kept
    ("20250601_180000", None, "2025-06-01T10:00:00+00:00"),  # lmms-eval's default zone, Singapore: UTC+8
    ("20250601_060000", "America/New_York", "2025-06-01T10:00:00+00:00"),  # its --timezone; June: EDT, UTC-4
    ("20251201_050000", "America/New_York", "2025-12-01T10:00:00+00:00"),  # December: EST, UTC-5
    ("2025-06-01T06:00:00", "America/New_York", "2025-06-01T10:00:00+00:00"),  # the zone of any offset-less time
    (calendar.timegm((2025, 6, 1, 10, 0, 0)) + 0.7, None, "2025-06-01T10:00:00+00:00"),  # unix seconds
])
def test_created_at_is_stored_as_iso_utc(written, zone, stored):
    assert utc_created_at(written, zone) == stored


def test_old_files_load_with_created_at_normalised_to_utc():
    """Files pushed before created_at was normalised (an lmms-eval conversion kept lmms-eval's text) load,
    and what is written back (what `push` uploads) holds ISO UTC."""
    for written, stored in (("20250601_180000", "2025-06-01T10:00:00+00:00"),
                            ("2025-06-01T15:30:00+05:30", "2025-06-01T10:00:00+00:00")):
        back = loads_results(_file_text('"created_at": "2025-06-01T10:00:00+00:00"', f'"created_at": "{written}"'))
        assert back["config"]["created_at"] == stored
        assert f'"created_at": "{stored}"' in dumps_results(back)
    with pytest.raises(ResultsError, match="`config.created_at` is in time zone 'Mars/Olympus'"):
        utc_created_at("20250601_180000", "Mars/Olympus")


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


def _record(i: int, **extra):
    """A probe SampleRecord (required fields not given here are None)."""
    from vrp_eval.probe import SampleRecord

    required = {f.name: None for f in fields(SampleRecord) if f.default is MISSING and f.default_factory is MISSING}
    confidence = 0.3 + 0.15 * (i % 5)
    given = {"question_id": i, "question": "q", "answer": "a", "score": float(i % 2), "confidence": confidence,
             "confidence_product": confidence, "confidence_first_token": confidence,
             "confidence_length_norm": confidence, "token_probs": [confidence], "reference": "a", "kind": "vqa"}
    return SampleRecord(**{**required, **given, **extra})


def test_what_the_probe_and_the_lmms_conversion_write_is_accepted():
    """The strict validator keeps accepting the writers' output: probe.aggregate with NaN IE layers,
    a knockout curve whose drop is null, and a config as `vrp-eval run` / `--from-lmms` build it."""
    from vrp_eval.probe import EngineState, ProbeSettings, aggregate

    nan = float("nan")
    records = [_record(i, half="discovery" if i % 2 == 0 else "heldout", sharpness=0.1 * (i % 3),
                       sharpness_per_layer=[0.1, nan, 0.3], image_attention_mass=0.5, p_clean=0.8, p_corrupted=0.2,
                       ie={"image": [0.5, nan, 0.1], "text": [nan] * 3, "last": [0.0, 0.6, 0.7]},
                       knockout_scores=[1.0, 0.0] if i % 2 == 0 else None,
                       corrupted_score=None if i % 2 == 0 else 0.0, control_score=None if i % 2 == 0 else 1.0,
                       sharpness_corrupted=None if i % 2 == 0 else 0.05)
               for i in range(12)]
    settings = ProbeSettings(dataset="vrp-synth", n_bootstrap=20)
    metrics, details = aggregate(records, settings, EngineState(windows=[(0, 1), (1, 2)], circuit=(1, 2), control=(0, 1)))
    assert details["knockout_curve"][0]["drop"] is None  # the discovery half is all wrong: no relative drop
    config = dict(CONFIG, probe=settings.to_dict(), model_num_parameters=1_234_567, model_family="llava",
                  versions={"lmms-eval": "0.7.3"}, created_at="2025-06-01T10:00:00+00:00",
                  source={"harness": "lmms-eval", "results": "out/x_results.json", "n-samples": {"original": 12}})
    obj = build_results(config=config, task="vrp_synth", metrics=metrics, details=details)
    back = loads_results(dumps_results(obj))
    assert back["results"]["vrp_synth"]["circuit_layers"] == [1, 2]
    assert back["details"]["vrp_synth"]["ie_curves"]["text"] == [None] * 3


def _file_text(old: str, new: str) -> str:
    obj = build_results(config=dict(CONFIG, model_num_parameters=7, probe={"n_bins": 15}), task="t",
                        metrics={"ece": 0.1}, details={"reliability_bins": [BIN]})
    text = dumps_results(obj)
    assert old in text
    return text.replace(old, new)


@pytest.mark.parametrize("literal, value", [("NaN", math.nan), ("-Infinity", -math.inf), ("1e999", math.inf)])
def test_nan_and_infinity_literals_read_like_the_same_object_in_memory(literal, value):
    """Python's json writes NaN / Infinity literals; where the schema allows null they mean null."""
    back = loads_results(_file_text('"ece": 0.1', f'"ece": {literal}'))
    ece = back["results"]["t"]["ece"]
    assert (math.isnan(ece) and math.isnan(value)) or ece == value
    assert '"ece": null' in dumps_results(back)  # what push uploads: strict JSON


@pytest.mark.parametrize("old, new, field", [
    ('"model_num_parameters": 7', '"model_num_parameters": Infinity', "config.model_num_parameters"),
    ('"model_num_parameters": 7', '"model_num_parameters": 1e999', "config.model_num_parameters"),
    ('"lo": 0.0', '"lo": NaN', "details.t.reliability_bins[0].lo"),
    ('"ece": 0.1', '"ece": 123456789012345678901234567890', "results.t.ece"),
    ('"n_bins": 15', '"n_bins": 123456789012345678901234567890', "config.probe.n_bins"),  # anywhere
])
def test_non_finite_or_huge_numbers_are_refused_where_a_number_is_needed(old, new, field):
    with pytest.raises(ResultsError, match=f"`{re.escape(field)}`"):
        loads_results(_file_text(old, new))


def test_pathological_nesting_is_a_results_error_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ResultsError, match="nests too deeply"):
        read_results(path)
    obj = build_results(config=CONFIG, task="t", metrics={"ece": 0.1})
    deep: list = []
    for _ in range(5_000):  # deeper than Python's recursion limit, in memory (what `push` gets from code)
        deep = [deep]
    obj["details"]["t"]["extra"] = deep
    with pytest.raises(ResultsError, match=rf"`details\.t\.extra.*` nests more than {MAX_DEPTH} levels"):
        validate_results(obj)
    obj["details"]["t"]["extra"] = json.loads("[" * MAX_DEPTH + "]" * MAX_DEPTH)  # a generous cap ...
    with pytest.raises(ResultsError, match="nests more than"):
        validate_results(obj)
    obj["details"]["t"]["extra"] = json.loads("[" * (MAX_DEPTH - 3) + "]" * (MAX_DEPTH - 3))  # ... not a tight one
    validate_results(obj)


def test_an_oversized_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.json"
    with path.open("wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)  # sparse: all NUL bytes, which would be invalid JSON if read
    with pytest.raises(ResultsError, match=f"{MAX_FILE_BYTES} bytes a results file may hold"):
        read_results(path)
    with pytest.raises(ResultsError, match="bytes a results file may hold"):
        loads_results(b" " * (MAX_FILE_BYTES + 1))


def test_messages_quote_hostile_values_in_bounded_form():
    obj = build_results(config=CONFIG, task="t", metrics={"ece": 0.1})
    obj["schema"] = "<img src=x>" * 100_000
    with pytest.raises(ResultsError) as error:
        validate_results(obj)
    assert len(str(error.value)) < 400 and "`schema`" in str(error.value)
