"""Start-up: settings and flags, readiness, bad checkpoints, the real command line, devices."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.__main__ import build_settings, main, parse_args
from app.errors import StartupError
from app.main import create_app
from app.settings import Settings
from model_store import checkpoint
from model_store.network import ModelConfig, WordRNN
from tests.app_helpers import parse_sse, settings_for
from tests.conftest import MakeRun, commit_non_finite_weights

REPO = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("WORDRNN_"):
            monkeypatch.delenv(name)


def corrupt_weights(run_dir: Path) -> Path:
    weights = run_dir / checkpoint.read_manifest(run_dir)["weights"]
    weights.write_bytes(weights.read_bytes()[:-7])
    return weights


def mismatched_run(run_dir: Path, make_run: MakeRun) -> Path:
    """A run whose files all match the manifest but whose weights do not fit its config."""
    loaded = checkpoint.load(make_run(), "cpu")
    other = WordRNN(ModelConfig(vocab_size=loaded.config.vocab_size, hidden_dim=16, embed_dim=8))
    checkpoint.commit(
        run_dir,
        config=loaded.config,
        training={},
        vocab=loaded.vocab,
        weights=checkpoint.weights_state(other),
        iteration=1,
    )
    return run_dir


# -- settings and flags ---------------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
def test_settings_come_from_wordrnn_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORDRNN_MODEL_DIR", "/srv/run")
    monkeypatch.setenv("WORDRNN_DEVICE", "CUDA:1")
    monkeypatch.setenv("WORDRNN_PORT", "9000")
    monkeypatch.setenv("WORDRNN_ROOT_PATH", "/textgen/")
    monkeypatch.setenv("WORDRNN_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("WORDRNN_API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("WORDRNN_MAX_WORDS", "50")
    settings = Settings()  # type: ignore[call-arg]
    assert settings.model_dir == Path("/srv/run")
    assert settings.device == "cuda:1"
    assert settings.port == 9000
    assert settings.root_path == "/textgen"
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]
    assert "k1" not in repr(settings)
    assert settings.max_words == 50


@pytest.mark.usefixtures("clean_env")
def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORDRNN_MODEL_DIR", "/srv/env-run")
    monkeypatch.setenv("WORDRNN_PORT", "9000")
    monkeypatch.setenv("WORDRNN_DEVICE", "cpu")
    args = parse_args(["--model-dir", "/srv/flag-run", "--port", "1234", "--host", "0.0.0.0"])
    settings = build_settings(args)
    assert settings.model_dir == Path("/srv/flag-run")
    assert settings.port == 1234
    assert settings.host == "0.0.0.0"
    assert settings.device == "cpu"  # no flag: the environment's


@pytest.mark.parametrize(
    "values",
    [{"port": 70000}, {"root_path": "textgen"}, {"max_words": 0}, {"session_ttl_seconds": 0}],
)
def test_bad_settings_are_refused(tmp_path: Path, values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Settings(model_dir=tmp_path, **values)


@pytest.mark.usefixtures("clean_env")
def test_the_command_line_refuses_bad_settings_with_status_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--model-dir", "/srv/run", "--port", "70000"]) == 2
    assert main(["--port", "8000"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: setting port (--port or WORDRNN_PORT): ")
    assert err[1].startswith("error: setting model_dir (--model-dir or WORDRNN_MODEL_DIR): ")


# -- readiness ------------------------------------------------------------------------------


def test_readyz_is_503_until_the_model_is_loaded_and_after_it_stops(tiny_run: Path) -> None:
    app = create_app(settings_for(tiny_run))
    client = TestClient(app)  # no lifespan yet: nothing is loaded
    assert client.get("/healthz").status_code == 200
    before = client.get("/readyz")
    assert before.status_code == 503
    assert "not ready (loading)" in before.json()["detail"]
    generate = client.post("/generate", json={})
    assert generate.status_code == 503
    assert generate.headers["retry-after"] == "2"
    with TestClient(app) as running:
        ready = running.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "model": running.get("/info").json()["model"]}
    after = client.get("/readyz")
    assert after.status_code == 503
    assert "stopping" in after.json()["detail"]


# -- bad checkpoints ------------------------------------------------------------------------


def test_a_corrupt_checkpoint_stops_the_command_with_one_line_naming_the_file(
    make_run: MakeRun,
) -> None:
    weights = corrupt_weights(make_run())
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORDRNN_")}
    done = subprocess.run(
        [sys.executable, "-m", "app", "--model-dir", str(weights.parent), "--port", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert str(weights) in last
    assert "corrupt" in last
    assert "Traceback" not in done.stderr
    assert "Uvicorn running" not in done.stderr


@pytest.mark.parametrize("problem", ["missing", "corrupt", "mismatched", "diverged", "not-a-run"])
def test_a_bad_checkpoint_fails_the_lifespan_naming_the_file(
    tmp_path: Path, make_run: MakeRun, problem: str
) -> None:
    if problem == "missing":
        run_dir, named = tmp_path / "nowhere", tmp_path / "nowhere"
    elif problem == "corrupt":
        named = corrupt_weights(make_run())
        run_dir = named.parent
    elif problem == "mismatched":
        run_dir = mismatched_run(tmp_path / "mismatched", make_run)
        named = run_dir / checkpoint.read_manifest(run_dir)["weights"]
    elif problem == "diverged":  # NaN weights: every sample would be garbage
        named = commit_non_finite_weights(make_run())
        run_dir = named.parent
    else:
        run_dir, named = tmp_path, tmp_path / "manifest.json"
    with pytest.raises(StartupError) as caught, TestClient(create_app(settings_for(run_dir))):
        pytest.fail("the app started")
    message = str(caught.value)
    assert message.startswith(f"{named}: ")
    assert "\n" not in message


def test_a_device_this_machine_lacks_fails_the_lifespan(tiny_run: Path) -> None:
    app = create_app(settings_for(tiny_run, device="cuda:7"))
    with pytest.raises(StartupError, match=r"device 'cuda:7'"), TestClient(app):
        pytest.fail("the app started")


def test_under_uvicorn_factory_a_start_up_failure_is_reported_as_one_line(
    make_run: MakeRun,
) -> None:
    weights = corrupt_weights(make_run())
    app = create_app(settings_for(weights.parent))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def start() -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        with pytest.raises(StartupError):
            await app(scope, receive, send)

    asyncio.run(start())
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert sent[0]["message"] == f"cannot start: {weights}: " + sent[0]["message"].split(": ", 2)[2]
    assert "\n" not in sent[0]["message"]
    assert "corrupt" in sent[0]["message"]


# -- the real command line --------------------------------------------------------------------


class Server:
    """``python -m app`` in a subprocess; stderr read by a thread so nothing blocks on it."""

    def __init__(self, *args: str, **env_vars: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WORDRNN_")}
        env.update(env_vars)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app", "--port", "0", *args],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        assert self.process.stderr is not None
        stderr = self.process.stderr
        threading.Thread(
            target=lambda: [self.lines.put(line) for line in stderr], daemon=True
        ).start()

    def wait_for_line(self, pattern: str, timeout: float = 90) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.log.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(self.log)}")


@pytest.fixture
def server(tiny_run: Path) -> Iterator[Server]:
    server = Server(
        *("--model-dir", str(tiny_run), "--device", "cpu", "--root-path", "/textgen"),
        WORDRNN_MAX_WORDS="1000000",  # time to stop the server in the middle of a stream
    )
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=30)


def test_the_command_line_serves_streams_and_stops_cleanly(server: Server) -> None:
    port = server.wait_for_line(r"Uvicorn running on http://127\.0\.0\.1:(\d+)").group(1)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        deadline = time.monotonic() + 30
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "never became ready"
        assert http.get("/textgen/healthz").status_code == 200  # a proxy that keeps the prefix
        assert "/textgen/openapi.json" in http.get("/docs").text
        body = {"seed_words": "I can", "max_words": 8, "random_seed": 3}
        plain = http.post("/generate", json=body).json()
        with http.stream("POST", "/generate", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["x-accel-buffering"] == "no"
            raw = b"".join(response.iter_raw()).decode()
        assert "\r" not in raw
        events = parse_sse(raw)
        assert [name for name, _ in events] == ["word"] * 8 + ["done"]
        assert events[-1][1] == plain
        # Stop the server in the middle of a long stream: it ends with an error event.
        with http.stream(
            "POST", "/generate", json={"max_words": 1_000_000, "stream": True}
        ) as long:
            chunks = long.iter_text()
            first = next(chunks)
            assert "event: word" in first
            server.process.send_signal(signal.SIGTERM)
            events = parse_sse(first + "".join(chunks))
    assert {name for name, _ in events[:-1]} == {"word"}
    last_name, last_data = events[-1]
    assert last_name == "error"
    assert "stopping" in last_data["detail"]
    assert server.process.wait(timeout=60) == 0
    server.wait_for_line(r"stopped")


# -- devices --------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_auto_picks_the_cpu_without_cuda(tiny_run: Path) -> None:
    with TestClient(create_app(settings_for(tiny_run, device="auto"))) as client:
        assert client.get("/info").json()["device"] == "cpu"


@pytest.mark.gpu
@needs_cuda
def test_auto_picks_cuda_and_generates_what_the_cpu_does(tiny_run: Path) -> None:
    body = {"seed_words": "I can", "max_words": 20, "temperature": 0}
    sampled = {"seed_words": "the sea", "max_words": 20, "random_seed": 9, "n": 3}
    with TestClient(create_app(settings_for(tiny_run))) as cpu:
        expected, expected_sampled = (cpu.post("/generate", json=b).json() for b in (body, sampled))
    with TestClient(create_app(settings_for(tiny_run, device="auto"))) as gpu:
        assert gpu.get("/info").json()["device"].startswith("cuda")
        assert gpu.post("/generate", json=body).json()["words"] == expected["words"]
        assert gpu.post("/generate", json=sampled).json()["samples"] == expected_sampled["samples"]


@pytest.mark.gpu
@needs_cuda
def test_sessions_on_cuda_keep_their_state_on_the_cpu(tiny_run: Path) -> None:
    with TestClient(create_app(settings_for(tiny_run, device="cuda"))) as client:
        whole = client.post(
            "/generate", json={"seed_words": "I can", "max_words": 12, "temperature": 0}
        ).json()
        session = client.post("/sessions", json={"seed_words": "I can"}).json()["session_id"]
        words = []
        for _ in range(3):
            out = client.post(
                "/generate", json={"session_id": session, "max_words": 4, "temperature": 0}
            )
            words += out.json()["words"]
        stored = asyncio.run(client.app.state.models.default.service.sessions.get(session))  # type: ignore[attr-defined]
    assert words == whole["words"]
    assert stored.hidden.device.type == "cpu"
    assert json.dumps(whole)  # the response is plain JSON, with no tensors in it
