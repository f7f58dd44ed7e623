"""The playground page: its files and headers, the wheel that ships them, and a real browser.

The browser test drives Debian's Chromium (``/usr/bin/chromium``) through Python's
``playwright``, against ``python -m app`` serving under the sub-path /textgen (the app takes
the prefix unstripped, as behind a proxy that keeps it), and leaves screenshots in its
temporary folder.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.routes.playground import FILES
from tests.app_helpers import settings_for
from tests.conftest import build_run
from tests.live_server import REPO, run_app

STATIC = REPO / "app" / "static"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_run))) as client:
        yield client


def test_the_page_and_its_files_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    for response in [page, *(client.get(f"/static/{name}") for name in FILES)]:
        assert response.status_code == 200
        assert response.headers["x-content-type-options"] == "nosniff"
        policy = response.headers["content-security-policy"]
        sources = {s for d in policy.split(";") for s in d.split()[1:]}
        assert sources <= {"'self'", "'none'"}, policy  # no other origin, nothing inline
        assert "default-src 'none'" in policy
    assert client.get("/static/missing.js").status_code == 404
    assert client.get("/static/..%2Fmain.py").status_code == 404


def test_the_page_loads_nothing_from_elsewhere_and_runs_nothing_inline() -> None:
    html = (STATIC / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "an inline script"
    assert not re.search(r"\sstyle=|\son[a-z]+=", html), "an inline style or handler"
    for path in STATIC.iterdir():
        text = path.read_text()
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a load
        assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", text, re.I), path.name
        assert not re.search(r"""(?:src|href)=["']/""", text), f"{path.name}: absolute URL"
    script = (STATIC / "playground.js").read_text()
    assert not re.search(r"""fetch\(\s*[`'"]/""", script), "fetch from an absolute path"


def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
        else:
            (source / name).write_text("")
    for package in ("app", "model_store", "training"):
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    )
    out = tmp_path / "dist"
    done = subprocess.run(
        [sys.executable, "-c", build, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = out / done.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ["index.html", *FILES]:
        assert f"app/static/{name}" in names


# -- in a browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("playground")
    # An LSTM of 512 units: 300 words take a visible time, so streaming can be seen.
    run = build_run(root / "run", cell="lstm", hidden_dim=512)
    with run_app(run, root / "app.log", "--root-path", "/textgen") as app:
        yield f"{app.url}/textgen/"


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Chromium is not installed (apt-get install chromium; .ci/run installs it)",
)
def test_the_playground_in_a_browser(served: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    words = 300
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 820})
            requests: list[Any] = []
            console: list[str] = []
            page.on("request", lambda request: requests.append(request))
            page.on("console", lambda message: console.append(message.text))
            page.on("pageerror", lambda error: console.append(f"page error: {error}"))
            page.goto(served)

            # The model card, from /info, under the sub-path; one model: no picker.
            expect(page.locator("#model-name")).to_have_text(re.compile(r"^run-[0-9a-f]{12}$"))
            expect(page.locator("#model-card")).to_contain_text("lstm")
            expect(page.locator("#model-choice")).to_be_hidden()

            page.fill("#seed", "I can see Zanzibar")
            page.fill("#top-k", "5")
            page.fill("#temperature", "0.9")
            page.fill("#max-words", str(words))
            page.fill("#random-seed", "42")
            # Record how many words the page shows at each change of the output, so that
            # "incremental" does not depend on how fast this machine generates.
            page.evaluate(
                """() => {
                    window.wordCounts = [];
                    new MutationObserver(() => window.wordCounts.push(
                        document.querySelectorAll('#output .word').length
                    )).observe(document.querySelector('#output'),
                               {childList: true, subtree: true});
                }"""
            )
            page.click("#generate")

            # Words appear while the model is still writing: the page showed several partial
            # texts before the whole one.
            expect(page.locator("#status")).to_contain_text("ended by", timeout=30_000)
            partial = {n for n in page.evaluate("window.wordCounts") if 0 < n < words}
            assert len(partial) >= 3, sorted(partial)
            assert page.locator("#output .word").count() == words
            expect(page.locator("#output mark.unknown")).to_have_text("Zanzibar")
            first_text = page.locator("#output").inner_text()
            assert first_text.startswith("I can see Zanzibar")

            # Continue: more words from the same session, after the text so far.
            page.fill("#max-words", "20")
            page.click("#continue")
            expect(page.locator("#output .word")).to_have_count(words + 20, timeout=30_000)
            expect(page.locator("#status")).to_contain_text("ended by")
            assert page.locator("#output").inner_text().startswith(first_text)
            bodies = [r.post_data_json for r in requests if r.url.endswith("/textgen/generate")]
            assert len(bodies) == 2
            assert bodies[0]["session_id"] == bodies[1]["session_id"]
            assert bodies[1]["max_words"] == 20
            assert bodies[1]["stream"] is True
            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)

            # A request the server refuses: its message is shown, the field is marked.
            page.fill("#top-k", "100000")
            page.click("#continue")
            error = page.locator("#error")
            expect(error).to_be_visible()
            expect(error).to_contain_text("top_k: at most")
            expect(page.locator("#top-k")).to_have_attribute("aria-invalid", "true")
            assert page.locator("#output .word").count() == words + 20  # the text is kept
            page.screenshot(path=str(tmp_path / "playground-error.png"), full_page=True)
        finally:
            browser.close()

    origin = served.split("/textgen/")[0]
    assert all(r.url.startswith(origin + "/textgen/") for r in requests), [r.url for r in requests]
    assert not [m for m in console if "Content Security Policy" in m or "page error" in m]
    assert (tmp_path / "playground.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def served_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("playground-models")
    build_run(root / "models" / "default", cell="gru", seed=1)
    build_run(root / "models" / "poems", cell="lstm", seed=2)
    with run_app(root / "models", root / "app.log", source="--models-dir") as app:
        yield f"{app.url}/"


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Chromium is not installed (apt-get install chromium; .ci/run installs it)",
)
def test_the_playground_picks_one_of_several_models(served_models: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            requests: list[Any] = []
            page.on("request", lambda request: requests.append(request))
            page.goto(served_models)
            expect(page.locator("#model-choice")).to_be_visible()
            expect(page.locator("#model option")).to_have_count(2)
            expect(page.locator("#model-card")).to_contain_text("gru")  # the default first

            page.select_option("#model", "poems")
            expect(page.locator("#model-card")).to_contain_text("lstm")
            page.fill("#max-words", "5")
            page.click("#generate")
            expect(page.locator("#status")).to_contain_text("ended by", timeout=30_000)
            expect(page.locator("#output .word")).to_have_count(5)
        finally:
            browser.close()
    posts = [r.post_data_json for r in requests if r.method == "POST"]
    assert [body["model"] for body in posts] == ["poems", "poems"]  # the session, its words
