"""``/docs`` and ``/redoc`` without internet: their files come from the app, under the proxy's
sub-path too, with a policy that allows no other origin; and in a real browser with every
request outside the server blocked, both show the operations."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.routes.apidocs import FILES
from tests.app_helpers import settings_for
from tests.live_server import run_app
from tests.test_playground import CHROMIUM, CHROMIUM_ARGS

ALLOWED_SOURCES = {"'self'", "'none'", "'unsafe-inline'", "data:", "blob:"}


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    app = create_app(settings_for(tiny_run, root_path="/textgen"))
    with TestClient(app, root_path="/textgen") as client:
        yield client


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_pages_load_only_the_apps_own_files(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    nonce = re.search(r"'nonce-([\w-]+)'", policy)
    assert nonce is not None
    sources = {s for d in policy.split(";") for s in d.split()[1:]} - {f"'nonce-{nonce[1]}'"}
    assert sources <= ALLOWED_SOURCES, policy
    urls = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert urls
    assert all(url.startswith("/textgen/") for url in urls), urls  # the sub-path kept
    assert "/textgen/openapi.json" in response.text
    inline = re.findall(r"<script(?![^>]*\bsrc=)([^>]*)>", response.text)
    assert inline or page == "/redoc"  # ReDoc's page has no inline script
    assert all(f'nonce="{nonce[1]}"' in attributes for attributes in inline)


def test_the_files_are_served_from_a_fixed_list(client: TestClient) -> None:
    for name, media_type in FILES.items():
        response = client.get(f"/docs-assets/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"] == media_type
        assert len(response.content) > 10_000
    assert client.get("/docs-assets/missing.js").status_code == 404
    assert client.get("/docs-assets/..%2F__init__.py").status_code == 404


@pytest.fixture(scope="module")
def served(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("apidocs") / "app.log"
    with run_app(tiny_run, log, "--root-path", "/textgen") as app:
        yield f"{app.url}/textgen"


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Chromium is not installed (apt-get install chromium; .ci/run installs it)",
)
def test_the_pages_show_the_operations_with_the_internet_blocked(served: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    origin = served.removesuffix("/textgen")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            outside: list[str] = []
            console: list[str] = []

            def only_the_server(route: Any) -> None:
                if route.request.url.startswith(origin + "/"):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", only_the_server)
            page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: console.append(f"page error: {error}"))

            page.goto(f"{served}/docs")
            expect(page.locator(".opblock-summary-path", has_text="/generate").first).to_be_visible(
                timeout=20_000
            )
            expect(
                page.locator(".opblock-summary-path", has_text="/v1/completions")
            ).to_be_visible()

            page.goto(f"{served}/redoc")
            heading = page.locator("h2", has_text="Generate text")
            expect(heading).to_be_visible(timeout=20_000)
        finally:
            browser.close()
    assert outside == []
    # ReDoc's bundle shows its maker's logo from its CDN: the policy blocks that one image.
    blocked = [m for m in console if "violates the following Content Security Policy" in m]
    assert all("cdn.redoc.ly" in m and "img-src" in m for m in blocked), blocked
    assert [m for m in console if m not in blocked] == []
