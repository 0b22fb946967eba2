"""Hostile results files: the validator accepts a file and the Space renders it as text, or rejects it
with a message that names the field and the fix (and `vrp-eval push` exits 2 with it).

Two layers: a table of named hostile classes (docs/bad-inputs-results.md lists them with their
messages), and hypothesis mutating realistic results objects (tests/sample_results.py) into hostile
ones at random places, in memory (what `build_results` / `push` see) and as file text (what the Space
reads from its dataset).
"""
from __future__ import annotations

import html
import json
import math
import re
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import gradio as gr
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sample_results import TASK, sample_results

from vrp_eval.cli import main as cli_main
from vrp_eval.hub import results_path
from vrp_eval.results import (
    ResultsError,
    dumps_results,
    loads_results,
    read_results,
    to_jsonable,
    validate_results,
)

ROOT = Path(__file__).resolve().parents[1]
PIXEL = "http://10.255.255.1/pixel.png"  # never fetched: the point is that nothing asks for it
IMG = f"<img src={PIXEL}>"
SCRIPT = "<script>alert(1)</script>"
MD_IMAGE = f"![pixel]({PIXEL})"
MD_LINK = "[click](javascript:alert(1))"
CODE_BREAKOUT = f"x` {IMG} `y"  # closes the code span the old summary put names in
HOSTILE_STRINGS = [IMG, SCRIPT, MD_IMAGE, MD_LINK, CODE_BREAKOUT, "www.example.com", "me@example.com",
                   "a|b|c", "$$x^2$$", "*em* _u_ ~~s~~", "# heading", "- item", "&lt;b&gt;", "\u202eevil",
                   "", " ", "/", "..", "a\nb", "tab\there", "\x00", "NaN", "Infinity", "1e999",
                   "0001-01-01T00:00:00+14:00", "2025-06-01T10:00:00+00:00", "llava-hf/llava-1.5-7b-hf"]


@pytest.fixture(scope="module")
def app():
    """leaderboard/app.py as a module (a Space, not part of the package); its import-time demo is empty."""
    from test_leaderboard import load_app

    with pytest.MonkeyPatch.context() as patch:
        yield load_app(patch)


def base() -> dict:
    """A realistic results object as it lies in a file (NaN already `null`)."""
    return to_jsonable(sample_results()[0])


# --- what "rendered as text" means --------------------------------------------------------------

APP_TAGS = re.compile(r"</?code>")  # the only markup the app writes into its markdown


def assert_markdown_is_text(markdown: str) -> None:
    """No tag, image or link in app markdown except what the app wrote itself."""
    stripped = APP_TAGS.sub("", markdown)
    assert "<" not in stripped, markdown
    assert "![" not in stripped, markdown
    for target in re.findall(r"\]\(([^)\s]*)", stripped):
        assert target.startswith("https://huggingface.co/"), markdown
    bare = re.sub(r"\]\(https://huggingface\.co/[^)]*\)", "", stripped)
    assert not re.search(r"://|www\.|@", bare), markdown  # GFM autolinks


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


HUB_LINK = re.compile(r"https://huggingface\.co/[A-Za-z0-9._-]+/[A-Za-z0-9._-]+")


def assert_html_cell_is_text(cell: str) -> None:
    """A model cell is escaped text, or one link to the model's Hub page around escaped text."""
    parser = _Tags()
    parser.feed(cell)
    for tag, attrs in parser.tags:
        assert tag == "a" and HUB_LINK.fullmatch(attrs.get("href", "")), cell


def visible_text(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]*>", "", markup))


LINE_PLOT = gr.LinePlot(x="confidence", y="accuracy", color="series")
CURVES_PLOT = gr.LinePlot(x="layer", y="ie", color="group")
BAR_PLOT = gr.BarPlot(x="window", y="drop")


def render(app, folder: Path):
    """Everything the Space shows for a results folder; fails on any exception or unescaped markup.
    Returns the board, the table and the text a visitor reads (the note first)."""
    board = app.load_leaderboard(folder)
    frame = app.results_frame(board)
    note = app._note(board)
    assert_markdown_is_text(note)
    texts = [html.unescape(note)]
    for cell in frame["model"]:
        assert_html_cell_is_text(cell)
        texts.append(visible_text(cell))
    for obj in board.results:
        for task in obj["results"]:
            summary, reliability, curves, knockout = app.detail_views(board, app._entry_key(obj, task))
            assert_markdown_is_text(summary)
            texts.append(html.unescape(summary))
            LINE_PLOT.postprocess(reliability)
            CURVES_PLOT.postprocess(curves)
            BAR_PLOT.postprocess(knockout)
    app.scatter_frame(frame)
    tasks, families, sizes = app.filter_choices(frame)  # what build_demo offers in the filter boxes
    assert len(app.filter_frame(frame, tasks, families, sizes)) == len(frame)
    return board, frame, texts


def assert_rejected_with_a_message(error: ResultsError) -> None:
    """`<what is wrong>; <what to do>`, of bounded length however large the hostile value."""
    message = str(error)
    assert ";" in message and len(message) < 2500, message


def check_file(app, text: str | bytes, tmp: Path, name: str = "hostile/model/results_x.json"):
    """The hostile file next to a good one: the Space keeps serving the good one and either renders the
    hostile one or lists it in the note. Returns (the object read or None, the ResultsError or None, the
    text a visitor reads)."""
    good = base()
    good["config"]["model_name"] = "good-org/good-model"
    (tmp / "good").mkdir(parents=True, exist_ok=True)
    (tmp / "good" / "results.json").write_text(json.dumps(good))
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        obj, error = read_results(path), None
    except ResultsError as raised:
        obj, error = None, raised
        assert_rejected_with_a_message(raised)
    board, frame, texts = render(app, tmp)
    assert "good-org/good-model" in set(frame["model"].map(visible_text))
    if error is None:
        assert len(board.results) == 2 and not board.skipped
        results_path(obj), dumps_results(obj)  # what `vrp-eval push` computes before any network
    else:
        assert len(board.results) == 1 and len(board.skipped) == 1
    return obj, error, texts


# --- named hostile classes (docs/bad-inputs-results.md) ---------------------------------------------

def _set(path: str, value):
    """A mutation that sets `path` (dots; [i] for list items) in the file object."""
    def mutate(obj):
        *parents, last = re.findall(r"[^.\[\]]+", path)
        node = obj
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


def _rename_task(name):
    def mutate(obj):
        obj["results"] = {name: obj["results"].pop(TASK)}
        obj["details"] = {name: obj["details"].pop(TASK)}
    return mutate


def _rename_metric(name):
    return lambda obj: obj["results"][TASK].update({name: obj["results"][TASK].pop("ece")})


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


def _as_text(mutate) -> str:
    obj = base()
    mutate(obj)
    return json.dumps(obj, allow_nan=True)  # NaN / Infinity literals, as a careless writer produces them


def _replace_text(old: str, new: str) -> str:
    return json.dumps(base()).replace(old, new, 1)


D = f"details.{TASK}"
R = f"results.{TASK}"
# (id, file text, expected: ("render", literal strings the visitor must see) or ("reject", field named))
CASES = [
    ("bins-null", _as_text(_set(f"{D}.reliability_bins", None)), ("render", [])),
    ("bins-not-a-list", _as_text(_set(f"{D}.reliability_bins", "abc")), ("reject", f"{D}.reliability_bins")),
    ("bin-count-string", _as_text(_set(f"{D}.reliability_bins[3].count", "3")),
     ("reject", f"{D}.reliability_bins[3].count")),
    ("bin-edge-null", _as_text(_set(f"{D}.reliability_bins[3].lo", None)), ("reject", f"{D}.reliability_bins[3].lo")),
    ("ie-curves-null", _as_text(_set(f"{D}.ie_curves", None)), ("render", [])),
    ("ie-curve-string", _as_text(_set(f"{D}.ie_curves.image", "abc")), ("reject", f"{D}.ie_curves.image")),
    ("ie-group-hostile-name", _as_text(_set(f"{D}.ie_curves.{IMG.replace('.', '_')}", [0.1, None])), ("render", [])),
    ("knockout-window-string", _as_text(_set(f"{D}.knockout_curve[0].window", "ab")),
     ("reject", f"{D}.knockout_curve[0].window")),
    ("knockout-window-floats", _as_text(_set(f"{D}.knockout_curve[0].window", [0.5, 3])),
     ("reject", f"{D}.knockout_curve[0].window")),
    ("knockout-entry-number", _as_text(_set(f"{D}.knockout_curve[0]", 3)), ("reject", f"{D}.knockout_curve[0]")),
    ("knockout-drop-string", _as_text(_set(f"{D}.knockout_curve[0].drop", "big")),
     ("reject", f"{D}.knockout_curve[0].drop")),
    ("params-infinity-literal", _as_text(_set("config.model_num_parameters", math.inf)),
     ("reject", "config.model_num_parameters")),
    ("params-nan-literal", _as_text(_set("config.model_num_parameters", math.nan)),
     ("reject", "config.model_num_parameters")),
    ("params-overflowing-literal", _replace_text("7063427072", "1e999"), ("reject", "config.model_num_parameters")),
    ("params-string", _as_text(_set("config.model_num_parameters", "7B")), ("reject", "config.model_num_parameters")),
    ("params-bool", _as_text(_set("config.model_num_parameters", True)), ("reject", "config.model_num_parameters")),
    ("metric-infinity-literal", _as_text(_set(f"{R}.ece", -math.inf)), ("render", [])),
    ("bin-edge-infinity-literal", _as_text(_set(f"{D}.reliability_bins[3].hi", math.inf)),
     ("reject", f"{D}.reliability_bins[3].hi")),
    ("ie-and-drop-nan-literals", _as_text(lambda o: (_set(f"{D}.ie_curves.image[2]", math.nan)(o),
                                                      _set(f"{D}.knockout_curve[1].drop", math.nan)(o))),
     ("render", [])),
    ("metric-int-beyond-float", _replace_text('"n_samples": 500', '"n_samples": 1' + "0" * 400),
     ("reject", f"{R}.n_samples")),
    ("metric-int-5000-digits", _replace_text('"n_samples": 500', '"n_samples": ' + "9" * 5000),
     ("reject", "integer")),
    ("metric-nested-list", _as_text(_set(f"{R}.ece", [[0.1]])), ("reject", f"{R}.ece")),
    ("metric-bool", _as_text(_set(f"{R}.ece", True)), ("reject", f"{R}.ece")),
    ("layers-negative", _as_text(_set(f"{R}.circuit_layers", [-3, 2])), ("reject", f"{R}.circuit_layers")),
    ("layers-strings", _as_text(_set(f"{R}.circuit_layers", ["a", "b"])), ("reject", f"{R}.circuit_layers")),
    ("model-name-slash", _as_text(_set("config.model_name", "/")), ("reject", "config.model_name")),
    ("model-name-newline", _as_text(_set("config.model_name", "org/a\nb")), ("reject", "config.model_name")),
    ("model-name-10000-chars", _as_text(_set("config.model_name", "m" * 10_000)), ("reject", "config.model_name")),
    ("model-name-number", _as_text(_set("config.model_name", 123)), ("reject", "config.model_name")),
    ("model-name-img", _as_text(_set("config.model_name", IMG)), ("render", [IMG])),
    ("model-name-script", _as_text(_set("config.model_name", SCRIPT)), ("render", [SCRIPT])),
    ("model-name-markdown-image", _as_text(_set("config.model_name", MD_IMAGE)), ("render", [MD_IMAGE])),
    ("model-name-markdown-link", _as_text(_set("config.model_name", MD_LINK)), ("render", [MD_LINK])),
    ("model-name-autolinks", _as_text(_set("config.model_name", "www.example.com me@example.com")),
     ("render", ["www.example.com me@example.com"])),
    ("task-name-code-breakout", _as_text(_rename_task(CODE_BREAKOUT)), ("render", [CODE_BREAKOUT])),
    ("task-name-empty", _as_text(_rename_task("")), ("reject", "results")),
    ("metric-name-code-breakout", _as_text(_rename_metric(CODE_BREAKOUT)), ("render", [CODE_BREAKOUT])),
    ("probe-value-code-breakout", _as_text(_set("config.probe.noise", CODE_BREAKOUT)), ("render", [CODE_BREAKOUT])),
    ("sha-code-breakout", _as_text(_set("config.model_sha", CODE_BREAKOUT)), ("render", [CODE_BREAKOUT])),
    ("dataset-markdown-image", _as_text(_set("config.dataset", MD_IMAGE)), ("render", [MD_IMAGE])),
    ("family-list", _as_text(_set("config.model_family", ["llava"])), ("reject", "config.model_family")),
    ("family-number", _as_text(_set("config.model_family", 7)), ("reject", "config.model_family")),
    ("created-at-number", _as_text(_set("config.created_at", 20250101)), ("reject", "config.created_at")),
    ("created-at-out-of-range", _as_text(_set("config.created_at", "0001-01-01T00:00:00+14:00")),
     ("reject", "config.created_at")),
    ("deep-nesting-100000", _nest(100_000), ("reject", "nest")),
    ("deep-nesting-in-details", _replace_text('"p_clean": 0.81', '"p_clean": ' + _nest(200)),
     ("reject", f"{D}.p_clean")),
    ("huge-file", _as_text(_set(f"{D}.padding", "x" * (11 * 1024 * 1024))), ("reject", "bytes")),
    ("truncated-json", json.dumps(base())[:200], ("reject", "not valid JSON")),
    ("not-utf8", b'{"schema": "\xff\xfe"}', ("reject", "not valid JSON")),
    ("top-level-list", "[1, 2, 3]", ("reject", "JSON object")),
    ("schema-echoes-markup", _as_text(_set("schema", IMG)), ("reject", "schema")),
]


@pytest.mark.parametrize("text, expected", [pytest.param(t, e, id=i) for i, t, e in CASES])
def test_hostile_file_is_rendered_as_text_or_rejected_with_a_message(app, tmp_path, text, expected):
    obj, error, texts = check_file(app, text, tmp_path)
    kind, detail = expected
    assert (obj is None) == (error is not None)
    if kind == "reject":
        assert error is not None, "accepted a file that should be rejected"
        assert detail in str(error)
        assert any("hostile/model/results_x.json" in t for t in texts)  # the note names the file
    else:
        assert error is None, str(error)
        for literal in detail:
            assert any(literal in t for t in texts), literal


@pytest.mark.parametrize("text, expected", [
    pytest.param(t, e, id=i)
    for i, t, e in CASES if i in ("bins-null", "knockout-window-string", "params-infinity-literal",
                                  "metric-int-5000-digits", "model-name-img", "deep-nesting-100000",
                                  "huge-file", "created-at-out-of-range")])
def test_push_dry_run_exits_2_on_a_rejected_file_and_0_on_an_accepted_one(tmp_path, capsys, text, expected):
    path = tmp_path / "results.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    code = cli_main(["push", str(path), "--repo", "org/results", "--dry-run"])
    err = capsys.readouterr().err
    if expected[0] == "reject":
        assert code == 2 and expected[1] in err, err
        assert "Traceback" not in err
    else:
        assert code == 0, err


def test_hostile_file_names_and_echoed_values_are_escaped_in_the_note(app, tmp_path):
    _, error, texts = check_file(app, _as_text(_set("schema", MD_IMAGE)), tmp_path,
                                 name="<img src=pixel.png>/![p](http:x)/results.json")
    assert error is not None
    assert "<img src=pixel.png>/![p](http:x)/results.json" in texts[0] and MD_IMAGE in texts[0]


def test_build_demo_serves_a_folder_of_hostile_but_valid_files(app, tmp_path):
    names = [IMG, SCRIPT, MD_IMAGE]
    for i, name in enumerate(names):
        obj = base()
        obj["config"].update(model_name=name, model_family=name, dataset=name, model_sha=CODE_BREAKOUT)
        obj["details"][TASK]["reliability_bins"] = None
        (tmp_path / f"m{i}.json").write_text(json.dumps(obj))
    demo = app.build_demo(tmp_path)
    assert isinstance(demo, gr.Blocks)
    board, frame, texts = render(app, tmp_path)
    assert len(board.results) == 3 and not board.skipped and len(frame) == 3
    for name in names:
        assert any(name in t for t in texts)


# --- property-based: random hostile mutations of realistic objects ----------------------------------

class Deep:
    """A placeholder for a value nested `depth` levels deep (built without recursion)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth

    def build(self):
        value: list = []
        for _ in range(self.depth - 1):
            value = [value]
        return value


SPECIAL = [None, True, False, 0, -1, 1.5, 2**53 + 1, 1e308, -1e-320, math.nan, math.inf, -math.inf]
BIN_KEYS = ["lo", "hi", "count", "mean_confidence", "mean_score", "window", "drop", "accuracy", "image"]
numbers = st.one_of(st.sampled_from(SPECIAL), st.integers(), st.floats(),
                    st.integers(15, 4000).map(lambda n: 10**n))
strings = st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=12), st.integers(500, 3000).map(lambda n: "x" * n))
values = st.recursive(numbers | strings, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.sampled_from(BIN_KEYS + HOSTILE_STRINGS[:8]), inner, max_size=4),
                      max_leaves=10)
deep = st.integers(20, 3000).map(Deep)


def _children(node):
    return list(node) if isinstance(node, dict) else list(range(len(node)))


@st.composite
def mutations(draw):
    """(path, action, value): walk from the top to a random node, then replace, delete, rename or add."""
    obj = base()
    steps = [draw(st.sampled_from(["config", "results", "details"] * 3 + ["schema", "schema_version"]))]
    node = obj[steps[0]]
    while isinstance(node, (dict, list)) and _children(node) and (len(steps) < 2 or draw(st.integers(0, 3))):
        key = draw(st.sampled_from(_children(node)))
        steps.append(key)
        node = node[key]
    action = draw(st.sampled_from(["replace", "replace", "delete", "rename", "add"]))
    # mostly a value of the same kind (a hostile name for a name, an odd number for a number), which a
    # validator may well accept and the Space must then show; sometimes anything, or a deep nest
    same_kind = strings if isinstance(node, str) else numbers if isinstance(node, (int, float)) else values
    value = draw(st.one_of(same_kind, same_kind, same_kind, values, deep))
    name = draw(st.one_of(st.sampled_from(HOSTILE_STRINGS), st.text(max_size=8)))
    return steps, action, value, name


def apply(obj, mutation, *, in_memory: bool):
    """Apply one mutation (drawn against the unmutated object: skipped when an earlier one removed its place)."""
    steps, action, value, name = mutation
    parent = obj
    try:
        for key in steps[:-1]:
            parent = parent[key]
        key = steps[-1]
        parent[key]
    except (KeyError, IndexError, TypeError):
        return None
    placeholder = None
    if isinstance(value, Deep):
        if in_memory:
            value = value.build()
        else:
            placeholder = (f"__deep_{id(value)}__", value.depth)
            value = placeholder[0]
    if action == "replace":
        parent[key] = value
    elif action == "delete":
        del parent[key]
    elif action == "rename" and isinstance(parent, dict):
        parent[name] = parent.pop(key)
    elif isinstance(parent, dict):
        parent[name] = value
    else:
        parent.append(value)
    return placeholder


def file_text(batch) -> str:
    obj = base()
    placeholders = [apply(obj, m, in_memory=False) for m in batch]
    text = json.dumps(obj, allow_nan=True)
    for placeholder in filter(None, placeholders):
        text = text.replace(json.dumps(placeholder[0]), _nest(placeholder[1]))
    return text




@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(mutations(), min_size=1, max_size=2))
def test_hostile_files_are_rendered_as_text_or_rejected(app, batch):
    """What the Space reads: file text (NaN / Infinity literals, overflowing numbers, deep nesting)."""
    text = file_text(batch)
    try:
        loads_results(text)
        event("accepted")
    except ResultsError as error:
        assert_rejected_with_a_message(error)
        event(f"rejected: {str(error).split('`')[1] if '`' in str(error) else 'not JSON'}"[:60])
    with tempfile.TemporaryDirectory() as folder:
        check_file(app, text, Path(folder))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(mutations(), min_size=1, max_size=2))
def test_what_push_accepts_the_space_reads_back_and_renders(app, batch):
    """What `build_results` / `push` see: in-memory objects (NaN and infinities as floats)."""
    obj = base()
    for mutation in batch:
        apply(obj, mutation, in_memory=True)
    try:
        validate_results(obj)
    except ResultsError as error:
        assert_rejected_with_a_message(error)
        event("rejected")
        return
    event("accepted")
    text = dumps_results(obj)
    results_path(obj)
    loads_results(text)  # the canonical file of an accepted object is accepted again
    with tempfile.TemporaryDirectory() as folder:
        _, error, _ = check_file(app, text, Path(folder))
        assert error is None

