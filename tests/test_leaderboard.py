"""The leaderboard Space: results pushed to a loopback fake Hub, read back with snapshot_download,
queried with gradio_client and opened in a real headless Chromium (Debian's, driven by playwright)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from sample_results import LMMS_TASK, TASK, sample_results, write_lmms_run

from vrp_eval.hub import load_publishable, push_results
from vrp_eval.results import to_jsonable, write_results

ROOT = Path(__file__).resolve().parents[1]
REPO = "vrp-org/vrp-results"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODELS = ["llava-hf/llava-1.5-7b-hf", "google/paligemma-3b-mix-224", "Qwen/Qwen2-VL-7B-Instruct"]
FAMILIES = ["acme", "llava", "paligemma", "qwen2vl"]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
#: Always wrong and unconfident: the lowest ECE of the board, so ranked by ECE alone it would come first.
USELESS = "acme/always-wrong-vlm"
#: lmms-eval 0.7.3's `date` for a run at 2026-12-01T21:10:09 UTC: Singapore wall time (its default --timezone).
LMMS_DATE, LMMS_UTC = "20261202_051009", "2026-12-01T21:10:09"
#: A later run (by 49m51s) whose ISO text sorts *before* LMMS_DATE: "2026-1" < "202612" since "-" < "1".
LATER_ISO = "2026-12-01T22:00:00+00:00"


def load_app(monkeypatch):
    """leaderboard/app.py as a module (it is a Space, not part of the package); its import-time demo is empty."""
    monkeypatch.delenv("VRP_RESULTS_DIR", raising=False)
    monkeypatch.delenv("VRP_RESULTS_REPO", raising=False)
    spec = importlib.util.spec_from_file_location("vrp_leaderboard_app", ROOT / "leaderboard" / "app.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cell_text(cell: str) -> str:
    """A model cell's text (the cell is HTML: an escaped name, maybe inside a link to its Hub page)."""
    return re.sub(r"<[^>]*>", "", cell).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


@contextlib.contextmanager
def chromium_page():
    """A page in Debian's headless Chromium; skipped (failed in CI) where it is not installed."""
    if not CHROMIUM.exists():
        message = "Debian chromium is not installed (`make test` installs it: scripts/install-browser.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI the browser check must run, never silently skip
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1600, "height": 1000})
        finally:
            browser.close()


@contextlib.contextmanager
def served(demo):
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def table_rows(page) -> list[dict[str, str]]:
    """The leaderboard table as the visitor sees it: {header: cell text} per row, top to bottom."""
    return page.evaluate("""() => {
        const grid = document.querySelector('#leaderboard-table [role=grid]');
        const headers = Array.from(grid.querySelectorAll('[role=row][aria-rowindex="1"] [role=columnheader]'))
            .map(cell => cell.innerText.trim());
        return Array.from(grid.querySelectorAll('[role=row][aria-rowindex]'))
            .filter(row => row.querySelector('[role=gridcell]'))
            .map(row => Object.fromEntries(Array.from(row.querySelectorAll('[role=gridcell]'))
                .map((cell, i) => [headers[i], cell.innerText.trim()])));
    }""")


def table_headers(page) -> list[str]:
    return page.locator("#leaderboard-table thead th").filter(visible=True).all_inner_texts()


def useless_results() -> dict:
    """A fourth model on TASK: 5% accuracy, confidence to match (ECE 0.02, the board's lowest), under 1B."""
    obj = to_jsonable(sample_results()[1])
    obj["config"].update(model_name=USELESS, model_family="acme", model_num_parameters=400_000_000,
                         model_sha="c" * 40)
    obj["results"][TASK].update(accuracy=0.05, ece=0.02, ece_ci_low=0.01, ece_ci_high=0.03, brier=0.05)
    return obj


def newest_pair(tmp_path: Path) -> tuple[dict, dict]:
    """Two runs of LLaVA on vrp_synth: (an lmms-eval run as the old conversion stored it, 16 samples, its
    `created_at` lmms-eval's local text and its dataset "parquet"; a later 1000-sample run with an ISO time).
    By time the second is newer; by text the first."""
    converted = to_jsonable(load_publishable(write_lmms_run(tmp_path / "old-lmms", model=MODELS[0], date=LMMS_DATE)))
    old = json.loads(json.dumps(converted))
    old["config"].update(created_at=LMMS_DATE, dataset="parquet")
    later = json.loads(json.dumps(converted))
    later["config"].update(created_at=LATER_ISO, dataset="vrp-synth")
    later["results"][LMMS_TASK].update(n_samples=1000, accuracy=0.74, ece=0.1)
    return old, later


def test_the_newest_run_is_chosen_by_time_not_by_text(monkeypatch, tmp_path):
    app = load_app(monkeypatch)
    old, later = newest_pair(tmp_path)
    assert old["config"]["created_at"] > later["config"]["created_at"]  # what a string comparison picks
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "old.json").write_text(json.dumps(old))  # as the old `vrp-eval push` stored it: not normalised
    (folder / "later.json").write_text(json.dumps(later))
    # and the other way round for Qwen: the lmms-eval run is the newer one, and shows
    qwen = to_jsonable(load_publishable(write_lmms_run(tmp_path / "qwen", model=MODELS[2], date=LMMS_DATE)))
    earlier = json.loads(json.dumps(qwen))
    earlier["config"]["created_at"] = "2026-12-01T20:00:00+00:00"
    earlier["results"][LMMS_TASK]["n_samples"] = 1000
    (folder / "qwen-lmms.json").write_text(json.dumps(qwen))
    (folder / "qwen-earlier.json").write_text(json.dumps(earlier))

    board = app.load_leaderboard(folder)
    assert sorted(obj["_file"] for obj in board.results) == ["later.json", "qwen-lmms.json"]
    frame = app.results_frame(board)
    frame.index = frame["model"].map(cell_text)
    assert frame.loc[MODELS[0], "n_samples"] == 1000 and frame.loc[MODELS[0], "dataset"] == "vrp-synth"
    assert frame.loc[MODELS[0], "created_at"] == LATER_ISO[:19]
    # the lmms-eval run: its task names its data (not "parquet"), its size is the samples it ran
    assert frame.loc[MODELS[2], "n_samples"] == 16 and frame.loc[MODELS[2], "dataset"] == LMMS_TASK
    assert frame.loc[MODELS[2], "created_at"] == LMMS_UTC


def test_rank_is_accuracy_minus_ece_within_each_task(monkeypatch, tmp_path):
    """ECE alone would put the always-wrong model first (its ECE, 0.02, is the lowest)."""
    app = load_app(monkeypatch)
    for i, obj in enumerate([*sample_results(), useless_results()]):
        write_results(obj, tmp_path / f"m{i}.json")
    frame = app.results_frame(app.load_leaderboard(tmp_path))
    assert cell_text(frame.sort_values("ece")["model"].iloc[0]) == USELESS
    # accuracy - ece by hand: qwen .71-.18, llava .62-.21, paligemma .55-.14, always-wrong .05-.02
    assert list(frame["model"].map(cell_text)) == [MODELS[2], MODELS[0], MODELS[1], USELESS]
    assert list(frame["accuracy_minus_ece"]) == [0.53, 0.41, 0.41, 0.03]
    assert list(frame["rank"]) == [1, 2, 2, 4]  # equal scores share a rank, shown by accuracy (.62 before .55)

    # ranks are per task: a second task ranks its own rows from 1
    other = to_jsonable(sample_results()[1])
    other["results"] = {"vrp_other": other["results"][TASK]}
    other["details"] = {"vrp_other": other["details"][TASK]}
    write_results(other, tmp_path / "other.json")
    nan_ece = to_jsonable(sample_results()[0])
    nan_ece["config"]["model_name"] = "acme/no-ece"
    nan_ece["results"][TASK]["ece"] = None
    write_results(nan_ece, tmp_path / "no-ece.json")
    frame = app.results_frame(app.load_leaderboard(tmp_path))
    assert list(zip(frame["task"], frame["rank"].fillna(0))) == [
        ("vrp_other", 1), (TASK, 1), (TASK, 2), (TASK, 2), (TASK, 4), (TASK, 0)]  # no ECE: no rank, last
    assert cell_text(frame["model"].iloc[-1]) == "acme/no-ece"


def test_headers_mark_the_better_direction_and_columns_can_be_picked(monkeypatch):
    app = load_app(monkeypatch)
    assert [app.header(c) for c in ("accuracy", "ece", "brier", "attn_overconf_r", "causal_acc_drop", "rank")] == [
        "accuracy ↑", "ece ↓", "brier ↓", "attn_overconf_r ↓", "causal_acc_drop", "rank"]
    frame = app.results_frame(app.Leaderboard(results=[*sample_results()]))
    shown = app.shown_frame(frame, ["ece", "model_size"])
    assert list(shown.columns) == ["rank", "model", "model size", "ece ↓"]
    assert app.datatypes(["ece", "model_size"]) == ["number", "html", "str", "number"]


@pytest.fixture
def hub_with_results(fake_hub, tmp_path):
    """The three sample models and an always-wrong one pushed to the fake Hub; on vrp_synth, LLaVA's
    newest_pair (the old one uploaded as it was stored) and Qwen's lmms-eval run as `vrp-eval push` takes
    it; a foreign JSON file and a broken one."""
    from huggingface_hub import HfApi

    for obj in [*sample_results(), useless_results()]:
        push_results(obj, REPO, token=fake_hub.token, endpoint=fake_hub.url)
    old, later = newest_pair(tmp_path)
    push_results(later, REPO, token=fake_hub.token, endpoint=fake_hub.url)
    push_results(write_lmms_run(tmp_path / "qwen", model=MODELS[2], date=LMMS_DATE), REPO,
                 token=fake_hub.token, endpoint=fake_hub.url)
    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
    api.upload_file(path_or_fileobj=json.dumps(old).encode(), repo_id=REPO, repo_type="dataset",
                    path_in_repo=f"{MODELS[0]}/results_2026-12-02T05-10-09.json")  # the old push's name for it
    api.upload_file(path_or_fileobj=b'{"results": {"mmmu": {"acc": 0.4}}}', path_in_repo="other/model/lmms.json",
                    repo_id=REPO, repo_type="dataset")
    api.upload_file(path_or_fileobj=b'{"schema": "vrp-eval/res', path_in_repo="broken/model/results_x.json",
                    repo_id=REPO, repo_type="dataset")
    return fake_hub


def test_local_folder_skips_bad_files_with_a_note(monkeypatch, tmp_path):
    app = load_app(monkeypatch)
    for i, obj in enumerate(sample_results()):
        write_results(obj, tmp_path / f"m{i}" / "results.json")
    (tmp_path / "notes.json").write_text("[1, 2, 3]")
    older = sample_results()[0]
    older["config"]["created_at"] = "2024-01-01T00:00:00+00:00"
    older["results"][TASK]["ece"] = 0.99
    write_results(older, tmp_path / "m0" / "results_old.json")  # superseded by the newer run of the same model
    board = app.load_leaderboard(tmp_path)
    assert len(board.results) == 3
    assert len(board.skipped) == 1 and board.skipped[0].startswith("notes.json:")

    frame = app.results_frame(board)
    assert list(frame["ece"]) == [0.18, 0.21, 0.14]  # ranked by accuracy - ece: .53, .41, .41
    assert list(frame["circuit_layers"]) == ["20-28", "16-24", "12-18"]
    assert list(app.filter_frame(frame, [TASK], ["llava", "qwen2vl"], ["4-10B"])["model_family"]) == ["qwen2vl", "llava"]
    assert app.size_bucket(2.9e9) == "1-4B" and app.size_bucket(None) == "unknown"

    summary, reliability, curves, knockout = app.detail_views(board, app._entry_key(board.results[0], TASK))
    assert "circuit layers **" in summary and "Provenance" in summary
    assert set(curves["group"]) == {"image", "text", "last"}
    assert len(knockout) > 0 and knockout["drop"].min() < -0.4
    assert set(reliability["series"]) == {"model", "perfect calibration"}


def test_missing_source_gives_an_empty_board_with_a_note(monkeypatch):
    app = load_app(monkeypatch)
    board = app.load_leaderboard(None)
    assert board.results == [] and "VRP_RESULTS_REPO" in board.problem
    assert app.results_frame(board).empty


def test_space_reads_the_hub_and_serves_the_table_to_gradio_client_and_chromium(
        hub_with_results, monkeypatch, tmp_path):
    app = load_app(monkeypatch)
    monkeypatch.setenv("VRP_RESULTS_REPO", REPO)  # the Space's own configuration route; HF_ENDPOINT is the fake
    demo = app.build_demo(cache_dir=tmp_path / "hf-cache")
    with served(demo) as url:
        from gradio_client import Client

        client = Client(url, verbose=False, download_files=False)
        columns = ["task", "dataset", "n_samples", "accuracy", "ece"]
        update = client.predict([TASK], FAMILIES, ["<1B", "1-4B", "4-10B"], columns, api_name="/filter")
        # the datatypes follow the picked columns: the model cell stays HTML, the numbers numbers
        assert update["datatype"] == ["number", "html", "str", "str", "number", "number", "number"]
        table = update["value"]
        assert table["headers"] == ["rank", "model", "task", "dataset", "n_samples", "accuracy ↑", "ece ↓"]
        models = [row[1] for row in table["data"]]
        assert [cell_text(m) for m in models] == [MODELS[2], MODELS[0], MODELS[1], USELESS]
        assert [row[0] for row in table["data"]] == [1, 2, 2, 4]
        assert models[0] == (f'<a href="https://huggingface.co/{MODELS[2]}" target="_blank" '
                             f'rel="noopener noreferrer">{MODELS[2]}</a>')
        only_small = client.predict([TASK], FAMILIES, ["1-4B"], columns, api_name="/filter")
        assert len(only_small["value"]["data"]) == 1
        summary, *_ = client.predict(f"{MODELS[0]} · {TASK} · bfloat16 · "
                                     + sample_results()[0]["config"]["model_sha"][:7], api_name="/detail")
        assert "circuit layers **16-24**" in summary

        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        with chromium_page() as page:
            page.goto(url, wait_until="domcontentloaded", timeout=30_000)
            table_el = page.locator("#leaderboard-table")
            for model in [*MODELS, USELESS]:
                # Gradio keeps a hidden copy of each cell for measuring; wait for the visible one.
                table_el.get_by_text(model, exact=True).filter(visible=True).first.wait_for(timeout=30_000)
            note = page.locator("#skipped-note")
            assert "Skipped 2 file(s)" in note.inner_text()
            assert "other/model/lmms.json" in note.inner_text() and "broken/model/results_x.json" in note.inner_text()

            headers = table_headers(page)
            assert headers[:2] == ["rank", "model"]
            assert {"accuracy ↑", "ece ↓", "brier ↓", "accuracy − ece ↑", "causal_acc_drop"} <= set(headers)
            rows = table_rows(page)
            shown = [(row["rank"], row["model"], row["task"]) for row in rows]
            assert shown == [("1", MODELS[0], LMMS_TASK), ("2", MODELS[2], LMMS_TASK),
                             ("1", MODELS[2], TASK), ("2", MODELS[0], TASK), ("2", MODELS[1], TASK), ("4", USELESS, TASK)]
            # LLaVA on vrp_synth: the 1000-sample run made after the lmms-eval one, whose text sorts later
            assert (rows[0]["n_samples"], rows[0]["dataset"], rows[0]["created_at (UTC)"]) == (
                "1000", "vrp-synth", LATER_ISO[:19])
            # Qwen's lmms-eval run: the task names its parquet data; 16 samples; lmms-eval's date in UTC
            assert (rows[1]["n_samples"], rows[1]["dataset"], rows[1]["created_at (UTC)"]) == (
                "16", LMMS_TASK, LMMS_UTC)
            assert rows[2]["dataset"] == "lmms-lab/LMMs-Eval-Lite" and rows[2]["model size"] == "4-10B"
            page.screenshot(path=str(artifacts / "leaderboard.png"), full_page=True)

            picker = page.locator("#column-picker")
            picker.get_by_label("brier ↓", exact=True).click()
            picker.get_by_label("mce ↓", exact=True).click()
            page.locator("#leaderboard-table thead th").filter(has_text="mce ↓").first.wait_for(timeout=15_000)
            headers = table_headers(page)
            assert "mce ↓" in headers and "brier ↓" not in headers and headers[:2] == ["rank", "model"]
            assert [row["mce ↓"] for row in table_rows(page)][2:] == ["0.378", "0.441", "0.294", "0.294"]  # 2.1 ece; the last copies paligemma's

            page.get_by_role("tab", name="Submit").click()
            submit = page.locator("#submit-text")
            submit.get_by_text("vrp-eval push runs/my-model/results.json", exact=False).first.wait_for(timeout=15_000)
            assert f"vrp-eval push runs/my-model/results.json --repo {REPO} --dry-run" in submit.inner_text()
            assert f"vrp-eval push runs/my-model/results.json --repo {REPO}\n" in submit.inner_text() + "\n"
            page.get_by_role("tab", name="About").click()
            about = page.locator("#about-text")
            about.get_by_text("Why not ECE alone", exact=False).wait_for(timeout=15_000)
            assert "always wrong" in about.inner_text()

            page.get_by_role("tab", name="Model detail").click()
            page.get_by_label("model · task · dtype · revision").click()
            page.get_by_role("option", name=f"{MODELS[0]} · {TASK}").click()
            page.locator("#model-summary").get_by_text("16-24").wait_for(timeout=15_000)
            page.screenshot(path=str(artifacts / "leaderboard-detail.png"), full_page=True)
        assert (artifacts / "leaderboard.png").stat().st_size > 10_000


PIXEL = "http://10.255.255.1/pixel.png"  # a non-routable address: nothing may ever ask for it
HOSTILE_MODELS = [f"<img src={PIXEL}>", "<script>alert(1)</script>", f"![pixel]({PIXEL}) www.example.com"]
HOSTILE_TASK = f"vrp_<img src={PIXEL}>"
HOSTILE_FILE = "<img src=pixel.png>.json"


def test_hostile_names_show_as_text_and_no_request_leaves_the_page(monkeypatch, tmp_path):
    """Names from results files reach the visitor as text; the page asks nothing of any other host."""
    app = load_app(monkeypatch)
    for i, (obj, name) in enumerate(zip(sample_results(), HOSTILE_MODELS)):
        obj = to_jsonable(obj)
        obj["config"].update(model_name=name, dataset=f"![data]({PIXEL})", model_sha=f"x` <img src={PIXEL}> `y")
        if i == 0:
            obj["config"]["model_family"] = f"<b>family</b><img src={PIXEL}>"
            obj["results"] = {HOSTILE_TASK: obj["results"][TASK]}
            obj["details"] = {HOSTILE_TASK: obj["details"][TASK]}
        (tmp_path / f"m{i}.json").write_text(json.dumps(obj))
    (tmp_path / HOSTILE_FILE).write_text(json.dumps({"schema": f"<img src={PIXEL}>"}))
    demo = app.build_demo(tmp_path)

    requests: list[str] = []
    dialogs: list[str] = []
    with served(demo) as url, chromium_page() as page:
        page.on("request", lambda request: requests.append(request.url))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        # a safety net only: the assertion below is on what the page *asked* for
        page.route("**/*", lambda route: route.continue_() if urlsplit(route.request.url).hostname in LOCAL_HOSTS
                   else route.abort())
        page.goto(url, wait_until="domcontentloaded", timeout=30_000)
        table = page.locator("#leaderboard-table")
        for name in HOSTILE_MODELS:
            table.get_by_text(name, exact=True).filter(visible=True).first.wait_for(timeout=30_000)
        assert table.locator("img, script, b").count() == 0
        page.locator("#column-picker").get_by_label("model_family", exact=True).click()  # not shown by default
        table.locator("thead th").filter(has_text="model_family").first.wait_for(timeout=15_000)
        table.get_by_text(HOSTILE_MODELS[0], exact=True).filter(visible=True).first.wait_for(timeout=30_000)
        assert table.locator("img, script, b").count() == 0
        assert "family</b>" in table.inner_text() and HOSTILE_TASK in table.inner_text()
        assert page.get_by_role("checkbox", name=HOSTILE_TASK, exact=True).count() == 1  # the task filter
        note = page.locator("#skipped-note")
        assert HOSTILE_FILE in note.inner_text() and f"<img src={PIXEL}>" in note.inner_text()
        assert note.locator("img").count() == 0

        page.get_by_role("tab", name="Model detail").click()
        for name in HOSTILE_MODELS:
            page.get_by_label("model · task · dtype · revision").click()
            page.get_by_role("option", name=name).click()
            summary = page.locator("#model-summary")
            summary.get_by_text(f"{name} on", exact=False).wait_for(timeout=15_000)
            text = summary.inner_text()
            assert f"x` <img src={PIXEL}> `y" in text and f"![data]({PIXEL})" in text
            assert summary.locator("img, script, a").count() == 0
        page.get_by_role("tab", name="ECE vs causal drop").click()
        points = page.locator("#ece-vs-drop g.mark-symbol path")  # the scatter's points and legend symbols
        points.first.wait_for(timeout=15_000)
        tooltips = []
        for i in range(points.count()):
            points.nth(i).hover(force=True)
            tooltip = page.locator("#vg-tooltip-element")
            if tooltip.count() and tooltip.is_visible():
                tooltips.append(tooltip.inner_text())
                assert tooltip.locator("img, script").count() == 0
        assert any(name in text for text in tooltips for name in HOSTILE_MODELS), tooltips
        page.wait_for_load_state("networkidle")
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "test-artifacts" / "leaderboard-hostile.png"), full_page=True)

    assert requests and not dialogs
    assert [u for u in requests if urlsplit(u).hostname not in LOCAL_HOSTS] == []
