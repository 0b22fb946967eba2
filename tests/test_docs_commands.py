"""The commands in README.md and docs/*.md, checked against the real command lines and run offline.

Which commands (the rule):
- block commands: every line of a fenced ```bash / ```sh / ```shell / ```console block (a trailing `\\`
  joins lines, `#` starts a comment). Every such line must start with a known program: an unknown
  one fails, so no command escapes the check unseen.
- inline commands: every `code span` whose first word is a known program. They may hold placeholders
  (`<results.json>`, `ORG`, `[--device cuda]`, `...`).
Known programs: vrp-eval, lmms-eval, lm_eval / lm-eval, `python -m <module>`, `accelerate launch`,
make (a path such as `.venv/bin/vrp-eval` counts as its last part).
docs/bad-inputs.md is left out: tests/test_bad_inputs.py runs its table as written, and its message
column quotes output that looks like a command (`vrp-eval push:`).

What is checked:
1. every command: each subcommand exists and each `--option` is spelled exactly as that (sub)command's
   own argparse parser defines it (no abbreviation); for make, the target exists in the Makefile.
2. block commands: the whole command line goes through the program's real parser (values too).
3. block commands run (slow) from the repository root, offline, with `--limit` set to LIMIT and the
   output sent to a temporary folder, and must write results for every task with LIMIT samples,
   unless one of the rules in `why_not_run` says why not (a Hub id or a task whose data is on the
   Hub: network; a CUDA device: a GPU; a backend whose import needs a package that is not
   installed). make is never run (`make run` / `make test` set up the machine and run everything).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "bad-inputs.md")]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
LIMIT = 4
#: Tasks whose data ships with vrp-eval (every other task reads its data from the Hub).
OFFLINE_TASKS = {"vrp_synth", "vrp_synth_mc", "vrp_text_synth", "vrp_text_synth_mc"}
#: lmms-eval backends whose module imports a package that neither lmms-eval nor vrp-eval requires.
BACKEND_NEEDS = {"llava_hf": "decord"}
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
       "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Command:
    text: str
    where: str  # file:line of its first appearance
    block: bool  # from a shell code block (parsed whole and run) or inline (options checked only)


# --------------------------------------------------------------------------------------------
# Finding the commands
# --------------------------------------------------------------------------------------------

def _program(words: list[str]) -> str | None:
    """The known program a command starts with ('python -m' keeps its module), or None."""
    if not words:
        return None
    first = Path(words[0]).name
    if first in ("vrp-eval", "lmms-eval", "lm_eval", "lm-eval", "make"):
        return first
    if first == "accelerate" and words[1:2] == ["launch"]:
        return "accelerate launch"
    if first in ("python", "python3") and len(words) > 2 and words[1] == "-m":
        return "python -m"
    return None


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote inside a placeholder
        return text.split()


def extract(markdown: str, name: str) -> tuple[list[Command], list[str]]:
    """(commands, problems) of one markdown text, by the module docstring's rule."""
    commands, problems = [], []
    lines = markdown.splitlines()
    fence: str | None = None
    pending, start = "", 0
    prose: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:].strip() or "text")
            continue
        if fence is None:
            prose.append((number, line))
        elif fence in SHELL_FENCES and stripped:
            if not pending:
                start = number
            pending += stripped[:-1].rstrip() + " " if stripped.endswith("\\") else stripped
            if stripped.endswith("\\"):
                continue
            text, pending = pending.strip(), ""
            if _program(_words(text)) is None:
                problems.append(f"{name}:{start}: {text!r} does not start with a known program")
            else:
                commands.append(Command(text, f"{name}:{start}", block=True))
    # Inline spans, paragraph by paragraph (a span may wrap a line; a stray backtick spoils one paragraph only).
    paragraph: list[tuple[int, str]] = []
    for number, line in [*prose, (0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        text = " ".join(part for _, part in paragraph)
        for match in re.finditer(r"`([^`]+)`", text):
            span = match.group(1).strip()
            if _program(_words(re.sub(r"\$\([^)]*\)", "X", span))) is not None:
                commands.append(Command(span, f"{name}:{paragraph[0][0]}", block=False))
        paragraph = []
    return commands, problems


def _collect() -> tuple[list[Command], list[str]]:
    seen: dict[str, Command] = {}
    problems: list[str] = []
    for path in DOCS:
        found, wrong = extract(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
        problems += wrong
        for command in found:
            key = f"{command.block}:{shlex.join(_words(command.text))}"  # the same command, comments aside
            if key not in seen:
                seen[key] = command
    return list(seen.values()), problems


COMMANDS, EXTRACTION_PROBLEMS = _collect()
BLOCK_COMMANDS = [c for c in COMMANDS if c.block]


# --------------------------------------------------------------------------------------------
# The programs' own parsers
# --------------------------------------------------------------------------------------------

def _vrp_eval_parser(name: str) -> argparse.ArgumentParser:
    """The parser `vrp-eval <name>` parses its arguments with (as vrp_eval.cli.main builds it)."""
    from vrp_eval.cli import COMMANDS as VRP_COMMANDS

    parser = argparse.ArgumentParser(prog=f"vrp-eval {name}")
    importlib.import_module(VRP_COMMANDS[name][0]).configure(parser)
    return parser


@functools.cache
def _lmms_eval_parser() -> argparse.ArgumentParser:
    """lmms-eval's evaluation parser (`lmms-eval --model ...`, `lmms-eval eval ...`, `-m lmms_eval`)."""
    from lmms_eval.__main__ import parse_eval_args

    argv, sys.argv = sys.argv, ["lmms-eval"]
    try:
        return parse_eval_args()[0]
    finally:
        sys.argv = argv


@functools.cache
def _lm_eval_parser() -> argparse.ArgumentParser:
    from lm_eval._cli.harness import HarnessCLI

    return HarnessCLI()._parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def resolve(words: list[str]) -> tuple[argparse.ArgumentParser | None, list[str], list[str]]:
    """(the parser that receives the arguments, the arguments, problems) of a command's words.

    Each program is dispatched the way its own entry point does it: vrp-eval builds one parser per
    subcommand; lmms-eval routes flags first (or `eval`) to its evaluation parser and anything else to
    its subcommands; lm_eval inserts `run` when the first word is not a subcommand; `python -m
    vrp_eval.lm` is lm_eval with vrp-lm registered."""
    program = _program(words)
    if program == "vrp-eval":
        from vrp_eval.cli import COMMANDS as VRP_COMMANDS

        rest = [w for w in words[1:] if w != "--debug"]
        if not rest or rest[0] in ("-h", "--help", "--version"):
            return None, [], []
        if rest[0] not in VRP_COMMANDS:
            return None, [], [f"vrp-eval has no subcommand {rest[0]!r} (it has {', '.join(VRP_COMMANDS)})"]
        return _vrp_eval_parser(rest[0]), rest[1:], []
    if program == "lmms-eval":
        from lmms_eval.cli import dispatch

        rest = words[1:]
        if rest and (rest[0].startswith("-") or rest[0] == "eval"):
            return _lmms_eval_parser(), rest[1:] if rest[0] == "eval" else rest, []
        return dispatch._build_parser(), rest, []
    if program in ("lm_eval", "lm-eval"):
        rest = words[1:]
        if rest and rest[0] not in _subparsers(_lm_eval_parser()):
            rest = ["run", *rest]
        return _lm_eval_parser(), rest, []
    if program == "python -m":
        module, rest = words[2], words[3:]
        if module == "vrp_eval.lm":
            return _lm_eval_parser(), ["run", *rest], []
        if module == "lmms_eval":
            return resolve(["lmms-eval", *rest])
        if importlib.util.find_spec(module) is None:
            return None, [], [f"no module {module!r} to run with python -m"]
        return None, [], []  # a module with its own arguments: that it exists is what can be checked
    if program == "accelerate launch":
        from accelerate.commands.launch import launch_command_parser

        rest = words[2:]
        if "-m" in rest:  # accelerate's own options, then the module and its arguments
            at = rest.index("-m")
            problems = check_options(launch_command_parser(), rest[:at])
            parser, args, more = resolve(["python", *rest[at:]])
            return parser, args, problems + more
        return launch_command_parser(), rest, []
    return None, [], []


def _takes(action: argparse.Action, following: list[str]) -> int:
    """How many of the following words an option consumes as its values."""
    nargs = action.nargs
    if nargs == 0 or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                         argparse._HelpAction, argparse._VersionAction)):
        return 0
    if nargs is None:
        return 1
    if isinstance(nargs, int):
        return nargs
    count = 0
    while count < len(following) and not following[count].startswith("-"):
        count += 1
    return min(count, 1) if nargs == "?" else count


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if not action.option_strings]


def check_options(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Problems of `args` for `parser`: options not spelled exactly as the parser (or the subcommand
    the arguments descend into) defines them, and subcommands or positional choices it does not have."""
    problems = []
    positionals = _positionals(parser)
    index = 0
    while index < len(args):
        word = args[index].strip("[]")
        index += 1
        if word.startswith("--") and len(word) > 2:
            name = word.split("=", 1)[0]
            action = parser._option_string_actions.get(name)
            if action is None:
                spelled = [o for o in parser._option_string_actions if o.replace("-", "_") == name.replace("-", "_")]
                hint = f"; it is spelled {spelled[0]}" if spelled else ""
                problems.append(f"{parser.prog}: no option {name}{hint}")
            elif "=" not in word:
                index += _takes(action, args[index:])
        elif not word.startswith("-") and positionals:
            action = positionals[0]
            if re.search(r"[|<>{}]|\.\.\.|^[A-Z]+$", word):  # a placeholder (path|build, <x>, {out}, OUT)
                if isinstance(action, argparse._SubParsersAction):
                    break  # which subcommand is unknown: nothing after it can be checked
            elif action.choices is not None and word not in action.choices:
                kind = "subcommand" if isinstance(action, argparse._SubParsersAction) else "choice"
                problems.append(f"{parser.prog}: no {kind} {word!r} (it has {', '.join(action.choices)})")
                break
            elif isinstance(action, argparse._SubParsersAction):
                parser = action.choices[word]
                positionals = _positionals(parser)
                continue
            if action.nargs not in ("*", "+", argparse.REMAINDER):
                positionals = positionals[1:]
    return problems


@functools.cache
def _substitute(inner: str) -> str:
    """The output of a `$(...)` inside a command: itself a documented command, run as written."""
    words = _words(inner)
    assert _program(words) == "vrp-eval", f"$({inner}): only vrp-eval commands are expanded here"
    done = subprocess.run([str(BIN / "vrp-eval"), *words[1:]], check=False, capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def expand(text: str) -> list[str]:
    return _words(re.sub(r"\$\(([^)]*)\)", lambda m: _substitute(m.group(1)), text))


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+)\s*:", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


def problems_of(command: Command) -> list[str]:
    """Check 1 (and 2 for a block command): what is wrong with a documented command."""
    if _program(_words(command.text)) == "make":
        targets = [w for w in _words(command.text)[1:] if not w.startswith("-")]
        return [f"the Makefile has no target {t!r}" for t in targets if t not in _make_targets()]
    words = expand(command.text) if command.block else _words(re.sub(r"\$\([^)]*\)", "X", command.text))
    parser, args, problems = resolve(words)
    if parser is None:
        return problems
    problems += check_options(parser, [w for w in args if w not in ("...", "…")])
    if command.block and not problems:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(args)
        except SystemExit as exit_:
            if exit_.code:
                problems.append(f"{parser.prog} refuses it: {stderr.getvalue().strip()[-400:]}")
    return problems


# --------------------------------------------------------------------------------------------
# Checks 1 and 2
# --------------------------------------------------------------------------------------------

def test_the_docs_hold_commands_and_nothing_unrecognised():
    assert not EXTRACTION_PROBLEMS, "\n".join(EXTRACTION_PROBLEMS)
    # The documented entry points are all found: a rule that finds nothing checks nothing.
    texts = " ".join(c.text for c in BLOCK_COMMANDS)
    for program in ("make run", "vrp-eval run", "lmms-eval --model vrp", "python -m vrp_eval.lm", "lm_eval --model hf",
                    "lmms-eval tasks list"):
        assert program in texts, program
    assert len([c for c in COMMANDS if not c.block]) >= 20


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.where}:{c.text[:50]}" for c in COMMANDS])
def test_command_is_accepted_by_its_program(command):
    problems = problems_of(command)
    assert not problems, f"{command.where}: {command.text}\n" + "\n".join(problems)


@pytest.mark.parametrize(("text", "wrong"), [
    ("lmms-eval tasks list --include_path $(vrp-eval tasks-dir)", "no option --include_path; it is spelled --include-path"),
    ("lmms-eval --model vrp --include-path X --tasks vrp_synth", "no option --include-path; it is spelled --include_path"),
    ("lm_eval --model hf --include-path X --tasks vrp_text_synth_mc", "no option --include-path"),
    ("python -m vrp_eval.lm --model vrp-lm --limt 4", "no option --limt"),
    ("lmms-eval tasks lists", "no choice 'lists'"),
    ("vrp-eval run --n_noise 2", "no option --n_noise; it is spelled --n-noise"),
    ("vrp-eval runs --limit 2", "no subcommand 'runs'"),
    ("vrp-eval space publish --orgs ORG", "no option --orgs"),
    ("accelerate launch --num-procs 8 -m lmms_eval --model vrp", "no option --num-procs"),
    ("python -m vrp_eval.nothing_here", "no module 'vrp_eval.nothing_here'"),
    ("make tests", "no target 'tests'"),
])
@pytest.mark.parametrize("block", [False, True])
def test_checker_finds_wrong_commands(text, wrong, block):
    """The checks above can fail: each wrong spelling is caught, inline and in a block."""
    problems = problems_of(Command(text, "here", block=block))
    assert any(wrong in p for p in problems), problems


def test_checker_accepts_the_right_spellings_and_values():
    assert problems_of(Command("lmms-eval tasks list --include-path $(vrp-eval tasks-dir)", "here", True)) == []
    assert problems_of(Command("vrp-eval run --limit 4 --n-noise 2", "here", True)) == []
    # A block command is parsed whole, values included; inline ones only by their option names.
    assert any("refuses it" in p for p in problems_of(Command("vrp-eval run --noise uniform", "here", True)))
    assert problems_of(Command("vrp-eval run --noise uniform", "here", False)) == []


def test_extraction_rule():
    text = textwrap.dedent("""\
        Run `vrp-eval run --limit 4` or `lmms-eval tasks list`; not `ProbeSettings` or `--signals`.
        A span that wraps: `vrp-eval train-tiny --family llava
        --threads 1`.

        ```bash
        lmms-eval --model vrp \\
            --tasks vrp_synth   # a comment
        ```
        ```python
        print('python blocks are code, not commands')
        ```
        ```bash
        pip install decord
        ```
        """)
    commands, problems = extract(text, "x.md")
    assert [(c.text, c.where, c.block) for c in commands] == [
        ("lmms-eval --model vrp --tasks vrp_synth   # a comment", "x.md:6", True),
        ("vrp-eval run --limit 4", "x.md:1", False),
        ("lmms-eval tasks list", "x.md:1", False),
        ("vrp-eval train-tiny --family llava --threads 1", "x.md:1", False),
    ]
    assert problems == ["x.md:13: 'pip install decord' does not start with a known program"]


# --------------------------------------------------------------------------------------------
# Check 3: run the block commands that can run here
# --------------------------------------------------------------------------------------------

def _value(words: list[str], *flags: str) -> str | None:
    for index, word in enumerate(words):
        for flag in flags:
            if word == flag and index + 1 < len(words):
                return words[index + 1]
            if word.startswith(flag + "="):
                return word.split("=", 1)[1]
    return None


def _model_args(words: list[str]) -> dict[str, str]:
    text = _value(words, "--model_args") or ""
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and HUB_ID.match(name) is not None and not (ROOT / name).exists()


def _tasks(words: list[str]) -> list[str]:
    return [t for t in (_value(words, "--tasks") or "").split(",") if t]


def why_not_run(words: list[str]) -> str | None:
    """The listed reasons a documented block command is not run here; None: run it."""
    program = _program(words)
    if program == "make":
        return "make is not run: `make run` / `make test` set up the machine and run everything"
    args = _model_args(words)
    models = [args.get("pretrained")] + ([_value(words, "--model")] if program == "vrp-eval" else [])
    if any(_is_hub_id(m) for m in models) or _is_hub_id(_value(words, "--dataset")):
        return "needs the network: a Hub model or dataset"
    hub_tasks = [t for t in _tasks(words) if t not in OFFLINE_TASKS]
    if hub_tasks:
        return f"needs the network: {', '.join(hub_tasks)} read their data from the Hub"
    devices = [_value(words, "--device"), args.get("device"), args.get("device_map")]
    if any(d and d.startswith("cuda") for d in devices):
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA device"
    package = BACKEND_NEEDS.get(_value(words, "--model") or "")
    if program == "lmms-eval" and package and importlib.util.find_spec(package) is None:
        return f"lmms-eval's {_value(words, '--model')} backend imports {package}, which is not installed"
    return None


def _with(words: list[str], flag: str, value: str) -> list[str]:
    """`words` with `flag` set to `value` (replacing the documented value, or added)."""
    out, index = [], 0
    while index < len(words):
        if words[index] == flag:
            index += 2
        elif words[index].startswith(flag + "="):
            index += 1
        else:
            out.append(words[index])
            index += 1
    return [*out, flag, value]


def _argv(words: list[str]) -> list[str]:
    first = Path(words[0]).name
    return [sys.executable, *words[1:]] if first.startswith("python") else [str(BIN / first), *words[1:]]


RUNNABLE = [c for c in BLOCK_COMMANDS if _program(_words(c.text)) != "make"]


@pytest.mark.slow
@pytest.mark.parametrize("command", RUNNABLE, ids=[f"{c.where}:{c.text[:50]}" for c in RUNNABLE])
def test_command_runs_offline(command, tmp_path):
    words = expand(command.text)
    reason = why_not_run(words)
    if reason:
        pytest.skip(reason)
    tasks = _tasks(words)
    # A `vrp-eval run` is an evaluation too: its documented output folder (runs/...) would otherwise
    # land in the checkout, where a later documented run resumes from it.
    evaluates = bool(tasks) or (_program(words) == "vrp-eval" and words[1:2] == ["run"])
    if evaluates:  # a small run, written where the test can read it
        output_flag = "--output" if _program(words) == "vrp-eval" else "--output_path"
        words = _with(_with(words, "--limit", str(LIMIT)), output_flag, str(tmp_path))
    done = subprocess.run(_argv(words), check=False, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert done.returncode == 0, f"{command.where}: {shlex.join(words)}\n{done.stderr[-4000:]}"
    if not evaluates:
        if words[1:3] == ["tasks", "list"]:  # lmms-eval lists every shipped task
            shipped = re.findall(r"^task: (\S+)", "\n".join(p.read_text() for p in (ROOT / "vrp_eval" / "tasks").glob("*.yaml")),
                                 flags=re.MULTILINE)
            listed = set(done.stdout.split())
            assert len(shipped) >= 7 and set(shipped) <= listed, sorted(set(shipped) - listed)
        return
    # Both harnesses exit 0 even when the evaluation failed (they log the error): the results file
    # with every task evaluated on LIMIT samples is the proof that the command works.
    [results_file] = [p for p in tmp_path.rglob("*.json") if "results" in p.name]
    results = json.loads(results_file.read_text())
    if not tasks:  # `vrp-eval run`: vrp-eval's own results file, one task
        (metrics,) = results["results"].values()
        assert metrics["n_samples"] == LIMIT and 0 <= metrics["accuracy"] <= 1, metrics
        return
    for task in tasks:
        assert task in results["results"], (task, sorted(results["results"]))
        assert results["n-samples"][task]["effective"] == LIMIT, task
        accuracy = results["results"][task]["accuracy,none"]
        assert 0 <= accuracy <= 1, (task, accuracy)
