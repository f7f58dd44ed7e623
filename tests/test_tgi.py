"""Hugging Face's text-generation protocol, driven by the real client
(``huggingface_hub.InferenceClient``) against ``python -m app``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from huggingface_hub import InferenceClient

from app.tgi.translate import DEFAULT_WORDS
from tests.live_server import App


@pytest.fixture(scope="session")
def app(served_tiny: App) -> App:
    return served_tiny


@pytest.fixture(scope="module")
def client(app: App) -> InferenceClient:
    return InferenceClient(app.url)


def native(app: App, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{app.url}/generate", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_plain_text_is_greedy_unless_sampling_is_asked_for(
    app: App, client: InferenceClient
) -> None:
    greedy = native(app, seed_words="I can", max_words=8, temperature=0, top_k=0)
    assert client.text_generation("I can", max_new_tokens=8) == greedy["generated_text"]
    sampled = native(app, seed_words="I can", max_words=8, random_seed=3, top_k=4, temperature=0.7)
    text = client.text_generation("I can", max_new_tokens=8, seed=3, top_k=4, temperature=0.7)
    assert text == sampled["generated_text"]
    # Without max_new_tokens: 20 words, as the README says.
    default = client.text_generation("I can", details=True)
    assert default.details is not None
    assert default.details.generated_tokens == DEFAULT_WORDS == 20
    full = client.text_generation("I can", max_new_tokens=8, return_full_text=True)
    assert full == "I can" + greedy["generated_text"]


def test_details_give_each_words_log_probability(app: App, client: InferenceClient) -> None:
    out = client.text_generation("I can", max_new_tokens=6, details=True, top_n_tokens=2, seed=5)
    details = out.details
    assert details is not None
    assert details.seed == 5
    assert details.generated_tokens == len(details.tokens)
    assert "".join(t.text for t in details.tokens) == out.generated_text
    words = native(app, seed_words="I can", max_words=6, temperature=0, top_k=0)["words"]
    scored = httpx.post(f"{app.url}/score", json={"text": ["I", "can", *words]}).json()["words"]
    for token, want in zip(details.tokens, scored[2:], strict=True):
        assert token.logprob == pytest.approx(want["log_prob"], abs=1e-5)
    assert details.top_tokens is not None
    assert all(1 <= len(top) <= 2 for top in details.top_tokens)
    assert details.finish_reason == "length"


def test_a_stream_adds_up_to_the_plain_text(client: InferenceClient) -> None:
    plain = client.text_generation("I can", max_new_tokens=7, stop=["."])
    frames = list(
        client.text_generation("I can", max_new_tokens=7, stop=["."], stream=True, details=True)
    )
    assert "".join(f.token.text for f in frames) == plain
    assert [f.index for f in frames] == list(range(1, len(frames) + 1))
    assert all(f.details is None and f.generated_text is None for f in frames[:-1])
    assert frames[-1].generated_text == plain
    assert frames[-1].details is not None
    assert frames[-1].details.generated_tokens == len(frames)
    assert (
        "".join(client.text_generation("I can", max_new_tokens=7, stop=["."], stream=True)) == plain
    )


def test_unsupported_parameters_are_refused_and_get_still_serves_the_playground(app: App) -> None:
    refused = httpx.post(f"{app.url}/", json={"inputs": "I", "parameters": {"watermark": True}})
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["field"] == "parameters.watermark"
    page = httpx.get(f"{app.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
