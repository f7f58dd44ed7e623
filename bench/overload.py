"""Overload: far more clients than the server can take, and how it says no.

    python -m bench.overload                          # about a minute and a half
    python -m bench.overload --requests 5000          # quicker

Starts ``python -m app`` on loopback (``bench/server.py``: the built-in default model, or
``--model-dir``) with a small admission bound (``--max-pending``, default 8, as
``WORDRNN_MAX_PENDING``) and its JSON access log on (the status and the time in the server
of every request), then, all at once:

- the load: Debian's ``hey`` sends ``--requests`` ``POST /generate`` of 25 words from
  ``--concurrency`` (default 1000) kept-alive connections, split over hey processes of at
  most 500 workers (hey keeps no more connections alive); hey's CSV has every answer;
- a checker: ``--check-clients`` (default 16) async clients send the same request in a loop
  while the load lasts and read what hey cannot see, the headers: every 429/503 must carry a
  ``Retry-After`` of whole seconds;
- a probe: one more ``hey`` asks ``GET /healthz`` ``--probe-rate`` times a second on one
  connection: the event loop must keep answering it.

With ``--through-nginx`` all of it goes through ``deploy/nginx.conf`` (nginx on loopback, a
worker a core): its limits refuse most of the flood before the app, nginx's refusals are
timed in its access log, and /healthz is timed there too, whole and the app's part.

Before the load the same probe runs on the idle server, for comparison; after it the engine
must go back to idle and the server must stop with exit status 0 on SIGTERM.

A refusal is fast when the server answers it at once: its time in the server (the access
log) is what is checked. What a client waits for it on top of that is the queue of
requests in front of it, ``concurrency / requests a second`` (Little's law), so at 1000
connections on two cores it is seconds whatever the server does; it is reported too.

Checks; the exit status is 1 when one fails:

- every answer (hey's and the checker's) a 2xx, or a 429/503; every request answered;
- every 429/503 the checker got carries ``Retry-After``;
- the server was overloaded (some answers were refusals), and its refusals were fast: their
  p99 in the server at most ``--max-refusal-p99-ms``;
- ``/healthz`` answered 200 every time, its p99 during the load at most
  ``--max-healthz-p99-ms``;
- the engine idle after the load, and a clean exit.

Prints the figures and the checks, and writes ``--out`` (default
``bench/results/overload.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.server import (
    ACTIVE_ROWS,
    PENDING_JOBS,
    REPO,
    BenchError,
    Server,
    add_model_args,
    add_torch_threads_arg,
    find_hey,
    model_dir,
    ms,
    percentile,
)
from tests.live_server import Nginx, deploy_site, run_nginx

RESULTS = REPO / "bench" / "results" / "overload.json"
BODY = {"seed_words": "I can see", "max_words": 25}
REFUSALS = (429, 503)
HEY_POOL = 500  # idle connections hey keeps
IDLE_PROBES = 40
NGINX_PREFIX = "/textgen"  # the sub-path deploy/nginx.conf serves the app under
# deploy/nginx.conf's log line: "$request" $status $body_bytes_sent $request_time ... upstream_time=
NGINX_LINE = re.compile(r'"\w+ (\S+) [^"]*" (\d{3}) \d+ ([\d.]+) ".*upstream_time=(\S+)$', re.M)
ACCESS_LOG = ("--log-format", "json")  # one JSON line a request, with its status and duration


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overload",
        description="Drive a real server far above its capacity: only 2xx or fast 429/503 "
        "answers with Retry-After, and /healthz answering fast throughout.",
    )
    add_model_args(parser)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--max-pending", type=int, default=8)
    parser.add_argument("--check-clients", type=int, default=16)
    parser.add_argument("--probe-rate", type=int, default=20, help="/healthz requests a second")
    parser.add_argument(
        "--max-refusal-p99-ms",
        type=float,
        default=100.0,
        help="the most a 429/503 may take in the server (its access log), p99",
    )
    parser.add_argument(
        "--max-healthz-p99-ms",
        type=float,
        default=None,
        help="the most /healthz may take during the load, p99 (default: 500, or 100 with "
        "--through-nginx, whose limits keep the flood from the app)",
    )
    parser.add_argument(
        "--through-nginx",
        action="store_true",
        help="send everything through deploy/nginx.conf (its connection limits) on loopback; "
        "refusals are then timed in nginx's access log",
    )
    add_torch_threads_arg(parser, 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.max_healthz_p99_ms is None:
        args.max_healthz_p99_ms = 100.0 if args.through_nginx else 500.0
    if min(args.concurrency, args.max_pending, args.check_clients, args.probe_rate) < 1:
        parser.error("--concurrency, --max-pending, --check-clients, --probe-rate must be >= 1")
    if args.requests < args.concurrency:
        parser.error("--requests must be at least --concurrency")
    return args


def raise_open_files(needed: int) -> None:
    """Let this process and its children (hey, the server) hold ``needed`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise BenchError(f"{needed} open files are needed; the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# -- what hey saw ------------------------------------------------------------------------------


def allowed(status: int) -> bool:
    return 200 <= status < 300 or status in REFUSALS


def hey_rows(output: str) -> list[tuple[int, float]]:
    """hey's CSV -> (status, seconds) for every answered request."""
    rows = csv.DictReader(io.StringIO(output))
    return [(int(r["status-code"]), float(r["response-time"])) for r in rows]


def by_status(rows: Sequence[tuple[int, float]]) -> dict[str, dict[str, Any]]:
    """Count and latency percentiles of each status."""
    out: dict[str, dict[str, Any]] = {}
    for status in sorted({s for s, _ in rows}):
        times = [t for s, t in rows if s == status]
        out[str(status)] = {
            "count": len(times),
            "p50_ms": ms(percentile(times, 50)),
            "p99_ms": ms(percentile(times, 99)),
            "max_ms": ms(max(times)),
        }
    return out


def hey_command(hey: str, *args: str) -> list[str]:
    return [hey, "-o", "csv", *args]


def load_commands(hey: str, url: str, args: argparse.Namespace) -> tuple[list[list[str]], int]:
    """The load as hey processes of at most HEY_POOL workers each, and the requests they send.

    hey keeps at most 500 idle connections: beyond that its workers would connect anew for
    every request, and the load would measure connection set-up rather than the answers.
    """
    parts = -(-args.concurrency // HEY_POOL)
    per_worker = -(-args.requests // args.concurrency)
    commands, sent = [], 0
    for part in range(parts):
        workers = args.concurrency // parts + (part < args.concurrency % parts)
        sent += workers * per_worker
        amount = ["-n", str(workers * per_worker), "-c", str(workers), "-t", "60"]
        body = ["-m", "POST", "-T", "application/json", "-d", json.dumps(BODY)]
        commands.append(hey_command(hey, *amount, *body, f"{url}/generate"))
    return commands, sent


def probe_command(hey: str, url: str, rate: int, requests: int | None = None) -> list[str]:
    """``GET /healthz`` at ``rate`` a second on one connection: ``requests`` of them, or until
    interrupted (hey prints what it has on SIGINT)."""
    amount = ["-n", str(requests)] if requests else ["-z", "3600s"]
    return hey_command(hey, *amount, "-c", "1", "-q", str(rate), f"{url}/healthz")


def run_hey(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"hey failed: {done.stderr.strip()[:500]}")
    return done.stdout


def access_log(path: Path) -> list[tuple[int, float]]:
    """(status, seconds) of each ``POST /generate`` in the server's JSON access log: from the
    request's arrival in the app to the last byte of its answer."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            path = entry.get("path")
            if path in ("/generate", NGINX_PREFIX + "/generate") and entry.get("status"):
                rows.append((int(entry["status"]), entry["duration_ms"] / 1000))
    return rows


# -- the checker -------------------------------------------------------------------------------


class Checker:
    """Clients that send the load's request in a loop and check every answer's headers."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.answers: list[tuple[int, float]] = []  # (status, seconds)
        self.refusals_without_retry_after = 0
        self.failed_connections = 0
        self.examples: list[str] = []

    def _note(self, problem: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(problem[:300])

    def see(self, response: httpx.Response) -> None:
        status = response.status_code
        self.statuses[status] += 1
        if status in REFUSALS and not response.headers.get("retry-after", "").isdigit():
            self.refusals_without_retry_after += 1
            self._note(f"{status} without a valid Retry-After: {dict(response.headers)}")
        elif not allowed(status):
            self._note(f"{status}: {response.text[:200]}")

    async def client(self, http: httpx.AsyncClient, load_done: asyncio.Event) -> None:
        while not load_done.is_set():
            started = time.perf_counter()
            try:
                response = await http.post("/generate", json=BODY)
                self.answers.append((response.status_code, time.perf_counter() - started))
                self.see(response)
            except httpx.HTTPError as exc:
                self.failed_connections += 1
                self._note(f"{type(exc).__name__}: {exc}")

    def summary(self) -> dict[str, Any]:
        return {
            "statuses": by_status(self.answers),
            "refusals_without_retry_after": self.refusals_without_retry_after,
            "failed_connections": self.failed_connections,
            "examples": self.examples,
        }


# -- the run -----------------------------------------------------------------------------------


async def finished(process: asyncio.subprocess.Process) -> str:
    """hey's CSV, once it has ended."""
    out, err = await process.communicate()
    if process.returncode != 0:
        raise BenchError(f"hey failed: {err.decode().strip()[:500]}")
    return out.decode()


async def overload(
    hey: str, url: str, commands: list[list[str]], args: argparse.Namespace, checker: Checker
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The load, the checker and the probe together: what hey saw of the load and the probe."""
    pipe = asyncio.subprocess.PIPE
    probe = await asyncio.create_subprocess_exec(
        *probe_command(hey, url, args.probe_rate), stdout=pipe, stderr=pipe
    )
    loads = [
        await asyncio.create_subprocess_exec(*command, stdout=pipe, stderr=pipe)
        for command in commands
    ]
    load_done = asyncio.Event()
    limits = httpx.Limits(max_connections=args.check_clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        checking = asyncio.gather(
            *(checker.client(http, load_done) for _ in range(args.check_clients))
        )
        outputs = await asyncio.gather(*(finished(load) for load in loads))
        load_done.set()
        await checking
    probe.send_signal(signal.SIGINT)
    return [row for out in outputs for row in hey_rows(out)], hey_rows(await finished(probe))


@contextlib.contextmanager
def nginx_before(server: Server, logdir: Path, args: argparse.Namespace) -> Iterator[Nginx]:
    """``deploy/nginx.conf`` on loopback in front of ``server``, with room for the flood."""
    address = server.url.removeprefix("http://")
    site = deploy_site(
        "nginx.conf",
        {"server app:8000;": f"server {address};", "/var/log/nginx/access.log": "logs/access.log"},
    )
    room = 2 * args.concurrency + 512
    with run_nginx(site, logdir / "nginx", connections=room, workers="auto") as nginx:
        yield nginx


def nginx_refusals(log: str) -> list[tuple[int, float]]:
    """(status, seconds) of the requests nginx refused itself (no upstream time)."""
    return [
        (int(m.group(2)), float(m.group(3)))
        for m in NGINX_LINE.finditer(log)
        if m.group(4) == "-" and int(m.group(2)) in REFUSALS
    ]


def nginx_healthz(log: str) -> dict[str, dict[str, Any]]:
    """The load's /healthz probes as nginx timed them: whole (``nginx``) and the app's part
    (``app``: from nginx's connecting to it to its answer), so that what the app adds can be
    told from what the shared cores add."""
    lines = [m for m in NGINX_LINE.finditer(log) if m.group(1).endswith("/healthz")]
    during = lines[IDLE_PROBES:]  # the first ones are the idle probe's
    return {
        "nginx": by_status([(200, float(m.group(3))) for m in during]),
        "app": by_status([(200, float(m.group(4))) for m in during if m.group(4) != "-"]),
    }


def checks(
    load: list[tuple[int, float]],
    probe: list[tuple[int, float]],
    checker: Checker,
    served: list[tuple[int, float]],
    idle: dict[str, float],
    sent: int,
    exit_status: int,
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    other = Counter(s for s, _ in load if not allowed(s))
    other.update({s: n for s, n in checker.statuses.items() if not allowed(s)})
    refusal_times = [t for s, t in load if s in REFUSALS]
    refusal_p99 = ms(percentile([t for s, t in served if s in REFUSALS], 99))
    healthz_p99 = ms(percentile([t for _, t in probe], 99))
    unanswered = sent - len(load) + checker.failed_connections
    rows, pending = idle.get(ACTIVE_ROWS), idle.get(PENDING_JOBS)
    return {
        "only_2xx_or_429_503": {"other_statuses": dict(other), "passed": not other},
        "every_request_answered": {"unanswered": unanswered, "passed": unanswered == 0},
        "refusals_carry_retry_after": {
            "checked": sum(checker.statuses[s] for s in REFUSALS),
            "missing": checker.refusals_without_retry_after,
            "passed": checker.refusals_without_retry_after == 0,
        },
        "overloaded": {"refusals": len(refusal_times), "passed": bool(refusal_times)},
        "refusals_fast": {
            "server_p99_ms": refusal_p99,
            "client_p99_ms": ms(percentile(refusal_times, 99)),
            "limit_ms": args.max_refusal_p99_ms,
            "passed": refusal_p99 is not None and refusal_p99 <= args.max_refusal_p99_ms,
        },
        "healthz_always_200": {
            "probes": len(probe),
            "not_200": sum(1 for s, _ in probe if s != 200),
            "passed": bool(probe) and all(s == 200 for s, _ in probe),
        },
        "healthz_fast": {
            "p99_ms": healthz_p99,
            "limit_ms": args.max_healthz_p99_ms,
            "passed": healthz_p99 is not None and healthz_p99 <= args.max_healthz_p99_ms,
        },
        "engine_idle_after_load": {
            "active_rows": rows,
            "pending": pending,
            "passed": rows == 0 and pending == 0,
        },
        "clean_exit_on_sigterm": {"value": exit_status, "passed": exit_status == 0},
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        "| answers | status | count | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    parts = {
        "POST /generate (hey)": report["load_by_status"],
        "POST /generate (checker)": report["checker"]["statuses"],
        "POST /generate (server's access log)": report["served_by_status"],
        "GET /healthz, idle": report["healthz_idle"],
        "GET /healthz, during the load": report["healthz_during_load"],
    }
    edge = report.get("healthz_during_load_in_nginx_log") or {}
    if edge:
        parts["GET /healthz, during the load: in nginx"] = edge["nginx"]
        parts["GET /healthz, during the load: in the app (upstream)"] = edge["app"]
    for name, statuses in parts.items():
        for status, row in statuses.items():
            lines.append(
                f"| {name} | {status} | {row['count']} | {row['p50_ms']:.1f} | "
                f"{row['p99_ms']:.1f} | {row['max_ms']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    hey = find_hey()
    if hey is None:
        return 2
    checker = Checker()
    refused_at_edge: list[tuple[int, float]] = []
    healthz_at_edge: dict[str, Any] = {}
    try:
        raise_open_files(2 * args.concurrency + 1024)
        run_dir = model_dir(args)
        with tempfile.TemporaryDirectory(prefix="overload-") as logdir:
            env = {
                "WORDRNN_MAX_PENDING": str(args.max_pending),
                "WORDRNN_TORCH_THREADS": str(args.torch_threads),
            }
            behind = ("--root-path", NGINX_PREFIX) if args.through_nginx else ()
            server = Server(
                run_dir,
                "overload",
                Path(logdir),
                args=[*ACCESS_LOG, *behind],
                env=env,
                log_level="info",
            )
            try:
                server.wait_ready()
                with contextlib.ExitStack() as front:
                    url = server.url
                    if args.through_nginx:
                        proxy = front.enter_context(nginx_before(server, Path(logdir), args))
                        url = proxy.url + NGINX_PREFIX
                    idle_probe = hey_rows(
                        run_hey(probe_command(hey, url, args.probe_rate, IDLE_PROBES))
                    )
                    print(
                        f"overload: {args.requests} requests from {args.concurrency} "
                        f"connections on {url}",
                        file=sys.stderr,
                    )
                    commands, sent = load_commands(hey, url, args)
                    load, probe = asyncio.run(overload(hey, url, commands, args, checker))
                    idle = server.wait_idle()
                    if args.through_nginx:
                        refused_at_edge = nginx_refusals(proxy.access_log())
                        healthz_at_edge = nginx_healthz(proxy.access_log())
            finally:
                exit_status = server.stop()
                served = access_log(server.log_path) + refused_at_edge
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    found = checks(load, probe, checker, served, idle, sent, exit_status, args)
    report = {
        "command": "python -m bench.overload "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(run_dir),
        "concurrency": args.concurrency,
        "requests": sent,
        "hey_processes": len(commands),
        "max_pending": args.max_pending,
        "through_nginx": args.through_nginx,
        "body": BODY,
        "load_by_status": by_status(load),
        "checker": checker.summary(),
        "served_by_status": by_status(served),
        "healthz_idle": by_status(idle_probe),
        "healthz_during_load": by_status(probe),
        "healthz_during_load_in_nginx_log": healthz_at_edge,
        "metrics_after_load": idle,
        "checks": found,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))

    for name, result in found.items():
        print(f"{'PASS' if result['passed'] else 'FAIL'} {name}: {json.dumps(result)}")
    print(f"\nwrote {args.out}")
    return 0 if all(r["passed"] for r in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
