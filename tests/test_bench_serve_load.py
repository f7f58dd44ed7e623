"""``bench/serve_load.py``'s arithmetic: the server's median time to the first word."""

from __future__ import annotations

import pytest

from bench.serve_load import first_word_p50

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
