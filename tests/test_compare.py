"""`vrp-eval compare`: the comparison table of several runs, its sorting, formats and bad inputs.

The three hand-built results of tests/sample_results.py (SPEC's published figures) have a known order
under every sort, and known cells.
"""
from __future__ import annotations

import csv
import io
import json
import math

import pytest
from sample_results import TASK, sample_results

from vrp_eval import cli
from vrp_eval.compare import (
    CompareError,
    comparison_table,
    format_ci,
    format_parameters,
    load_run,
)
from vrp_eval.results import write_results

LLAVA, PALIGEMMA, QWEN = "llava-hf/llava-1.5-7b-hf", "google/paligemma-3b-mix-224", "Qwen/Qwen2-VL-7B-Instruct"


@pytest.fixture
def runs(tmp_path):
    """The three models as run folders (LLaVA, Qwen) and a bare results file (PaliGemma)."""
    paths = []
    for obj in sample_results():
        name = obj["config"]["model_name"].split("/")[-1]
        if "paligemma" in name:
            paths.append(write_results(obj, tmp_path / f"{name}.json"))
        else:
            write_results(obj, tmp_path / name / "results.json")
            paths.append(tmp_path / name)
    return paths


@pytest.mark.parametrize(("sort", "order"), [
    ("ece", [PALIGEMMA, QWEN, LLAVA]),              # 0.14, 0.18, 0.21: lower is better
    ("attn_conf_r", [LLAVA, QWEN, PALIGEMMA]),      # 0.74, 0.71, 0.68: higher first (the table's direction)
    ("causal_acc_drop", [LLAVA, QWEN, PALIGEMMA]),  # -0.58, -0.52, -0.41: lower is better
    ("accuracy", [QWEN, LLAVA, PALIGEMMA]),         # 0.71, 0.62, 0.55
])
def test_rows_are_sorted_best_first_by_the_metric_direction(runs, sort, order):
    table = comparison_table([load_run(p) for p in runs], sort=sort)
    assert [row.model for row in table.rows] == order


def test_cells_say_the_published_figures_with_their_cis(runs):
    table = comparison_table([load_run(p) for p in runs])
    assert table.header() == ["Model", "Family", "Parameters", "Task", "Samples", "Accuracy", "ECE [95% CI]",
                              "Attention-confidence r [95% CI]", "Causal accuracy drop [95% CI]", "Circuit layers",
                              "Integration layer"]
    # PaliGemma: ece 0.14 +- 0.03, r 0.68 (-0.05, +0.04), drop -0.41 +- 0.06, circuit 12-18, integration 15.
    assert table.cells(table.rows[0]) == [PALIGEMMA, "paligemma", "2.92B", TASK, "500", "0.550 [0.510, 0.590]",
                                          "0.140 [0.110, 0.170]", "0.680 [0.630, 0.720]", "-0.410 [-0.470, -0.350]",
                                          "12-18", "15"]
    markdown = table.to_markdown()
    assert markdown.splitlines()[2].startswith(f"| {PALIGEMMA} | paligemma | 2.92B |")
    assert "Sorted by `ece`, lowest (best) first." in markdown


def test_csv_holds_the_numbers_unrounded(runs):
    table = comparison_table([load_run(p) for p in runs], sort="attn_conf_r")
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert [r["model"] for r in rows] == [LLAVA, QWEN, PALIGEMMA]
    llava = rows[0]
    assert float(llava["ece"]) == 0.21 and float(llava["ece_ci_low"]) == pytest.approx(0.18, abs=1e-15)  # 0.21-0.03
    assert (llava["circuit_first"], llava["circuit_last"], llava["integration_layer"]) == ("16", "24", "20")
    assert int(llava["model_num_parameters"]) == 7_063_427_072


def test_output_writes_markdown_csv_and_png(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["compare", *map(str, runs), "--sort", "causal_acc_drop", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "compare.md").read_text() in printed
    assert (out / "compare.csv").read_text().startswith("model,family,model_num_parameters,task,n_samples,")
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_metric_that_is_missing_or_nan_shows_na_and_sorts_last(tmp_path):
    objs = sample_results()
    objs[0]["results"][TASK]["ece"] = float("nan")          # LLaVA: not computed
    del objs[1]["results"][TASK]["causal_acc_drop"]         # PaliGemma: no circuit signal
    paths = [write_results(obj, tmp_path / f"{i}.json") for i, obj in enumerate(objs)]
    table = comparison_table([load_run(p) for p in paths])
    assert [r.model for r in table.rows] == [PALIGEMMA, QWEN, LLAVA]
    assert table.cells(table.rows[-1])[6] == "n/a"
    assert table.cells(table.rows[0])[8] == "n/a"
    assert comparison_table([load_run(p) for p in paths], sort="causal_acc_drop").rows[-1].model == PALIGEMMA


def test_several_tasks_give_several_rows_and_task_selects(tmp_path):
    obj = sample_results()[0]
    obj["results"]["other_task"] = {**obj["results"][TASK], "ece": 0.05}
    path = write_results(obj, tmp_path / "r.json")
    assert [r.task for r in comparison_table([load_run(path)]).rows] == ["other_task", TASK]
    assert [r.task for r in comparison_table([load_run(path)], tasks=[TASK]).rows] == [TASK]
    with pytest.raises(CompareError, match="no run holds the task"):
        comparison_table([load_run(path)], tasks=["nope"])


def test_formatting():
    assert format_parameters(977_088) == "0.98M"
    assert format_parameters(7_063_427_072) == "7.06B"
    assert format_parameters(None) == "n/a"
    assert format_ci(0.0912, 0.0676, 0.1671) == "0.091 [0.068, 0.167]"
    assert format_ci(math.nan, 0.1, 0.2) == "n/a"
    assert format_ci(0.5, math.nan, 0.6) == "0.500"


def test_bad_inputs_exit_2_with_a_message(tmp_path, runs, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    not_results = tmp_path / "other.json"
    not_results.write_text(json.dumps({"schema": "something-else"}))
    for argv, message in [
        ([str(tmp_path / "missing")], "does not exist: pass a run folder"),
        ([str(empty)], "holds no results.json"),
        ([str(broken)], "is not valid JSON"),
        ([str(not_results)], "schema"),
        ([str(runs[0]), "--sort", "eec"], "unknown metric 'eec': did you mean 'ece'?"),
        ([str(runs[0]), "--sort", "circuit_layers"], "it is a layer range"),
    ]:
        assert cli.main(["compare", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_a_run_folder_and_its_results_file_give_the_same_row(runs):
    folder = runs[0]
    by_folder, by_file = (comparison_table([load_run(p)]) for p in (folder, folder / "results.json"))
    assert by_folder.cells(by_folder.rows[0]) == by_file.cells(by_file.rows[0])
    assert by_folder.cells(by_folder.rows[0])[-2:] == ["16-24", "20"]
    assert load_run(folder).samples_path is None  # no samples.jsonl: fine for the table


def test_the_same_model_twice_is_told_apart_by_its_run(tmp_path):
    obj = sample_results()[0]
    write_results(obj, tmp_path / "main" / "results.json")
    write_results({**obj, "results": {TASK: {**obj["results"][TASK], "ece": 0.3}}}, tmp_path / "pr.json")
    table = comparison_table([load_run(tmp_path / "main"), load_run(tmp_path / "pr.json")])
    assert [row.model for row in table.rows] == [f"{LLAVA} (main)", f"{LLAVA} (pr)"]
