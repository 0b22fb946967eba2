"""The harnesses' run-time imports, in seconds, before any end-to-end test.

lmms-eval catches every exception inside an evaluation, logs `Error during evaluation: ...` and
exits 0 without a results file. A dependency that breaks an import made *inside* one of its
functions (filelock 4 removed `filelock._api`, which lmms-eval 0.7.3 imports in
`evaluator._enable_reentrant_filelocks`) therefore shows up only deep inside an end-to-end run, and
looks green to anything that checks the exit code alone. These tests import everything the
evaluators import at run time, and run lmms-eval's filelock patch itself, each in a fresh
interpreter so that nothing they patch leaks into the other tests.
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

#: The modules a harness evaluation runs through: their function-level imports run only at run time.
RUNTIME_MODULES = {
    "lmms_eval": ["lmms_eval.evaluator", "lmms_eval.__main__"],
    "lm_eval": ["lm_eval.evaluator", "lm_eval.__main__"],
}
FIX = "reinstall the tested set with `make setup` (pip install -c requirements.lock ...)"


def deferred_imports(module: str) -> list[str]:
    """Absolute modules imported inside functions (indented imports) of `module`'s source file."""
    source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and node.col_offset > 0:
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.col_offset > 0 and node.level == 0:
            found.add(node.module)
    return sorted(found)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)


def test_the_scan_finds_the_import_that_broke():
    # The guard below is only as good as this scan: it must see the function-level import that
    # filelock 4 broke, and ignore the module-level ones.
    found = deferred_imports("lmms_eval.evaluator")
    assert "filelock._api" in found
    assert "lmms_eval.api.registry" not in found  # imported at module level


@pytest.mark.parametrize("harness", sorted(RUNTIME_MODULES))
def test_everything_the_evaluator_imports_at_run_time_imports(harness):
    modules = [m for top in RUNTIME_MODULES[harness] for m in [top, *deferred_imports(top)]]
    code = ("import importlib, sys\nbad = []\n"
            f"for name in {modules!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as error:\n        bad.append(f'{name}: {type(error).__name__}: {error}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    result = run_python(code)
    assert result.returncode == 0, (
        f"{harness} imports these at run time and they fail, so every evaluation would log an error and "
        f"exit 0 without results:\n{result.stdout}{result.stderr[-2000:]}\nFix: {FIX}.")


def test_lmms_eval_filelock_patch_runs():
    # The exact run-time step that failed with filelock 4.3.1, on the installed filelock.
    result = run_python("from lmms_eval.evaluator import _enable_reentrant_filelocks as f; f()")
    assert result.returncode == 0, f"lmms-eval's evaluator cannot patch filelock:\n{result.stderr[-2000:]}\nFix: {FIX}."
