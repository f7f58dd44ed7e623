"""Serving under load: the batched engine against the naive one and the HTTP ceiling, one run.

    python -m bench.serve_load                        # about 7 minutes on 2 cores
    python -m bench.serve_load --requests 300         # a quicker, noisier run

Needs Debian's ``hey`` load generator (``apt-get install hey``): on two cores a Python async
client saturates long before the server does, so it would measure itself.

The model is the built-in default one: ``--run-dir`` (default ``runs/default``, what ``make
serve`` trains; ``--model-dir`` is an alias). When no folder is given and ``runs/default``
holds no run, one is trained the same way (``python -m
training --corpus builtin:shakespeare --preset subword``) for ``--train-minutes`` (default 5)
into ``--cache-dir`` (default ``~/.cache/wordrnn/bench-subword``) and reused next time
(``bench/server.py``, shared with the soak and overload runs). ``--model small`` serves the
lab's tanh RNN 64 instead (trained on two plays for a minute into
``~/.cache/wordrnn/bench-lab``), a model whose steps cost so little that HTTP sets the pace.

Four servers are started in turn, each the real thing (``python -m app``, uvicorn, HTTP on
127.0.0.1, log level warning so that no access log is written):

- ``batched``: ``--engine batched`` (continuous batching), ``POST /generate``;
- ``naive``: ``--engine naive`` (each request alone, the lab's way), ``POST /generate``;
- ``http``: ``--engine noop``, ``POST /generate``: the same route, checks and queue, and a
  reply of the same shape and size with no model work, the HTTP ceiling;
- ``floor``: ``bench/floor.py``, a bare FastAPI app with the same request model and reply
  size and nothing else (no middleware, no engine), the HTTP floor.

Each is driven by ``hey`` at each ``--concurrency`` (default 1, 8, 32, 64, 128) with
``--requests`` requests of 25 words each, sent in ``--rounds`` rounds (each rounded up to a
multiple of the concurrency) that take turns on the servers, so that drift on a shared
machine hits them alike; reported: requests/s, generated words/s, p50/p95/p99 latency,
errors (non-200 answers and failed connections) and the server's peak RSS. A lean asyncio
client (bytes on sockets, no HTTP library) then opens ``--stream-requests`` streams at
concurrency 64 on the two engines and times the first word as it arrives; beside it, the
server's own medians over those streams: the first word (its ``time_to_first_word``
histogram, from the request's arrival), the wait in the engine's queue and the engine's
rounds (a first word takes a few: the histograms ``engine_queue_wait_seconds`` and
``engine_round_seconds``, read before and after the streams).

``COMPUTE`` is the model's own batched step (``model_store.sampling``: output layer, sampling,
RNN cell) at batch 64, timed alone in this process before any server starts, in words/s.
``ENGINE`` is the batched engine's own rounds at 64 requests in flight, alone in this process
after the servers have stopped (`app.engine.Batch`: seeds fed, the text cache, each sample's
text, no HTTP); no server can beat it, so its share of a ceiling bounds the server's
(``engine_alone_share_of_*``), and ``c64_batched_share_of_engine_alone`` says what HTTP, and
sharing the cores with it, leave of it. ENGINE is also timed with torch's default threads and
with one, alone and beside a process that keeps one core busy with Python
(``engine_alone.by_torch_threads``): what sharing the cores costs the engine by itself. The
combined ceiling is ``1 / (1 / HTTP + 1 / COMPUTE)``, ``HTTP`` being the no-op server's words/s
at concurrency 64: both share the same cores, so per word the engine should add little beyond
them; a second ceiling takes the bare floor's words/s instead, what the service's own HTTP
layers cost included. Targets, each a ratio within this run: at concurrency 64 batched >= 10x
naive words/s, >= 60% of the combined ceiling and >= 75% of the floor's; at concurrency 1
batched p50 <= 1.1x naive; at concurrency 128 batched has no errors and a p99 under 2 s; a
stream's first word at concurrency 64 within 100 ms at the p50.

Writes ``--out`` (default ``bench/results/serve_load.json``) and a PNG chart next to it, and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.server import (
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
from model_store.network import QUANTIZATIONS

if TYPE_CHECKING:
    from model_store.checkpoint import Checkpoint
    from model_store.vocab import Vocab

RESULTS = REPO / "bench" / "results" / "serve_load.json"
WORDS = 25
BODY = {"seed_words": "I can see", "max_words": WORDS}
MODES = ("batched", "naive", "http", "floor")
COMPUTE_BATCH = 64


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_load",
        description="Throughput and latency of the server under load: batched engine, naive "
        "engine and the HTTP ceiling, in one run.",
    )
    add_model_args(parser)
    parser.add_argument("--concurrency", default="1,8,32,64,128")
    parser.add_argument("--requests", type=int, default=1000, help="per concurrency level")
    parser.add_argument(
        "--rounds", type=int, default=2, help="each level's requests split into rounds"
    )
    parser.add_argument("--stream-requests", type=int, default=256)
    parser.add_argument("--modes", default=",".join(MODES), help="a subset of " + ",".join(MODES))
    add_torch_threads_arg(parser, None)
    parser.add_argument(
        "--device", default="cpu", help="cpu (default, the figures in the README) or cuda[:N]"
    )
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATIONS,
        default="off",
        help="int8: the servers and COMPUTE use the int8 model (WORDRNN_QUANTIZE)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


# -- the model -------------------------------------------------------------------------------


def load_model(run_dir: Path, device: str = "cpu", quantize: str = "off") -> Checkpoint:
    """The served model, loaded once in this process for COMPUTE and ENGINE."""
    from model_store import checkpoint

    return checkpoint.load(run_dir, device, quantize)


def seed_of(vocab: Vocab) -> tuple[list[str], list[int]]:
    """The benchmark's seed words and their ids, read as the server reads a seed."""
    words = vocab.split_words(str(BODY["seed_words"]))
    return words, vocab.encode_words(words)[0]


def by_torch_threads(measure: Callable[[], float]) -> dict[str, float]:
    """``measure()`` with one torch thread and with torch's default, by thread count (the
    default given back afterwards)."""
    default = torch.get_num_threads()
    out: dict[str, float] = {}
    try:
        for threads in sorted({1, default}):
            torch.set_num_threads(threads)
            out[str(threads)] = measure()
    finally:
        torch.set_num_threads(default)
    return out


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """Another process keeps one core busy with Python while the block runs, as the event
    loop and ``hey`` do in the server runs (without sharing this process' interpreter lock)."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def compute_words_per_second(loaded: Checkpoint, batch: int = COMPUTE_BATCH) -> dict[str, Any]:
    """The model's own batched step, alone: logits, sampling, RNN cell, at ``batch`` rows.

    Timed with one torch thread and with torch's default; the best is COMPUTE (the higher
    it is, the harder the ceiling target). Words are counted as the servers count them: for
    a subword model, the pieces drawn that open a word."""
    from model_store.sampling import (
        Draws,
        SamplingParams,
        advance,
        next_logits,
        prime,
        sample,
    )

    model, vocab = loaded.model, loaded.vocab
    opens = vocab.starts_word() if vocab.is_subword else [True] * len(vocab)
    banned = list(vocab.special_ids)
    seed = seed_of(vocab)[1]
    params = [SamplingParams()] * batch
    generators = [Draws(i) for i in range(batch)]  # as the engine draws: a block at a time
    with torch.inference_mode():
        hidden = prime(model, [seed] * batch, vocab.bos_id)

    def measure() -> float:
        nonlocal hidden
        best = 0.0
        with torch.inference_mode():
            for _ in range(3):  # best of three rounds of a few hundred steps
                words, started = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - started) < 2.0:
                    ids = sample(next_logits(model, hidden), params, generators, banned)
                    hidden = advance(model, hidden, ids)
                    words += sum(opens[i] for i in ids)
                best = max(best, words / elapsed)
        return best

    by_threads = by_torch_threads(measure)
    return {
        "batch": batch,
        "words_per_second": max(by_threads.values()),
        "by_torch_threads": by_threads,
        "architecture": loaded.config.to_json(),
        "vocab_size": len(vocab),
    }


def engine_words_per_second(
    loaded: Checkpoint, rows: int = COMPUTE_BATCH, seconds: float = 2.0
) -> dict[str, Any]:
    """The batched engine's own rounds, alone in this process: `app.engine.Batch` (what the
    server's inference thread steps) with ``rows`` requests of the benchmark's body in flight,
    each replaced by a new one as it finishes, so that every round also feeds seeds, mixes
    in the text cache and keeps each sample's text; no HTTP, no threads, no other work on the
    cores. The best of three rounds of ``seconds``, in words/s (the words of the finished
    requests). COMPUTE leaves all of that out; the servers add HTTP and the cores they share
    with it."""
    from app.engine import Batch, GenerationJob
    from model_store.copies import CopyGuard
    from model_store.sampling import SamplingParams

    vocab = loaded.vocab
    tokens, seed = seed_of(vocab)
    history = seed if loaded.config.cache.enabled else []
    guard = CopyGuard(loaded.copies, vocab) if loaded.copies is not None else None
    seeds = itertools.count()

    def job() -> GenerationJob:
        return GenerationJob(
            seed_ids=seed,
            context=tokens,
            params=SamplingParams(),
            random_seed=next(seeds),
            max_words=int(BODY["max_words"]),
            history=history,
        )

    best = 0.0
    with torch.inference_mode():
        for _ in range(3):
            batch = Batch(loaded.model, vocab, list(vocab.special_ids), guard)
            batch.join([(next(seeds), job()) for _ in range(rows)])
            words, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                done = [u.result for u in batch.step() if u.result is not None]
                words += sum(len(sample.words) for r in done for sample in r.samples)
                batch.join([(next(seeds), job()) for _ in done])
            best = max(best, words / elapsed)
    return {"rows": rows, "words_per_second": best, "torch_threads": torch.get_num_threads()}


def engine_alone(loaded: Checkpoint, seconds: float = 2.0) -> dict[str, Any]:
    """ENGINE (`engine_words_per_second`, with torch's default threads) and how it changes with
    one thread and beside a `busy_core`: how much of the engine's speed rests on having every
    core to itself. In words/s."""

    def measure() -> float:
        return float(engine_words_per_second(loaded, seconds=seconds)["words_per_second"])

    alone = by_torch_threads(measure)
    with busy_core():
        beside = by_torch_threads(measure)
    threads = torch.get_num_threads()
    return {
        "rows": COMPUTE_BATCH,
        "words_per_second": alone[str(threads)],
        "torch_threads": threads,
        "by_torch_threads": {"alone": alone, "beside_busy_core": beside},
    }


def best_compute(*runs: dict[str, Any]) -> dict[str, Any]:
    """The best of several COMPUTE measurements (before and after the load runs)."""
    best = dict(max(runs, key=lambda r: float(r["words_per_second"])))
    best["runs"] = [r["by_torch_threads"] for r in runs]
    return best


# -- the servers -----------------------------------------------------------------------------


def start_server(
    run_dir: Path,
    mode: str,
    logdir: Path,
    threads: int | None,
    device: str = "cpu",
    quantize: str = "off",
) -> Server:
    """The server of one mode: its engine (``noop`` for ``http``), or the bare floor."""
    if mode == "floor":
        return Server(run_dir, mode, logdir, module="bench.floor")
    args = ["--engine", {"http": "noop"}.get(mode, mode), "--quantize", quantize]
    env = {"WORDRNN_TORCH_THREADS": str(threads)} if threads is not None else {}
    return Server(run_dir, mode, logdir, args=args, env=env, device=device)


def check_reply(server: Server) -> None:
    """One request before the load: the reply has the words the load asks for."""
    reply = httpx.post(server.url + "/generate", json=BODY, timeout=60)
    if reply.status_code != 200 or len(reply.json()["words"]) != WORDS:
        raise BenchError(f"unexpected reply: {reply.text[:300]}")


# -- load ------------------------------------------------------------------------------------


@dataclass
class Load:
    """What ``hey`` saw at one concurrency, over one or more rounds."""

    concurrency: int
    sent: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, every answer
    ok: int = 0
    seconds: float = 0.0  # from the first request sent to the last answer, summed over rounds
    rounds: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        busy = self.seconds
        return {
            "concurrency": self.concurrency,
            "requests": self.sent,
            "ok": self.ok,
            "errors": self.sent - self.ok,
            "seconds": busy,
            "requests_per_second": self.ok / busy if busy else 0.0,
            "words_per_second": self.ok * WORDS / busy if busy else 0.0,
            "p50_ms": ms(percentile(self.latencies, 50)),
            "p95_ms": ms(percentile(self.latencies, 95)),
            "p99_ms": ms(percentile(self.latencies, 99)),
            "rounds": self.rounds,
        }


def run_hey(hey: str, url: str, load: Load, requests: int) -> None:
    """One round of ``hey`` at ``load.concurrency``, added to ``load``.

    hey's CSV has one row per answered request (status, response time, start offset); a
    request that got no answer at all has no row and counts as an error.
    """
    concurrency = load.concurrency
    total = -(-requests // concurrency) * concurrency  # hey sends (n // c) * c
    command = [
        hey, "-n", str(total), "-c", str(concurrency), "-t", "60", "-m", "POST",
        "-T", "application/json", "-d", json.dumps(BODY), "-o", "csv", url,
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"hey failed: {done.stderr.strip()[:500]}")
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    ok = sum(1 for r in rows if r["status-code"] == "200")
    ends = [float(r["offset"]) + float(r["response-time"]) for r in rows]
    busy = (max(ends) - min(float(r["offset"]) for r in rows)) if rows else wall
    load.sent += total
    load.ok += ok
    load.seconds += busy
    load.latencies += [float(r["response-time"]) for r in rows]
    load.rounds.append({"ok": ok, "seconds": busy, "load_average": os.getloadavg()[0]})


async def time_to_first_word(url: str, concurrency: int, count: int) -> dict[str, Any]:
    """Stream ``count`` generations, ``concurrency`` at a time: when does the first word come?

    The client is as lean as ``hey``: one request per connection (``Connection: close``, so
    a stream ends with the connection), written and read as bytes on asyncio's streams, the
    clock stopped at the first ``event: word``. An HTTP library parsing 64 streams in Python
    on the same two cores measured mostly itself: several times the server's own figure."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload = json.dumps({**BODY, "stream": True}).encode()
    request = (
        f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload
    marker = b"event: word"
    firsts: list[float] = []
    totals: list[float] = []
    errors = 0
    left = count

    async def one() -> None:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            status = await reader.readline()
            if status.split(b" ")[1:2] != [b"200"]:
                raise ValueError(status.decode(errors="replace").strip())
            first, tail = None, b""
            while chunk := await reader.read(65536):
                if first is None:
                    seen = tail + chunk  # the marker may straddle two reads
                    if marker in seen:
                        first = time.perf_counter() - started
                    tail = seen[-len(marker) :]
            if first is None:
                raise ValueError("the stream ended without a word")
            firsts.append(first)
            totals.append(time.perf_counter() - started)
        finally:
            writer.close()

    async def worker() -> None:
        nonlocal errors, left
        while left > 0:
            left -= 1
            try:
                await asyncio.wait_for(one(), 60)
            except (OSError, ValueError, TimeoutError):
                errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "concurrency": concurrency,
        "streams": count,
        "errors": errors,
        "first_word_p50_ms": ms(percentile(firsts, 50)),
        "first_word_p95_ms": ms(percentile(firsts, 95)),
        "first_word_p99_ms": ms(percentile(firsts, 99)),
        "stream_p50_ms": ms(percentile(totals, 50)),
    }


def histogram(text: str, name: str, **labels: str) -> list[tuple[float, float]]:
    """The (upper bound, count up to it) buckets of the histogram ``name`` in ``/metrics``
    text, of the series with these labels; empty when it has none."""
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return sorted(
                (float(s.labels["le"]), s.value)
                for s in family.samples
                if s.name.endswith("_bucket")
                and all(s.labels.get(k) == v for k, v in labels.items())
            )
    return []


def median_ms(buckets: Sequence[tuple[float, float]]) -> float | None:
    """The median of a histogram's buckets, in ms, interpolated within its bucket as
    Prometheus's ``histogram_quantile`` does; None for no observations."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank, below, lower = buckets[-1][1] / 2, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return ms(lower)
            return ms(lower + (upper - lower) * (rank - below) / max(count - below, 1e-9))
        below, lower = count, upper
    return None


def since(
    after: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    """The observations of ``after`` that ``before`` (an earlier scrape) did not hold."""
    earlier = dict(before)
    return [(bound, count - earlier.get(bound, 0.0)) for bound, count in after]


# The server's medians of a stream stage: metric -> the histogram and the series read.
SERVER_TIMES = {
    "server_first_word_p50_ms": ("wordrnn_time_to_first_word_seconds", {"route": "/generate"}),
    "server_queue_wait_p50_ms": ("wordrnn_engine_queue_wait_seconds", {}),
    "server_round_p50_ms": ("wordrnn_engine_round_seconds", {}),
}


def stream_stage(url: str, requests: int) -> dict[str, Any]:
    """`time_to_first_word` at concurrency 64, with the server's own medians of the stage
    (`SERVER_TIMES`): its histograms' observations during the stage, the loads before it
    left out. The first word is timed from the request's arrival: the client's share left
    out."""
    before = httpx.get(f"{url}/metrics", timeout=30).text
    out = asyncio.run(time_to_first_word(url, 64, requests))
    after = httpx.get(f"{url}/metrics", timeout=30).text
    for key, (name, labels) in SERVER_TIMES.items():
        gained = since(histogram(after, name, **labels), histogram(before, name, **labels))
        out[key] = median_ms(gained)
    return out


def bench_servers(
    run_dir: Path, hey: str, args: argparse.Namespace, modes: list[str], logdir: Path
) -> dict[str, Any]:
    """Start every server, then drive each concurrency level in ``--rounds`` rounds, each
    round on every server in turn, so that drift on a shared machine hits all of them alike;
    streams last, then the peak RSS."""
    levels = [int(c) for c in args.concurrency.split(",")]
    servers = {
        mode: start_server(run_dir, mode, logdir, args.torch_threads, args.device, args.quantize)
        for mode in modes
    }
    out: dict[str, Any] = {mode: {"levels": []} for mode in modes}
    try:
        for server in servers.values():
            server.wait_ready()
            check_reply(server)
            run_hey(hey, server.url + "/generate", Load(8), 200)  # warm-up
        for concurrency in levels:
            loads = {mode: Load(concurrency) for mode in modes}
            for _ in range(args.rounds):
                for mode, server in servers.items():
                    url = server.url + "/generate"
                    run_hey(hey, url, loads[mode], -(-args.requests // args.rounds))
            for mode in modes:
                level = loads[mode].summary()
                print(f"  {mode:8} c={concurrency:<4} {_line(level)}", file=sys.stderr)
                out[mode]["levels"].append(level)
        for mode, server in servers.items():
            if mode in ("batched", "naive") and args.stream_requests:  # the others never stream
                stream = stream_stage(server.url, args.stream_requests)
                print(f"  {mode:8} streams c=64 {stream}", file=sys.stderr)
                out[mode]["stream"] = stream
        for mode, server in servers.items():
            out[mode]["peak_rss_mib"] = server.peak_rss_mib()
        return out
    finally:
        for server in servers.values():
            server.stop()


def _line(level: dict[str, Any]) -> str:
    return (
        f"{level['requests_per_second']:8.1f} req/s {level['words_per_second']:9.0f} words/s "
        f"p50 {level['p50_ms']:7.1f} p99 {level['p99_ms']:7.1f} ms errors {level['errors']}"
    )


# -- the report ------------------------------------------------------------------------------


def level_of(results: dict[str, Any], mode: str, concurrency: int) -> dict[str, Any] | None:
    for level in results.get(mode, {}).get("levels", []):
        if level["concurrency"] == concurrency:
            return level  # type: ignore[no-any-return]
    return None


def targets(
    results: dict[str, Any], compute: dict[str, Any], engine: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    batched64 = level_of(results, "batched", 64)
    naive64 = level_of(results, "naive", 64)
    if batched64 and naive64:
        ratio = batched64["words_per_second"] / max(naive64["words_per_second"], 1e-9)
        out["c64_batched_over_naive"] = {"value": ratio, "target": ">= 10", "met": ratio >= 10}
    # The combined ceilings: with the app's own no-op HTTP, and with the bare floor's.
    for mode, name, least in (("http", "", 0.6), ("floor", "floor_", 0.75)):
        http = level_of(results, mode, 64)
        if batched64 and http:
            ceiling = 1 / (1 / http["words_per_second"] + 1 / compute["words_per_second"])
            share = batched64["words_per_second"] / ceiling
            out[f"c64_{name or 'combined_'}ceiling_words_per_second"] = ceiling
            out[f"c64_batched_share_of_{name}ceiling"] = {
                "value": share,
                "target": f">= {least}",
                "met": share >= least,
            }
            # No server beats its engine alone: the most that the share above could be.
            out[f"engine_alone_share_of_{name or 'combined_'}ceiling"] = (
                engine["words_per_second"] / ceiling
            )
    if batched64:
        out["c64_batched_share_of_engine_alone"] = (
            batched64["words_per_second"] / engine["words_per_second"]
        )
    batched1, naive1 = level_of(results, "batched", 1), level_of(results, "naive", 1)
    if batched1 and naive1:
        ratio = batched1["p50_ms"] / naive1["p50_ms"]
        out["c1_p50_batched_over_naive"] = {"value": ratio, "target": "<= 1.1", "met": ratio <= 1.1}
    batched128 = level_of(results, "batched", 128)
    if batched128:
        met = batched128["errors"] == 0 and batched128["p99_ms"] < 2000
        out["c128_batched_errors_and_p99"] = {
            "errors": batched128["errors"],
            "p99_ms": batched128["p99_ms"],
            "target": "0 errors, p99 < 2000 ms",
            "met": met,
        }
    stream = results.get("batched", {}).get("stream")
    if stream:
        out["c64_batched_first_word_p50_ms"] = {
            "value": stream["first_word_p50_ms"],
            "server_side": stream.get("server_first_word_p50_ms"),
            "server_queue_wait": stream.get("server_queue_wait_p50_ms"),
            "server_round": stream.get("server_round_p50_ms"),
            "target": "<= 100 ms (as the client sees it)",
            "met": stream["first_word_p50_ms"] is not None and stream["first_word_p50_ms"] <= 100,
        }
    return out


def table(results: dict[str, Any]) -> str:
    lines = [
        "| server | concurrency | requests/s | words/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for level in results.get(mode, {}).get("levels", []):
            lines.append(
                f"| {mode} | {level['concurrency']} | {level['requests_per_second']:.0f} | "
                f"{level['words_per_second']:.0f} | {level['p50_ms']:.1f} | "
                f"{level['p95_ms']:.1f} | {level['p99_ms']:.1f} | {level['errors']} |"
            )
    return "\n".join(lines)


def chart(results: dict[str, Any], ceiling: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in zip(MODES, ("o-", "s-", "^--", "d:"), strict=True):
        levels = results.get(mode, {}).get("levels", [])
        if not levels:
            continue
        xs = [lv["concurrency"] for lv in levels]
        label = {
            "http": "HTTP ceiling (no-op engine)",
            "floor": "bare FastAPI floor",
        }.get(mode, f"{mode} engine")
        left.plot(xs, [lv["words_per_second"] for lv in levels], style, label=label)
        right.plot(xs, [lv["p99_ms"] for lv in levels], style, label=label)
    if ceiling:
        left.axhline(ceiling, color="grey", linestyle=":", label="combined ceiling (c=64)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("generated words/s")
    right.set_yscale("log")
    right.set_ylabel("p99 latency (ms)")
    left.legend(fontsize=8)
    fig.suptitle(f"POST /generate, {WORDS} words per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    hey = find_hey()
    if hey is None:
        return 2
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        print(f"error: unknown --modes {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        run_dir = model_dir(args)
        print(f"model: {run_dir}", file=sys.stderr)
        loaded = load_model(run_dir, args.device, args.quantize)
        before = compute_words_per_second(loaded)
        print(f"COMPUTE: {before['by_torch_threads']} words/s at batch {COMPUTE_BATCH} "
              "(by torch threads)", file=sys.stderr)  # fmt: skip
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory(prefix="serve-load-") as logdir:
            results = bench_servers(run_dir, hey, args, modes, Path(logdir))
        load_after = os.getloadavg()
        compute = best_compute(before, compute_words_per_second(loaded))
        engine = engine_alone(loaded)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    found = targets(results, compute, engine)
    report = {
        "command": "python -m bench.serve_load " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "words_per_request": WORDS,
        "body": BODY,
        "model": str(run_dir),
        "model_kind": args.model if args.run_dir is None else "run-dir",
        "quantize": args.quantize,
        "compute": compute,
        "engine_alone": engine,
        "results": results,
        "targets": found,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    chart(results, found.get("c64_combined_ceiling_words_per_second"), args.out.with_suffix(".png"))
    print(table(results))
    print()
    print(f"COMPUTE (batch {COMPUTE_BATCH}, alone): {compute['words_per_second']:.0f} words/s")
    print(f"ENGINE ({engine['rows']} requests in flight, alone): "
          f"{engine['words_per_second']:.0f} words/s")  # fmt: skip
    for where, by_threads in engine["by_torch_threads"].items():
        print(f"ENGINE {where.replace('_', ' ')}, by torch threads: "
              + ", ".join(f"{t}: {w:.0f}" for t, w in by_threads.items()))  # fmt: skip
    for name, value in found.items():
        print(f"{name}: {json.dumps(value)}")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
