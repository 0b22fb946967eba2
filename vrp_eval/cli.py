"""The `vrp-eval` command line.

Each subcommand lives in its own module under `vrp_eval.commands` and defines
`configure(parser)` and `main(args) -> int`. Modules are imported lazily so that
`vrp-eval --help` stays fast (torch and transformers load only when needed).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "run": ("vrp_eval.commands.run", "probe a model on a dataset and write a reliability report"),
    "train-tiny": ("vrp_eval.commands.train_tiny", "train a tiny zoo model on vrp-synth"),
    "push": ("vrp_eval.commands.push", "push a results file to a Hub results dataset"),
    "card": ("vrp_eval.commands.card", "write model-index metadata for a model card"),
    "tasks-dir": ("vrp_eval.commands.tasks_dir", "print the folder of the lmms-eval task YAMLs (for --include_path)"),
    "space": ("vrp_eval.commands.space", "the evaluate metrics and the leaderboard as Hub Spaces: path, build, publish"),
}


def build_parser() -> argparse.ArgumentParser:
    from vrp_eval import __version__

    parser = argparse.ArgumentParser(
        prog="vrp-eval",
        description="VLM Reliability Probe: calibration, attention sharpness and causal tracing "
        "for Hugging Face vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"vrp-eval {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 0
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    command_parser = argparse.ArgumentParser(prog=f"vrp-eval {name}", description=help_text)
    module.configure(command_parser)
    args = command_parser.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
