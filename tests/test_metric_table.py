"""The metric table (vrp_eval/metric_table.py) is the one home of the reported metrics: every list of
metric names is its projection, the task YAMLs are generated from it, every row is produced by the
aggregate (under the signals it names) or by the `evaluate` module it names, and one new row reaches
every place a harness reads."""
from __future__ import annotations

import importlib
import inspect
import itertools
import shutil
import sys

import numpy as np
import pytest

from vrp_eval import harness, metric_table
from vrp_eval.metric_table import (
    EVALUATE_MODULES,
    MEAN,
    PROBED_TASKS,
    SUMMARY,
    TABLE,
    TASKS,
    YAML_FILES,
    Metric,
    columns,
)

#: The signals the aggregate tells apart by what the records hold (vrp_eval/aggregation.py).
AGGREGATED_SIGNALS = ("attention", "tracing", "circuit")
LAYERS = 4


def _payloads(signals, n=12, seed=0):
    """Harness payloads of `n` records holding what a run with `signals` writes (hand-made, no model):
    attention sharpness, a causal trace, and for the circuit the knockout scores of the discovery half
    and the corrupted / control scores of the held-out half."""
    rng = np.random.default_rng(seed)
    windows = [[0, 1], [1, 2], [2, 3]]
    state = {"windows": windows, "circuit": [1, 2], "control": [2, 3]} if "circuit" in signals else {}
    payloads = []
    for i in range(n):
        confidence = float(rng.uniform(0.2, 0.95))
        score = float(i % 3 != 0)  # right on 2 of 3: neither accuracy nor the correlations are degenerate
        record = {"question_id": i, "question": f"q{i}", "answer": "a", "score": score, "confidence": confidence,
                  "confidence_product": confidence, "confidence_first_token": confidence,
                  "confidence_length_norm": confidence, "token_probs": [confidence], "reference": "a", "kind": "open"}
        if "attention" in signals:
            sharpness = float(rng.uniform())
            record.update(sharpness=sharpness, sharpness_per_layer=[sharpness] * LAYERS,
                          image_attention_mass=float(rng.uniform()))
        if "tracing" in signals:
            record.update(ie={group: rng.uniform(size=LAYERS).tolist() for group in ("image", "text", "last")},
                          p_clean=0.6, p_corrupted=0.2)
        if "circuit" in signals:
            if i % 2 == 0:
                record.update(half="discovery", knockout_scores=rng.integers(0, 2, len(windows)).astype(float).tolist())
            else:
                record.update(half="heldout", corrupted_score=float(i % 4 == 1), control_score=score)
                if "attention" in signals:
                    record["sharpness_corrupted"] = float(rng.uniform())
        payloads.append({"format": "test", "doc_id": i, "settings": {"n_bootstrap": 50, "n_bins": 5},
                         "state": state, "record": record})
    return payloads


def _samples(payloads):
    return [harness.RecordSample(p["doc_id"], p["record"]["score"], p) for p in payloads]


# --- the rows ---------------------------------------------------------------------------------------

def test_a_row_spells_out_its_companion_columns_and_refuses_typos():
    row = Metric("gap", "d", PROBED_TASKS, ci=True, p_value=True, rho=True)
    assert row.columns == ("gap", "gap_ci_low", "gap_ci_high", "gap_p", "gap_rho")
    assert Metric("gap", "d", PROBED_TASKS, rho=True).columns == ("gap", "gap_rho")
    with pytest.raises(ValueError, match="tasks \\['lmm'\\] must be some of"):
        Metric("gap", "d", frozenset({"lmm"}))
    with pytest.raises(ValueError, match="aggregation 'median'"):
        Metric("gap", "d", PROBED_TASKS, aggregation="median")


def test_every_row_is_well_formed():
    from vrp_eval.options import SIGNALS

    names = [column for row in TABLE for column in row.columns]
    assert len(names) == len(set(names)), "a column is reported twice"
    for row in TABLE:
        assert row.description and set(row.signals) <= set(SIGNALS), row.name
        assert row.evaluate_module in (None, *EVALUATE_MODULES), row.name
    # Only the task's own score is a per-sample mean: the harness averages it, the rest is run-wide.
    assert [row.name for row in TABLE if row.aggregation == MEAN] == ["accuracy"]


# --- every list of names is the table's projection ----------------------------------------------------

def test_the_harness_lists_are_projections_of_the_table():
    from vrp_eval import lm, lmms

    assert harness.RELIABILITY_METRICS == lmms.RELIABILITY_METRICS == columns("lmms", SUMMARY)
    assert lm.RELIABILITY_METRICS == columns("lm", SUMMARY)
    assert lm.CALIBRATION_METRICS == columns("lm_mc", SUMMARY)
    # The tasks' aggregation modules hold one function per column, named as the metric.
    for module, names in (("vrp_eval.tasks.utils", columns("lmms", SUMMARY)),
                          ("vrp_eval.tasks_lm.utils", columns("lm", SUMMARY) + columns("lm_mc", SUMMARY))):
        utils = importlib.import_module(module)
        assert all(getattr(utils, name).__name__ == f"vrp_{name}" for name in names), module


def test_the_results_schema_and_the_card_are_projections_of_the_table():
    from vrp_eval import hub, results

    assert results.METRICS == tuple(row.name for row in TABLE if row.spec)
    assert results.LAYER_RANGE_METRICS == ("circuit_layers", "control_layers") == metric_table.layer_range_names()
    assert results.METRIC_SUFFIXES == metric_table.COMPANION_SUFFIXES
    # The model card keeps the SPEC scalars in table order (accuracy first, the drops after the correlations).
    assert hub.CARD_METRICS == tuple(row.name for row in TABLE if row.spec and not row.layer_range
                                     and row.name != "n_samples")


def test_the_evaluate_modules_take_what_the_table_says_and_accept_each_others_keywords():
    evaluate = pytest.importorskip("evaluate")
    from vrp_eval.spaces import METRIC_NAMES, metric_path

    assert METRIC_NAMES == tuple(EVALUATE_MODULES)
    for name, spec in EVALUATE_MODULES.items():
        module = evaluate.load(metric_path(name))
        assert tuple(module._info().features) == spec.inputs, name
        parameters = inspect.signature(type(module)._compute).parameters.values()
        named = tuple(p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD)
        assert named == (*spec.inputs, *spec.options), name
        assert sys.modules[type(module).__module__]._SIBLING_NAMES == metric_table.evaluate_arguments(), name


# --- the YAMLs are generated from the table -----------------------------------------------------------

def test_the_task_yamls_are_up_to_date():
    stale = metric_table.stale_yamls()
    assert not stale, f"{stale} differ from the metric table: run `python -m vrp_eval.metric_table --write`"


def _harness_config(task, path):
    """A task YAML as its harness reads it, `!function`s resolved."""
    if task == "lmms":
        from lmms_eval.utils import load_yaml_config

        return load_yaml_config(str(path), mode="full")
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path)


@pytest.mark.parametrize("name", YAML_FILES)
def test_the_harness_reads_each_metric_with_its_aggregation_and_direction(name):
    task = YAML_FILES[name]
    config = _harness_config(task, metric_table.yaml_path(name))
    expected = [(column, row.aggregation, row.higher_is_better) for row in TABLE if task in row.tasks
                for column in row.columns]
    entries = config["metric_list"][:len(expected)]
    assert [(e["metric"], e["higher_is_better"]) for e in entries] == [(c, better) for c, _, better in expected]
    for entry, (column, aggregation, _) in zip(entries, expected):
        if aggregation == MEAN:
            assert entry["aggregation"] == "mean", column
        else:  # the function of that name in the task folder's utils.py
            assert entry["aggregation"].__name__ == f"vrp_{column}", column
    tail = [e["metric"] for e in config["metric_list"][len(expected):]]
    own = importlib.import_module("vrp_eval.tasks.utils").POPE_METRICS if name.endswith("vrp_pope.yaml") else ()
    assert tail == list(own)  # a task's own metrics (POPE's) stay after the generated ones


# --- every row is computed: by the aggregate, under its signals, or by its evaluate module ---------------

@pytest.mark.parametrize("signals", [combo for k in range(len(AGGREGATED_SIGNALS) + 1)
                                     for combo in itertools.combinations(AGGREGATED_SIGNALS, k)],
                         ids=lambda combo: "+".join(combo) or "none")
def test_the_aggregate_reports_exactly_the_rows_whose_signals_ran(signals):
    """What the harnesses' aggregations read (`harness.aggregate_probed`) holds a column of every row
    whose signals ran, and nothing else: a row naming too few signals, or too many, fails here."""
    from vrp_eval.results import build_results

    payloads = _payloads(signals)
    summary = harness.aggregate_probed(_samples(payloads), warn_none=lambda: pytest.fail("records were given"))
    expected = {column for row in TABLE if set(row.signals) <= set(signals) for column in row.columns}
    assert set(summary) == expected
    assert summary["n_probed"] == summary["n_samples"] == len(payloads)
    confidences = [p["record"]["confidence"] for p in payloads]
    assert summary["mean_confidence"] == pytest.approx(np.mean(confidences), rel=1e-12)  # float64 round-off only
    # The schema takes every row's value as the table types it (layer ranges as [first, last]).
    config = {"model_name": "m", "model_sha": "unknown", "model_dtype": "float32", "vrp_eval_version": "0",
              "dataset": "d", "split": "s"}
    build_results(config=config, task="t", metrics=summary)


def test_each_evaluate_module_returns_the_rows_that_name_it():
    evaluate = pytest.importorskip("evaluate")
    from vrp_eval.spaces import metric_path

    inputs = {"confidences": [0.9, 0.8, 0.3, 0.6, 0.55], "scores": [1.0, 0.0, 0.0, 1.0, 1.0],
              "sharpness": [0.2, 0.4, 0.5, 0.7, 0.9], "clean_scores": [1, 1, 1, 1, 1],
              "corrupted_scores": [1, 0, 0, 0, 1], "predictions": ["Two."], "references": [["2"] * 10]}
    for name, spec in EVALUATE_MODULES.items():
        result = evaluate.load(metric_path(name)).compute(**{key: inputs[key] for key in spec.inputs})
        named = {column for row in TABLE if row.evaluate_module == name for column in row.columns}
        assert named and named <= set(result), name
        # Anything else a module returns is not a metric: vrp_ece's per-bin table for the diagram.
        assert set(result) - named <= {"bins"}, name


# --- the recipe: one new row reaches every place a harness reads ------------------------------------------

_RECIPE = {"lmms": ("vrp_eval.lmms", "tasks/_vrp_template_yaml", "tasks/utils.py"),
           "lm": ("vrp_eval.lm", "tasks_lm/vrp_text_synth.yaml", "tasks_lm/utils.py")}


@pytest.mark.parametrize("task", _RECIPE)
def test_recipe_a_new_row_reaches_the_lists_the_yamls_and_the_harness(task, monkeypatch, tmp_path, capsys):
    """Adding a metric = its maths + one row: the row alone puts it in the derived lists, marks the
    YAMLs stale (naming the command), and the regenerated YAML, read by the harness's own loader
    beside the task's utils.py, aggregates the maths' value."""
    glue = importlib.import_module(_RECIPE[task][0])
    yaml_name, utils_name = _RECIPE[task][1:]
    row = Metric("confidence_gap", "mean confidence minus accuracy", PROBED_TASKS, higher_is_better=False, spec=True)
    monkeypatch.setattr(metric_table, "TABLE", (*TABLE, row))

    assert columns("lmms", SUMMARY)[-1] == columns("lm", SUMMARY)[-1] == "confidence_gap"
    assert "confidence_gap" not in columns("lm_mc")
    assert metric_table.spec_names()[-1] == "confidence_gap"
    assert metric_table.stale_yamls() == [name for name, kind in YAML_FILES.items() if kind in row.tasks]
    assert metric_table.main([]) == 1
    assert "python -m vrp_eval.metric_table --write" in capsys.readouterr().err

    # What importing the glue computes from the patched table; its process_results and the task's
    # utils.py (at load) read it.
    monkeypatch.setattr(glue, "RELIABILITY_METRICS", columns(task, SUMMARY))
    emitted = (glue.process_results({"question": "q"}, ["a"], score=lambda doc, results: {"s": 1.0}, score_key="s")
               if task == "lmms" else glue.generate_process_results({"answer": "a"}, ["a"]))
    assert list(emitted) == list(columns(task))
    folder = tmp_path / "tasks"
    folder.mkdir()
    shutil.copy(metric_table.yaml_path(utils_name), folder / "utils.py")
    yaml_file = folder / "task.yaml"
    yaml_file.write_text(metric_table.render(metric_table.yaml_path(yaml_name).read_text(), task))
    metrics = _harness_config(task, yaml_file)["metric_list"]
    assert [e["metric"] for e in metrics] == list(columns(task))
    entry = metrics[-1]
    assert (entry["metric"], entry["higher_is_better"]) == ("confidence_gap", False)

    # The new maths, in the one aggregate every harness aggregation reads.
    aggregate_probed = harness.aggregate_probed

    def with_gap(samples, warn_none):
        metrics = aggregate_probed(samples, warn_none)
        metrics["confidence_gap"] = metrics["mean_confidence"] - metrics["accuracy"]
        return metrics

    monkeypatch.setattr(harness, "aggregate_probed", with_gap)
    payloads = _payloads((), seed=7)
    confidences = [p["record"]["confidence"] for p in payloads]
    gap = np.mean(confidences) - 8 / 12  # scores: right on 8 of the 12 (i % 3 != 0)
    assert entry["aggregation"](_samples(payloads)) == pytest.approx(gap, rel=1e-12)  # float64 round-off only


def test_render_needs_the_markers():
    with pytest.raises(ValueError, match="no generated metric list"):
        metric_table.render("metric_list:\n  - metric: accuracy\n", "lmms")
    with pytest.raises(ValueError, match="unknown task kind 'lmm'"):
        columns("lmm")
    assert set(TASKS) == {task for row in TABLE for task in row.tasks}
