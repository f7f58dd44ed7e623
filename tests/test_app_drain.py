"""SIGTERM drains the real process: what is in flight finishes, nothing new gets in, exit 0.

The server is ``python -m app`` (``tests/live_server.py``) whose model steps wait while a
*hold* file exists (`serve_held`, run in the child process). The test holds its request
inside a model step, so the request is surely in flight when SIGTERM comes however slow the
machine is, and lets it go only once it has seen the server refuse new connections.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.live_server import run_app, wait_for

HOLD = "WORDRNN_TEST_HOLD_FILE"
LAUNCHER = ("-c", "from tests.test_app_drain import serve_held; serve_held()")
GRACE_SECONDS = 10


def serve_held() -> None:
    """``python -m app``, but each model step waits while the file ``$WORDRNN_TEST_HOLD_FILE``
    exists, touching ``<that file>.entered`` to say that a step is waiting."""
    from app import __main__ as cli
    from app.engine import batch

    hold = Path(os.environ[HOLD])
    entered = hold.with_suffix(".entered")
    step = batch.next_logits

    def held(model: Any, hidden: Any) -> Any:
        while hold.exists():
            entered.touch()
            time.sleep(0.005)  # the held model's own pace, inside the server
        return step(model, hidden)

    batch.next_logits = held
    sys.exit(cli.main(sys.argv[1:]))


def refused(url: str) -> bool:
    """Whether a new connection is refused (or answered 503, as while stopping). A connection
    that reached the listening socket's backlog just before it closed is reset by the kernel,
    unanswered: refused too."""
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 503
    except (httpx.ConnectError, httpx.ReadError):
        return True


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(
    tiny_run: Path, tmp_path: Path
) -> None:
    hold = tmp_path / "hold"
    body = {"seed_words": "I can see", "max_words": 20, "random_seed": 1}
    with (
        run_app(
            tiny_run,
            tmp_path / "app.log",
            launcher=LAUNCHER,
            WORDRNN_SHUTDOWN_TIMEOUT_SECONDS=str(GRACE_SECONDS),
            **{HOLD: str(hold)},
        ) as app,
        ThreadPoolExecutor(1) as pool,
    ):
        hold.touch()
        in_flight = pool.submit(httpx.post, f"{app.url}/generate", json=body, timeout=60)
        wait_for(hold.with_suffix(".entered").exists, "the request to reach the model")
        app.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: refused(app.url), "the server to refuse new connections")
        try:
            httpx.post(f"{app.url}/generate", json=body, timeout=5)
        except httpx.ConnectError:
            pass
        else:
            raise AssertionError("a request was accepted after SIGTERM")
        assert app.process.poll() is None  # still draining
        hold.unlink()  # the held step goes on
        response = in_flight.result(timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["words"]) == 20
        assert app.process.wait(timeout=GRACE_SECONDS + 20) == 0
        assert time.monotonic() - signalled < GRACE_SECONDS
    assert "Traceback" not in app.log()
