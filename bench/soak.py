"""Soak: a real server under a steady mix of every kind of request, checked for correctness.

    python -m bench.soak                  # 10 minutes
    python -m bench.soak --minutes 1      # a quick check

Starts ``python -m app`` on loopback (``bench/server.py``: the built-in default model, or
``--model-dir``) with few sessions kept (``--max-sessions``, default 8, as
``WORDRNN_MAX_SESSIONS``), then drives it for ``--minutes`` with ``--clients`` (default 64)
concurrent clients (asyncio + httpx: this run is about correctness, not the most requests a
second). Each client picks its next request at random (seeded by ``--seed``):

- ``generate``: ``POST /generate`` of 5-40 words; ``samples``: the same with ``n`` 2-4;
- ``stream``: ``POST /generate`` with ``stream: true``, read to its ``done`` event;
- ``session``: ``POST /sessions``, then 1-3 continuations (``session_continue``) and
  ``DELETE /sessions/ID`` (``session_delete``). With few sessions kept, another client's
  session may push this one out: a 404 (or a 409 for a continuation it ended) is then the
  expected answer;
- ``completions``: ``POST /v1/completions``.

A share of the clients (``--dropping-share``, default 1/8) only open streams of 200 words and
leave each after its first 1-5 words (``stream_dropped``): the server has to cancel them.

Every request has a deadline (``--timeout``, 75 s: past the server's own 60 s deadline, whose
answer is a 504, so what passes it got no answer at all) and counts as hung then. Every
``--sample-seconds`` the server's RSS is read (``VmRSS`` in ``/proc/PID/status``) and
``/metrics`` is scraped (active sessions, the engine's active rows and pending jobs).

Checks; the exit status is 1 when one fails:

- no 5xx answer, no hung request, no failed connection, and every other answer as expected
  (2xx with the words asked for, or the 404/409 of a session pushed out); no traceback in
  the server's log;
- the active sessions never above ``--max-sessions``;
- after the load, the engine's active rows and pending jobs back to 0, and the server stops
  with exit status 0 on SIGTERM;
- RSS growth after the warm-up (the first ``--warmup-fraction`` of the run), median of the
  last tenth of the run against the median of the tenth before the warm-up ended, at most
  ``--max-rss-growth-mb``.

Prints a Markdown table and the checks, and writes ``--out`` (default
``bench/results/soak.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
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
    model_dir,
    ms,
    parse_metrics,
    percentile,
)

RESULTS = REPO / "bench" / "results" / "soak.json"
SEEDS = ("I can see", "The king", "my lord ,", "What is this", "O , that", "Good night", "")
MIX = {"generate": 25, "samples": 10, "stream": 25, "session": 15, "completions": 25}
KINDS = (
    "generate", "samples", "stream", "stream_dropped", "session_create", "session_continue",
    "session_delete", "completions", "metrics",
)  # fmt: skip
DROPPED_WORDS = 200  # a dropped stream asks for this many words: it runs long unless cancelled


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="A bounded soak run of a real server: a mix of every kind of request at "
        "steady concurrency, checked for 5xx, hung requests, memory growth, bounded sessions "
        "and an engine that drains back to idle.",
    )
    add_model_args(parser)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-sessions", type=int, default=8)
    parser.add_argument("--dropping-share", type=float, default=0.125)
    parser.add_argument(
        "--timeout",
        type=float,
        default=75.0,
        help="seconds a request may take (default 75: past the server's own 60 s deadline)",
    )
    parser.add_argument("--sample-seconds", type=float, default=1.0)
    parser.add_argument("--warmup-fraction", type=float, default=0.25)
    parser.add_argument("--max-rss-growth-mb", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    add_torch_threads_arg(parser, 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.minutes > 0 or args.clients < 1 or args.max_sessions < 1:
        parser.error("--minutes must be > 0, --clients and --max-sessions >= 1")
    if not 0 <= args.dropping_share < 1 or not 0 <= args.warmup_fraction < 1:
        parser.error("--dropping-share and --warmup-fraction must be in [0, 1)")
    if not args.timeout > 0 or not args.sample_seconds > 0:
        parser.error("--timeout and --sample-seconds must be > 0")
    return args


# -- what the clients saw ----------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A finished request: its status and, when the answer was not what it should be, why."""

    status: int
    problem: str | None = None
    body: Any = None


@dataclass
class KindStats:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    hung: int = 0
    failed_connections: int = 0
    unexpected: int = 0
    examples: list[str] = field(default_factory=list)  # the first few problems

    def note(self, problem: str) -> None:
        self.unexpected += 1
        if len(self.examples) < 5:
            self.examples.append(problem[:300])

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "server_errors": self.server_errors,
            "hung": self.hung,
            "failed_connections": self.failed_connections,
            "unexpected": self.unexpected,
            "examples": self.examples,
            "p50_ms": ms(percentile(self.latencies, 50)),
            "p99_ms": ms(percentile(self.latencies, 99)),
        }


def expect(
    response: httpx.Response, allowed: Sequence[int], check: Callable[[Any], str | None]
) -> Answer:
    """The answer for ``response``: a problem unless its status is allowed and, for a 2xx
    with a JSON body, ``check(body)`` finds nothing wrong."""
    status = response.status_code
    if status not in allowed:
        return Answer(status, f"{status}: {response.text[:200]}")
    if not 200 <= status < 300 or status == 204:
        return Answer(status)
    body = response.json()
    return Answer(status, check(body), body)


def words_check(n: int, words: int) -> Callable[[Any], str | None]:
    """A /generate body holds ``n`` samples of ``words`` words each."""

    def check(body: Any) -> str | None:
        counts = [len(s["words"]) for s in body["samples"]]
        return None if counts == [words] * n else f"asked {n} x {words} words, got {counts}"

    return check


async def read_events(response: httpx.Response, stop_after_words: int | None = None) -> list[str]:
    """The names of the server-sent events of ``response``, in order; with
    ``stop_after_words``, only until that many ``word`` events have come."""
    names: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            names.append(line.removeprefix("event: "))
            if stop_after_words is not None and names.count("word") >= stop_after_words:
                break
    return names


# -- the clients -------------------------------------------------------------------------------


class Soak:
    """The clients and what they saw."""

    def __init__(self, http: httpx.AsyncClient, args: argparse.Namespace) -> None:
        self.http = http
        self.args = args
        self.stats = {kind: KindStats() for kind in KINDS}
        self.end = 0.0

    async def record(self, kind: str, request: Callable[[], Awaitable[Answer]]) -> Answer | None:
        """Run one request within its deadline and count what came back."""
        stats = self.stats[kind]
        stats.requests += 1
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(request(), self.args.timeout)
        except TimeoutError:
            stats.hung += 1
            return None
        except httpx.HTTPError as exc:
            stats.failed_connections += 1
            stats.note(f"{type(exc).__name__}: {exc}")
            return None
        except (KeyError, TypeError, ValueError) as exc:  # a body not of the expected shape
            stats.note(f"malformed answer: {exc!r}")
            return None
        stats.latencies.append(time.perf_counter() - started)
        stats.statuses[answer.status] += 1
        if answer.problem is not None:
            stats.note(answer.problem)
        return answer

    async def client(self, index: int, dropping: bool) -> None:
        rng = random.Random(self.args.seed * 100_003 + index)
        kinds, weights = list(MIX), list(MIX.values())
        while time.monotonic() < self.end:
            if dropping:
                await self.stream_dropped(rng)
                continue
            kind = rng.choices(kinds, weights)[0]
            await getattr(self, kind)(rng)

    async def generate(self, rng: random.Random, n: int = 1, kind: str = "generate") -> None:
        words = rng.randint(5, 40)
        body = {"seed_words": rng.choice(SEEDS), "max_words": words, "n": n}

        async def send() -> Answer:
            response = await self.http.post("/generate", json=body)
            return expect(response, (200,), words_check(n, words))

        await self.record(kind, send)

    async def samples(self, rng: random.Random) -> None:
        await self.generate(rng, n=rng.randint(2, 4), kind="samples")

    async def stream(self, rng: random.Random) -> None:
        words = rng.randint(10, 60)
        body = {"seed_words": rng.choice(SEEDS), "max_words": words, "stream": True}

        async def send() -> Answer:
            async with self.http.stream("POST", "/generate", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return Answer(response.status_code, f"{response.status_code}")
                names = await read_events(response)
            expected = ["word"] * words + ["done"]
            problem = None if names == expected else f"events {Counter(names)}"
            return Answer(200, problem)

        await self.record("stream", send)

    async def stream_dropped(self, rng: random.Random) -> None:
        """A stream left after its first words: the connection closes mid-stream."""
        leave_after = rng.randint(1, 5)
        body = {"seed_words": rng.choice(SEEDS), "max_words": DROPPED_WORDS, "stream": True}

        async def send() -> Answer:
            async with self.http.stream("POST", "/generate", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    return Answer(response.status_code, f"{response.status_code}")
                names = await read_events(response, stop_after_words=leave_after)
            ok = names.count("word") == leave_after
            return Answer(200, None if ok else f"left with events {Counter(names)}")

        await self.record("stream_dropped", send)

    async def session(self, rng: random.Random) -> None:
        """Create, continue 1-3 times, delete; a session pushed out by others ends early."""

        async def create() -> Answer:
            response = await self.http.post("/sessions", json={"seed_words": rng.choice(SEEDS)})
            return expect(response, (201,), lambda body: None)

        created = await self.record("session_create", create)
        if created is None or created.status != 201:
            return
        session_id = created.body["session_id"]
        for _ in range(rng.randint(1, 3)):
            words = rng.randint(3, 20)
            body = {"session_id": session_id, "max_words": words, "seed_words": rng.choice(SEEDS)}

            async def proceed(body: dict[str, Any] = body, words: int = words) -> Answer:
                response = await self.http.post("/generate", json=body)
                return expect(response, (200, 404, 409), words_check(1, words))

            answer = await self.record("session_continue", proceed)
            if answer is None or answer.status != 200:
                return

        async def delete() -> Answer:
            response = await self.http.delete(f"/sessions/{session_id}")
            return expect(response, (204, 404), lambda body: None)

        await self.record("session_delete", delete)

    async def completions(self, rng: random.Random) -> None:
        words = rng.randint(5, 30)
        body = {"prompt": rng.choice(SEEDS), "max_tokens": words, "seed": rng.randrange(2**31)}

        def check(reply: Any) -> str | None:
            text = reply["choices"][0]["text"]
            return None if isinstance(text, str) else f"choices[0].text is {text!r}"

        async def send() -> Answer:
            response = await self.http.post("/v1/completions", json=body)
            return expect(response, (200,), check)

        await self.record("completions", send)


# -- the server, watched -----------------------------------------------------------------------


@dataclass
class Watch:
    """What the sampler read from the server over time (seconds since the load began)."""

    rss: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)
    metrics: list[dict[str, float]] = field(default_factory=list)

    def series(self) -> list[list[float]]:
        """``[t, active sessions, engine active rows, queue length]`` at each sample."""
        names = ("t", "wordrnn_active_sessions", ACTIVE_ROWS, "wordrnn_engine_queue_length")
        return [[round(m.get(name, -1.0), 1) for name in names] for m in self.metrics]

    def most_sessions(self) -> float:
        return max((m.get("wordrnn_active_sessions", 0.0) for m in self.metrics), default=0.0)


async def scrape(soak: Soak, http: httpx.AsyncClient) -> dict[str, float] | None:
    """One ``GET /metrics``, counted under ``metrics``."""

    async def send() -> Answer:
        response = await http.get("/metrics")
        if response.status_code != 200:
            return Answer(response.status_code, f"{response.status_code}: {response.text[:200]}")
        return Answer(200, None, parse_metrics(response.text))

    answer = await soak.record("metrics", send)
    return None if answer is None or answer.status != 200 else answer.body


async def sample(
    soak: Soak, server: Server, http: httpx.AsyncClient, watch: Watch, start: float
) -> None:
    """Until the load ends: the server's RSS and its metrics, every ``--sample-seconds``."""
    while time.monotonic() < soak.end:
        now = time.monotonic() - start
        rss = server.rss_mib()
        if rss is not None:
            watch.rss.append((now, rss))
        metrics = await scrape(soak, http)
        if metrics is not None:
            watch.metrics.append({"t": now, **metrics})
        await asyncio.sleep(soak.args.sample_seconds)  # the sampling interval


async def drive(server: Server, args: argparse.Namespace) -> tuple[Soak, Watch]:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    timeout = httpx.Timeout(args.timeout)
    async with (
        httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as http,
        httpx.AsyncClient(base_url=server.url, timeout=timeout) as probe,
    ):
        soak = Soak(http, args)
        watch = Watch()
        start = time.monotonic()
        soak.end = start + args.minutes * 60
        dropping = round(args.clients * args.dropping_share)
        await asyncio.gather(
            sample(soak, server, probe, watch, start),
            *(soak.client(i, dropping=i < dropping) for i in range(args.clients)),
        )
    return soak, watch


# -- the report --------------------------------------------------------------------------------


def rss_growth(watch: Watch, seconds: float, warmup_fraction: float) -> dict[str, Any]:
    """RSS after the warm-up against the end of the run, each a median over a tenth of it."""
    window = max(seconds / 10, 5.0)
    warm = seconds * warmup_fraction
    before = [r for t, r in watch.rss if warm - window <= t <= warm]
    after = [r for t, r in watch.rss if t >= seconds - window]
    if not before or not after:
        return {"warm_mib": None, "end_mib": None, "growth_mb": None, "growth_percent": None}
    warm_mib, end_mib = statistics.median(before), statistics.median(after)
    growth_mb = (end_mib - warm_mib) * 2**20 / 1e6
    return {
        "warmup_seconds": warm,
        "window_seconds": window,
        "start_mib": watch.rss[0][1],
        "warm_mib": warm_mib,
        "end_mib": end_mib,
        "peak_mib": max(r for _, r in watch.rss),
        "growth_mb": growth_mb,
        "growth_percent": 100 * (end_mib - warm_mib) / warm_mib,
    }


def checks(
    soak: Soak,
    watch: Watch,
    final: dict[str, float],
    growth: dict[str, Any],
    exit_status: int,
    tracebacks: int,
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    stats = soak.stats.values()
    growth_mb = growth["growth_mb"]
    found = {
        "no_5xx": sum(s.server_errors for s in stats),
        "no_hung_requests": sum(s.hung for s in stats),
        "no_failed_connections": sum(s.failed_connections for s in stats),
        "no_unexpected_answers": sum(s.unexpected for s in stats),
        "no_tracebacks_in_server_log": tracebacks,
    }
    out = {name: {"value": value, "passed": value == 0} for name, value in found.items()}
    most = watch.most_sessions()
    out["sessions_bounded"] = {
        "value": most,
        "limit": args.max_sessions,
        "passed": most <= args.max_sessions,
    }
    rows, pending = final.get(ACTIVE_ROWS), final.get(PENDING_JOBS)
    out["engine_idle_after_load"] = {
        "active_rows": rows,
        "pending": pending,
        "passed": rows == 0 and pending == 0,
    }
    out["clean_exit_on_sigterm"] = {"value": exit_status, "passed": exit_status == 0}
    out["rss_growth_after_warmup"] = {
        "value_mb": growth_mb,
        "limit_mb": args.max_rss_growth_mb,
        "passed": growth_mb is not None and growth_mb <= args.max_rss_growth_mb,
    }
    return out


def table(soak: Soak) -> str:
    lines = [
        "| kind | requests | statuses | 5xx | hung | unexpected | p50 ms | p99 ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for kind, stats in soak.stats.items():
        s = stats.summary()
        statuses = ", ".join(f"{k}: {v}" for k, v in s["statuses"].items())
        p50, p99 = s["p50_ms"], s["p99_ms"]
        lines.append(
            f"| {kind} | {s['requests']} | {statuses} | {s['server_errors']} | {s['hung']} | "
            f"{s['unexpected'] + s['failed_connections']} | "
            f"{'-' if p50 is None else f'{p50:.0f}'} | {'-' if p99 is None else f'{p99:.0f}'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_dir = model_dir(args)
        with tempfile.TemporaryDirectory(prefix="soak-") as logdir:
            env = {
                "WORDRNN_MAX_SESSIONS": str(args.max_sessions),
                "WORDRNN_TORCH_THREADS": str(args.torch_threads),
            }
            server = Server(run_dir, "soak", Path(logdir), env=env)
            try:
                server.wait_ready()
                print(
                    f"soak: {args.clients} clients for {args.minutes:g} min on {server.url}",
                    file=sys.stderr,
                )
                soak, watch = asyncio.run(drive(server, args))
                final = server.wait_idle()
            finally:
                exit_status = server.stop()
                log_tail = server.log_tail(40)
                tracebacks = server.log_path.read_text(errors="replace").count("Traceback")
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    growth = rss_growth(watch, args.minutes * 60, args.warmup_fraction)
    found = checks(soak, watch, final, growth, exit_status, tracebacks, args)
    report = {
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(run_dir),
        "minutes": args.minutes,
        "clients": args.clients,
        "dropping_clients": round(args.clients * args.dropping_share),
        "max_sessions": args.max_sessions,
        "kinds": {kind: stats.summary() for kind, stats in soak.stats.items()},
        "rss": growth,
        "rss_samples_mib": [[round(t, 1), round(r, 1)] for t, r in watch.rss],
        "most_active_sessions": watch.most_sessions(),
        "metrics_samples": watch.series(),
        "metrics_after_load": final,
        "checks": found,
        "server_log_tail": log_tail,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(soak))
    print()
    if growth["growth_mb"] is not None:
        print(
            f"RSS: {growth['warm_mib']:.1f} MiB after warm-up -> {growth['end_mib']:.1f} MiB at "
            f"the end: {growth['growth_mb']:+.1f} MB ({growth['growth_percent']:+.1f} %)"
        )
    for name, result in found.items():
        print(f"{'PASS' if result['passed'] else 'FAIL'} {name}: {json.dumps(result)}")
    print(f"\nwrote {args.out}")
    return 0 if all(r["passed"] for r in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
