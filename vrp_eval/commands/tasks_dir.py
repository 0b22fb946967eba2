"""`vrp-eval tasks-dir`: print the folder of the shipped lmms-eval task YAMLs.

    lmms-eval tasks list --include-path $(vrp-eval tasks-dir)

The lmms-eval CLI finds the tasks without it (see vrp_eval/lmms.py); lmms-eval's `tasks`
subcommand and the Python API do not load the model plugins, so there the folder is named.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    # The same folder as vrp_eval.lmms.tasks_dir(), without importing lmms-eval.
    print(Path(__file__).resolve().parent.parent / "tasks")
    return 0
