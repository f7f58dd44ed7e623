"""The serving benchmarks' shared parts: the model they serve and a real server to drive.

`model_dir` finds the run to serve: ``--run-dir`` (alias ``--model-dir``) when given, else
``runs/default`` (what ``make serve`` trains) when it holds a run, else the built-in default
model, trained once with ``make serve``'s preset (``python -m training --corpus
builtin:shakespeare --preset subword``) for ``--train-minutes`` into ``--cache-dir`` and reused
next time; ``--model small`` trains the lab's tanh RNN 64 on two plays instead (one minute);
`add_model_args` adds those flags.

`Server` is the real thing: ``python -m app`` in a subprocess on a free loopback port, its log
in a file, ``WORDRNN_*`` settings from the caller only (none inherited); it reads the server's
memory from ``/proc`` and stops it with SIGTERM, as an orchestrator would.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from model_store import checkpoint
from training.config import SERVE_PRESET, TrainConfig
from training.config import preset as preset_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "runs" / "default"  # what ``make serve`` trains
CACHE = Path.home() / ".cache" / "wordrnn"
# The models the serving benchmarks can train for themselves: make serve's, and a small one
# (the lab's tanh RNN 64 on two plays, 36,000 words) on which a request's HTTP costs weigh
# most. Name -> preset, minutes, corpus.
MODELS = {
    "default": (SERVE_PRESET, 5.0, ["builtin:shakespeare"]),
    "small": ("lab", 1.0, ["builtin:shakespeare/macbeth", "builtin:shakespeare/julius-caesar"]),
}
ACTIVE_ROWS = "wordrnn_engine_active_rows"
PENDING_JOBS = "wordrnn_engine_pending_jobs"


class BenchError(Exception):
    """Something the benchmark needs is missing or broke; the message says what."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        "--model-dir",
        dest="run_dir",
        type=Path,
        default=None,
        help="the run folder to serve (default: runs/default, or without a run there the "
        "built-in --model, trained once into --cache-dir)",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="default",
        help="without --run-dir: default (make serve's preset; runs/default when it holds a "
        "run) or small (the lab's tanh RNN 64)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where --model is trained once (default: {CACHE}/bench-PRESET)",
    )
    minutes = ", ".join(f"{minutes:g} ({name})" for name, (_, minutes, _) in MODELS.items())
    parser.add_argument("--train-minutes", type=float, default=None, help=f"default: {minutes}")


def add_torch_threads_arg(parser: argparse.ArgumentParser, default: int | None) -> None:
    why = "the server's own" if default is None else f"{default}: its clients share the cores"
    help_text = f"WORDRNN_TORCH_THREADS for the server (default {why})"
    parser.add_argument("--torch-threads", type=int, default=default, help=help_text)


def find_hey() -> str | None:
    """Where Debian's ``hey`` load generator is; None, after saying so on stderr, when it is
    missing (on two cores a Python client saturates long before the server does)."""
    hey = shutil.which("hey")
    if hey is None:
        print(
            "error: this benchmark needs the `hey` load generator on PATH (Debian/Ubuntu: "
            "apt-get install hey); a Python client would saturate before the server does",
            file=sys.stderr,
        )
    return hey


def model_dir(args: argparse.Namespace) -> Path:
    """``--run-dir``, which must hold a run; without it, for the default ``--model``,
    ``runs/default`` when it holds one; else ``--model``, trained once into the cache."""
    if args.run_dir is not None:
        if not (args.run_dir / "manifest.json").is_file():
            raise BenchError(f"{args.run_dir} holds no run (no manifest.json)")
        return Path(args.run_dir)
    if args.model == "default" and (DEFAULT_RUN / "manifest.json").is_file():
        return DEFAULT_RUN
    preset, minutes, corpus = MODELS[args.model]
    minutes = args.train_minutes if args.train_minutes is not None else minutes
    cached = Path(args.cache_dir) if args.cache_dir is not None else CACHE / f"bench-{preset}"
    if (cached / "manifest.json").is_file():
        if _trained_as(cached, preset):
            return cached
        print(f"{cached} was trained with other {preset} settings: training again", file=sys.stderr)
        shutil.rmtree(cached)
    print(
        f"training the {args.model} model ({preset} preset) for {minutes:g} minutes into {cached}",
        file=sys.stderr,
    )
    command = [
        sys.executable, "-m", "training", "--corpus", *corpus, "--out", str(cached),
        "--preset", preset, "--max-minutes", str(minutes), "--quiet",
    ]  # fmt: skip
    if subprocess.run(command, cwd=REPO, check=False).returncode != 0:
        raise BenchError(f"training the {args.model} model failed (see above)")
    return cached


def _trained_as(run_dir: Path, name: str) -> bool:
    """Whether ``run_dir`` was trained with the preset ``name`` as it is now (its time budget
    aside): a preset that changed since would otherwise be measured with its old model."""
    _, training, _, _ = checkpoint.read_header(run_dir)
    stored = TrainConfig.from_json(training).with_overrides(max_minutes=None)
    return stored == preset_config(name).with_overrides(max_minutes=None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """``python -m app`` serving ``run_dir`` on a free port with ``args`` and ``env`` added;
    its log (at ``log_level``: the access log is at info) goes to ``logdir/server-NAME.log``."""

    def __init__(
        self,
        run_dir: Path,
        name: str,
        logdir: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        log_level: str = "warning",
        device: str = "cpu",
        module: str = "app",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / f"server-{name}.log"
        command = [
            sys.executable, "-m", "app", "--model-dir", str(run_dir), "--port", str(self.port),
            "--device", device, "--log-level", log_level, *args,
        ]  # fmt: skip
        if module != "app":  # another server (bench/floor.py): only the port
            command = [sys.executable, "-m", module, "--port", str(self.port)]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("WORDRNN_")}
        environ.update(env or {})
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 120) -> None:
        """Poll ``/readyz`` until it answers 200 (the model is loaded and warmed up)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise BenchError(f"the server exited:\n{self.log_tail()}")
                try:
                    if http.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)  # a polling interval
        raise BenchError(f"the server was not ready after {timeout:g} s:\n{self.log_tail()}")

    def wait_idle(self, timeout: float = 15) -> dict[str, float]:
        """Poll ``/metrics`` until the engine has no active rows and no pending jobs (or
        ``timeout`` passes); the last metrics read."""
        deadline = time.monotonic() + timeout
        last: dict[str, float] = {}
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    last = parse_metrics(http.get("/metrics").text)
                if last.get(ACTIVE_ROWS) == 0 and last.get(PENDING_JOBS) == 0:
                    break
                time.sleep(0.2)  # a polling interval
        return last

    def _status_mib(self, field: str) -> float | None:
        """A memory figure of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) in MiB."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return None

    def rss_mib(self) -> float | None:
        return self._status_mib("VmRSS")

    def peak_rss_mib(self) -> float | None:
        return self._status_mib("VmHWM")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit status (negative: a signal)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus' text format -> {name: value}, labels left out: for the service's own
    gauges, whose one series is labelled with the model (of a histogram, the last wins)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series.partition("{")[0]] = float(value)
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
