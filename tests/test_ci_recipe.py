"""The CI recipe of docs/ci.md runs: docs/ci/vrp-gate.yml's `run:` steps, executed for real.

The workflow is parsed with yaml; its steps run in order, as GitHub runs a `run:` step (bash -eo pipefail),
in a temporary checkout holding the policy, with the workflow's own env and only LIMIT made small (the
model is already the shipped tiny-llava), offline. The install step alone is not run (it would reach the
package index); its package spec must name this project at a version range holding this version.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml

from vrp_eval.gate import load_policy
from vrp_eval.results import read_results

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "docs" / "ci" / "vrp-gate.yml"
POLICY = ROOT / "docs" / "ci" / "policy.yaml"
LIMIT = 16
INSTALL_SKIPPED = "pip install reaches the package index; this environment already has vrp-eval installed"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps() -> list[dict]:
    [job] = workflow()["jobs"].values()
    return job["steps"]


def run_steps() -> list[dict]:
    return [step for step in steps() if "run" in step]


def is_install(step: dict) -> bool:
    return "pip install" in step["run"]


def test_the_workflow_is_a_complete_gate():
    flow = workflow()
    triggers = flow.get("on", flow.get(True))  # YAML 1.1 reads the key `on` as true
    assert "pull_request" in triggers
    assert {"MODEL", "LIMIT", "POLICY", "BASELINE", "OUT"} <= set(flow["env"])
    assert flow["env"]["MODEL"] == "tiny-llava" and flow["env"]["POLICY"] == "docs/ci/policy.yaml"
    uses = [step.get("uses", "") for step in steps()]
    assert any(u.startswith("actions/checkout@") for u in uses)
    upload = next(step for step in steps() if step.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["if"] == "always()"  # the summary of a failed gate is the one worth reading
    uploaded = upload["with"]["path"]
    assert "${{ env.OUT }}/summary.md" in uploaded and "${{ env.OUT }}/junit.xml" in uploaded
    commands = " ".join(step["run"] for step in run_steps())
    for needed in ("vrp-eval run", "vrp-eval check", "--policy", "--junit", "--summary", "--baseline"):
        assert needed in commands, needed
    # Only env variables in the commands: what the test substitutes is what the workflow reads.
    assert "${{" not in commands
    assert load_policy(POLICY).bounds  # the shipped policy is valid


def test_the_install_step_installs_this_project():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    # pyproject's [project] name and version (tomllib is Python >= 3.11; vrp-eval supports 3.10).
    text = (ROOT / "pyproject.toml").read_text()
    project = {key: re.search(rf'^{key} = "([^"]+)"', text, flags=re.MULTILINE).group(1) for key in ("name", "version")}
    [install] = [step for step in run_steps() if is_install(step)]
    words = shlex.split(install["run"])
    specs = words[words.index("install") + 1:]
    [requirement] = [Requirement(spec) for spec in specs if not spec.startswith("-")]
    assert canonicalize_name(requirement.name) == canonicalize_name(project["name"])
    assert requirement.specifier.contains(project["version"]), (str(requirement), project["version"])


def _run(command: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    # What GitHub runs for a `run:` step on Linux: bash --noprofile --norc -eo pipefail {0}.
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", command], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
def test_the_recipe_runs_evaluates_gates_and_summarises(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "docs" / "ci").mkdir(parents=True)
    shutil.copy(POLICY, checkout / "docs" / "ci" / "policy.yaml")
    step_summary = tmp_path / "step_summary.md"
    env = {**os.environ, **{k: str(v) for k, v in workflow()["env"].items()},
           "LIMIT": str(LIMIT), "GITHUB_STEP_SUMMARY": str(step_summary),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    skipped = []
    for step in run_steps():
        if is_install(step):
            skipped.append((step["name"], INSTALL_SKIPPED))
            continue
        done = _run(step["run"], env, checkout)
        assert done.returncode == 0, f"{step.get('name')}: {step['run']}\n{done.stderr[-3000:]}"
    assert skipped == [("Install vrp-eval", INSTALL_SKIPPED)]

    out = checkout / env["OUT"]
    results = read_results(out / "run" / "results.json")
    assert results["config"]["model_name"] == "tiny-llava"
    assert results["results"]["vrp_synth"]["n_samples"] == LIMIT
    summary = (out / "summary.md").read_text()
    assert summary.startswith("## vrp-eval gate passed: tiny-llava")
    assert step_summary.read_text() == summary + "\n"
    n_bounds = len(load_policy(POLICY).bounds)
    junit = ElementTree.parse(out / "junit.xml").getroot()
    assert (junit.get("tests"), junit.get("failures")) == (str(n_bounds), "0")
    assert len(list(junit.iter("testcase"))) == n_bounds
    assert {p.name for p in (out / "compare").iterdir()} == {"compare.md", "compare.csv", "compare.png"}

    gate_step = next(step["run"] for step in run_steps() if "vrp-eval check" in step["run"])
    # With a baseline (the run itself): the regression testcases join the bounds, and nothing got worse.
    done = _run(gate_step, {**env, "BASELINE": str(out / "run")}, checkout)
    assert done.returncode == 0, done.stderr[-3000:]
    junit = ElementTree.parse(out / "junit.xml").getroot()
    assert (junit.get("tests"), junit.get("failures")) == (str(n_bounds + 2), "0")
    assert "paired: both runs scored the same 16 samples" in (out / "summary.md").read_text()
    # A policy the model cannot meet fails the step: the recipe gates.
    (checkout / env["POLICY"]).write_text('bounds:\n  - {metric: accuracy, op: ">=", value: 1.01}\n')
    done = _run(gate_step, env, checkout)
    assert done.returncode == 1, done.stderr[-3000:]
    assert ElementTree.parse(out / "junit.xml").getroot().get("failures") == "1"
    assert re.search(r"FAILED vrp_synth: accuracy >= 1\.01", done.stdout)


def test_the_zoo_table_script_uses_real_options():
    """docs/ci/zoo-table.sh (the README's zoo table) calls vrp-eval with options its parsers accept."""
    import argparse
    import importlib

    from vrp_eval.cli import COMMANDS

    values = {"model": "tiny-llava", "LIMIT": "200", "OUT": "runs/zoo"}
    lines = [line.strip() for line in (ROOT / "docs" / "ci" / "zoo-table.sh").read_text().splitlines()
             if line.strip().startswith("vrp-eval ")]
    assert [line.split()[1] for line in lines] == ["run", "compare"]
    for line in lines:
        words = shlex.split(re.sub(r"\$(\w+)", lambda m: values[m.group(1)], line))
        parser = argparse.ArgumentParser(prog=f"vrp-eval {words[1]}")
        importlib.import_module(COMMANDS[words[1]][0]).configure(parser)
        parser.parse_args(words[2:])  # SystemExit (a test failure) on an unknown option or a bad value


def test_docs_quote_the_workflow_and_the_policy_as_shipped():
    """docs/ci.md shows the workflow file verbatim and the policy's bounds as the shipped file holds them."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "ci.md").read_text(), flags=re.DOTALL)
    assert WORKFLOW.read_text() in blocks
    assert yaml.safe_load(POLICY.read_text()) in [yaml.safe_load(block) for block in blocks]
