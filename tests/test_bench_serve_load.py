"""``bench/serve_load.py``'s time to the first word: the server's medians from its metrics, and
the lean client's own clock."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from bench.serve_load import histogram, median_ms, since, time_to_first_word

METRICS = """# HELP wordrnn_time_to_first_word_seconds From arrival to the first word.
# TYPE wordrnn_time_to_first_word_seconds histogram
wordrnn_time_to_first_word_seconds_bucket{le="0.025",route="/generate"} 20.0
wordrnn_time_to_first_word_seconds_bucket{le="0.05",route="/generate"} 60.0
wordrnn_time_to_first_word_seconds_bucket{le="0.1",route="/generate"} 100.0
wordrnn_time_to_first_word_seconds_bucket{le="+Inf",route="/generate"} 100.0
wordrnn_time_to_first_word_seconds_count{route="/generate"} 100.0
wordrnn_time_to_first_word_seconds_sum{route="/generate"} 4.0
wordrnn_time_to_first_word_seconds_bucket{le="0.025",route="/v1/completions"} 0.0
wordrnn_time_to_first_word_seconds_bucket{le="+Inf",route="/v1/completions"} 0.0
"""


def first_word_p50(text: str) -> float | None:
    return median_ms(histogram(text, "wordrnn_time_to_first_word_seconds", route="/generate"))


def test_the_median_is_interpolated_within_its_bucket() -> None:
    # The 50th of 100 lies 30 of the 40 into the (25 ms, 50 ms] bucket.
    assert first_word_p50(METRICS) == pytest.approx(25 + 25 * 30 / 40)


def test_no_streams_no_median() -> None:
    assert first_word_p50("") is None
    assert (
        first_word_p50(
            METRICS.replace(" 20.0", " 0.0").replace(" 60.0", " 0.0").replace(" 100.0", " 0.0")
        )
        is None
    )


def test_a_stage_is_measured_by_what_its_histograms_gained() -> None:
    name = "wordrnn_engine_round_seconds"
    before = f"""# TYPE {name} histogram
{name}_bucket{{le="0.005",model="default"}} 90.0
{name}_bucket{{le="0.01",model="default"}} 100.0
{name}_bucket{{le="+Inf",model="default"}} 100.0
"""
    after = before.replace(" 100.0", " 140.0")
    # The 40 rounds of the stage all took 5-10 ms: an earlier load's 90 faster ones are gone.
    stage = since(histogram(after, name, model="default"), histogram(before, name))
    assert stage == [(0.005, 0.0), (0.01, 40.0), (float("inf"), 40.0)]
    assert median_ms(stage) == pytest.approx(7.5)
    assert median_ms(histogram(after, name)) == pytest.approx(5 * 70 / 90)
    assert histogram(after, name, model="other") == []


async def _stub(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """Answer one request as a streaming server would, by its number ``n``: the first a 503,
    the second a stream without a word, the others a word whose marker is split in two
    writes 40 ms apart, after 30 ms."""
    await reader.readuntil(b"\r\n\r\n")
    if n == 0:
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    else:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.03)
        if n > 1:
            writer.write(b"event: wo")
            await writer.drain()
            await asyncio.sleep(0.04)
            writer.write(b"rd\ndata: {}\n\nevent: done\ndata: {}\n\n")
    await writer.drain()
    writer.close()


def test_the_stream_client_times_the_first_word_and_counts_failures() -> None:
    async def run() -> dict[str, Any]:
        numbers = itertools.count()
        server = await asyncio.start_server(lambda r, w: _stub(r, w, next(numbers)), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await time_to_first_word(f"http://127.0.0.1:{port}", 3, 8)

    out = asyncio.run(run())
    assert out["streams"] == 8
    assert out["errors"] == 2  # the 503 and the stream without a word; split markers found
    assert out["first_word_p50_ms"] >= 70
    assert out["stream_p50_ms"] >= out["first_word_p50_ms"]
