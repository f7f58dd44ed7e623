"""Real processes for the tests that need them: ``python -m app``, nginx and Redis, on loopback.

Each waits for readiness by polling (never a fixed sleep) within a deadline, and is stopped
by the test that started it, through a context manager. Ports: the app listens on port 0 and
reports the port it got in its log; nginx and Redis cannot, so each gets a port that was free
a moment before, and is started again on another one if that port was taken meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 60) -> T:
    """Poll ``check`` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)  # a polling interval, not a synchronisation
        delay = min(delay * 2, 0.2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class App:
    """``python -m app`` serving ``run_dir``; its log (stderr) goes to ``log_path``."""

    def __init__(self, process: subprocess.Popen[bytes], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def json_log(self) -> list[dict[str, Any]]:
        """The log's JSON lines (with ``--log-format json``), parsed."""
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def _started(self) -> int | None:
        if self.process.poll() is not None:
            raise AssertionError(f"the app exited with {self.process.returncode}:\n{self.log()}")
        match = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", self.log())
        return int(match.group(1)) if match else None


@contextmanager
def run_app(
    run_dir: Path,
    log_path: Path,
    *args: str,
    launcher: Sequence[str] = ("-m", "app"),
    source: str = "--model-dir",
    **env_vars: str,
) -> Iterator[App]:
    """Start the app on a free port, wait until ``/readyz`` answers 200, stop it afterwards.

    ``launcher`` is what runs the app after the Python executable: a test may give
    ``("-c", CODE)`` for code that changes the app, then calls ``app.__main__.main``.
    ``source="--models-dir"`` serves every run folder in ``run_dir`` instead of one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORDRNN_")}
    # One torch thread, as in the test process: the test processes share few cores.
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_vars)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, *launcher, source, str(run_dir), "--device", "cpu"),
                *("--host", "127.0.0.1", "--port", "0", *args),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    app = App(process, log_path)
    try:
        app.port = wait_for(app._started, "the app to listen", timeout=90)

        def ready() -> bool:
            try:
                return httpx.get(f"{app.url}/readyz", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, "/readyz to answer 200")
        yield app
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


# -- nginx ------------------------------------------------------------------------------------


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


class Nginx:
    def __init__(self, port: int, prefix: Path) -> None:
        self.port = port
        self.prefix = prefix

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log(self) -> str:
        path = self.prefix / "logs" / "access.log"
        return path.read_text() if path.exists() else ""


def deploy_site(name: str, replacements: dict[str, str]) -> Callable[[int], str]:
    """The nginx site ``deploy/<name>`` with the test's addresses, as ``run_nginx`` takes it.

    Each key of ``replacements`` must be in the file (a renamed directive fails here, not as a
    confusing nginx error); the site then listens on the loopback port ``run_nginx`` gives it.
    """
    text = (REPO / "deploy" / name).read_text()
    for old, new in replacements.items():
        assert old in text, f"{old!r} is not in deploy/{name}"
        text = text.replace(old, new)
    assert "listen 80;" in text, f"deploy/{name} no longer listens on port 80"
    return lambda port: text.replace("listen 80;", f"listen 127.0.0.1:{port};")


def replicas_site(ports: Sequence[int], access_log: Path) -> Callable[[int], str]:
    """``deploy/nginx.replicas.conf`` with one upstream server a replica listening on ``ports``
    (instead of every address Docker's DNS gives for ``app``), logging to ``access_log``."""
    text = (REPO / "deploy" / "nginx.replicas.conf").read_text()
    line = re.search(r"^ *server app:8000 resolve([^;]*);$", text, re.M)
    assert line, "deploy/nginx.replicas.conf has no `server app:8000 resolve ...;` line"
    servers = "\n".join(f"    server 127.0.0.1:{port}{line.group(1)};" for port in ports)
    replacements = {line.group(0): servers, "/var/log/nginx/access.log": str(access_log)}
    return deploy_site("nginx.replicas.conf", replacements)


def nginx_main_config(prefix: Path, site: Path, connections: int = 64, workers: str = "1") -> str:
    """An nginx.conf for a test: pid, logs and temporary files under ``prefix``; ``site`` is
    included in ``http`` as the official image includes ``conf.d/*.conf``; ``connections``
    per worker and ``workers`` (a flood needs more than a test: the official image runs
    ``auto``, a worker a core)."""
    temp = "\n".join(
        f"    {name}_temp_path {prefix / 'tmp' / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes {workers};
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} info;
events {{ worker_connections {connections}; }}
http {{
    access_log {prefix / "logs" / "access.log"};
{temp}
    include {site};
}}
"""


@contextmanager
def run_nginx(
    site_text: Callable[[int], str], prefix: Path, connections: int = 64, workers: str = "1"
) -> Iterator[Nginx]:
    """nginx with the site ``site_text(port)`` on a free loopback port; stopped afterwards."""
    binary = nginx_binary()
    assert binary, "nginx is not installed"
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    for _attempt in range(5):
        port = free_port()
        site = prefix / "site.conf"
        site.write_text(site_text(port))
        config.write_text(nginx_main_config(prefix, site, connections, workers))
        started = subprocess.run(
            [binary, "-c", str(config), "-p", f"{prefix}/"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if started.returncode == 0:
            break
        if "Address already in use" not in started.stderr:
            raise AssertionError(f"nginx did not start:\n{started.stderr}")
    else:
        raise AssertionError("no free port for nginx after 5 tries")
    nginx = Nginx(port, prefix)
    try:

        def listening() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(listening, "nginx to listen", timeout=30)
        yield nginx
    finally:
        subprocess.run(
            [binary, "-s", "quit", "-c", str(config), "-p", f"{prefix}/"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        pid_file = prefix / "nginx.pid"
        wait_for(lambda: not pid_file.exists(), "nginx to stop", timeout=30)


# -- Redis ------------------------------------------------------------------------------------


def _redis_answers(server: subprocess.Popen[bytes], port: int) -> str | None:
    """``up`` once the server answers PING, ``exited`` if it stopped (its port was taken)."""
    if server.poll() is not None:
        return "exited"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return "up" if conn.recv(16).startswith(b"+PONG") else None
    except OSError:
        return None


@contextmanager
def run_redis(workdir: Path) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port, saving nothing; yields its URL."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "redis.log"
    for _attempt in range(5):
        port = free_port()
        with log_path.open("wb") as log:
            server = subprocess.Popen(
                [
                    *(binary, "--port", str(port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        state = wait_for(partial(_redis_answers, server, port), "redis-server to answer PING")
        if state == "up":
            break
        if "Address already in use" not in log_path.read_text(errors="replace"):
            raise AssertionError(f"redis-server did not start:\n{log_path.read_text()}")
    else:
        raise AssertionError("no free port for redis-server after 5 tries")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(server)
