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
from sample_results import TASK, sample_results

from vrp_eval.hub import push_results
from vrp_eval.results import to_jsonable, write_results

ROOT = Path(__file__).resolve().parents[1]
REPO = "vrp-org/vrp-results"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODELS = ["llava-hf/llava-1.5-7b-hf", "google/paligemma-3b-mix-224", "Qwen/Qwen2-VL-7B-Instruct"]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


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


@pytest.fixture
def hub_with_results(fake_hub, tmp_path):
    """The three sample models pushed to the fake Hub, plus a foreign JSON file and a broken one."""
    from huggingface_hub import HfApi

    for obj in sample_results():
        push_results(obj, REPO, token=fake_hub.token, endpoint=fake_hub.url)
    api = HfApi(endpoint=fake_hub.url, token=fake_hub.token)
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
    assert list(frame["ece"]) == [0.14, 0.18, 0.21]  # sorted best (lowest ECE) first
    assert list(frame["circuit_layers"]) == ["12-18", "20-28", "16-24"]
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
        table = client.predict([TASK], ["llava", "paligemma", "qwen2vl"], ["1-4B", "4-10B"], api_name="/filter")
        models = [row[table["headers"].index("model")] for row in table["data"]]
        assert [cell_text(m) for m in models] == [MODELS[1], MODELS[2], MODELS[0]]
        assert models[0] == (f'<a href="https://huggingface.co/{MODELS[1]}" target="_blank" '
                             f'rel="noopener noreferrer">{MODELS[1]}</a>')
        only_small = client.predict([TASK], ["llava", "paligemma", "qwen2vl"], ["1-4B"], api_name="/filter")
        assert len(only_small["data"]) == 1
        summary, *_ = client.predict(f"{MODELS[0]} · {TASK} · bfloat16 · "
                                     + sample_results()[0]["config"]["model_sha"][:7], api_name="/detail")
        assert "circuit layers **16-24**" in summary

        artifacts = ROOT / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        with chromium_page() as page:
            page.goto(url, wait_until="domcontentloaded", timeout=30_000)
            table_el = page.locator("#leaderboard-table")
            for model in MODELS:
                # Gradio keeps a hidden copy of each cell for measuring; wait for the visible one.
                table_el.get_by_text(model, exact=True).filter(visible=True).first.wait_for(timeout=30_000)
            note = page.locator("#skipped-note")
            assert "Skipped 2 file(s)" in note.inner_text()
            assert "other/model/lmms.json" in note.inner_text() and "broken/model/results_x.json" in note.inner_text()
            page.screenshot(path=str(artifacts / "leaderboard.png"), full_page=True)

            page.get_by_role("tab", name="Model detail").click()
            page.get_by_label("model · task · dtype · revision").click()
            page.get_by_role("option", name=f"{MODELS[0]} ·").click()
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
