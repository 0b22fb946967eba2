"""The `vrp-eval` command line.

Each subcommand lives in its own module under `vrp_eval.commands` and defines
`configure(parser)` and `main(args) -> int`. Modules are imported lazily so that
`vrp-eval --help` stays fast (torch and transformers load only when needed).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "run": ("vrp_eval.commands.run", "probe a model on a dataset and write a reliability report"),
    "train-tiny": ("vrp_eval.commands.train_tiny", "train a tiny zoo model on vrp-synth"),
    "push": ("vrp_eval.commands.push", "push a results file to a Hub results dataset"),
    "card": ("vrp_eval.commands.card", "write model-index metadata for a model card"),
    "tasks-dir": ("vrp_eval.commands.tasks_dir", "print the folder of the lmms-eval task YAMLs (for --include_path)"),
    "space": ("vrp_eval.commands.space", "the evaluate metrics and the leaderboard as Hub Spaces: path, build, publish"),
    "check": ("vrp_eval.commands.check", "gate a run on a policy's bounds and/or against a baseline run (exit 1: fails)"),
    "compare": ("vrp_eval.commands.compare", "the comparison table of several runs (Markdown, CSV, PNG)"),
}


def build_parser() -> argparse.ArgumentParser:
    from vrp_eval import __version__

    parser = argparse.ArgumentParser(
        prog="vrp-eval",
        description="VLM Reliability Probe: calibration, attention sharpness and causal tracing "
        "for Hugging Face vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"vrp-eval {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too "
                                                              "(also VRP_EVAL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("VRP_EVAL_DEBUG", "").lower() in ("1", "true", "yes", "on")


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand. Expected failures (vrp-eval's own errors: bad options, data, results files,
    models, devices, the Hub; and file-system errors) become one line on stderr and exit code 2;
    `--debug` (anywhere on the line) or VRP_EVAL_DEBUG=1 shows their traceback. Anything else is a
    bug and keeps its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 0
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    command_parser = argparse.ArgumentParser(prog=f"vrp-eval {name}", description=help_text,
                                             epilog="--debug (or VRP_EVAL_DEBUG=1) shows tracebacks of expected errors")
    module.configure(command_parser)
    args = command_parser.parse_args(argv[1:])
    from vrp_eval.errors import VrpError
    from vrp_eval.results import ResultsError

    try:
        return int(module.main(args) or 0)
    except (VrpError, ResultsError, OSError) as error:
        if debug:
            raise
        print(f"vrp-eval {name}: {error}", file=sys.stderr)
        for note in getattr(error, "__notes__", ()):
            print(f"vrp-eval {name}: {note}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
