"""The README's client examples, run as written against a real server.

Every ``curl`` command of a ``sh`` block that calls ``localhost:8000``, and every ``python``
block that does, is run against ``python -m app`` (its port put in place of 8000): curl with
bash, the Python blocks (the ``openai`` SDK examples) with this interpreter. A command passes
when it exits with status 0 and prints no error body. The server serves a models folder with
the README's models, ``default`` (the default) and ``lyrics``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import build_run
from tests.live_server import REPO, App, run_app

README = REPO / "README.md"
ADDRESS = "localhost:8000"


def blocks(language: str) -> list[str]:
    text = README.read_text() if README.exists() else ""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def curl_commands() -> list[str]:
    commands = []
    for block in blocks("sh"):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            if command.startswith("curl ") and ADDRESS in command:
                commands.append(command)
    return commands


def python_examples() -> list[str]:
    return [block for block in blocks("python") if ADDRESS in block]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    root = tmp_path_factory.mktemp("readme")
    for seed, name in enumerate(("default", "lyrics")):
        build_run(root / "models" / name, seed=seed)
    with run_app(root / "models", root / "app.log", source="--models-dir") as app:
        yield app


def check(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.strip(), "nothing printed"
    for error in ('"detail"', '"error"', "event: error"):
        assert error not in done.stdout, done.stdout[-2000:]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("command", curl_commands())
def test_a_readme_curl_command_works(server: App, command: str) -> None:
    local = command.replace(ADDRESS, f"127.0.0.1:{server.port}")
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", local],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    check(done)


@pytest.mark.parametrize("example", python_examples())
def test_a_readme_python_example_works(server: App, example: str) -> None:
    local = example.replace(ADDRESS, f"127.0.0.1:{server.port}")
    done = subprocess.run(
        [sys.executable, "-c", local],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    check(done)
