"""The OpenAI-compatible API through the client libraries people reach for first, against
``python -m app``: LangChain's ``ChatOpenAI`` and ``OpenAI`` (invoke and stream) and litellm
(``completion`` and ``text_completion`` on ``openai/<model>``)."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest

from tests.live_server import App

# litellm would fetch its price list from the internet at import; its copy is enough here.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="session")
def app(served_tiny: App) -> App:
    return served_tiny


@pytest.fixture(scope="module")
def model(app: App) -> str:
    return str(httpx.get(f"{app.url}/v1/models").json()["data"][0]["id"])


def native_reply(app: App, seed: int, words: int) -> str:
    """What the chat route answers to one user message with greedy decoding."""
    response = httpx.post(
        f"{app.url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "I can see"}],
            "max_tokens": words,
            "temperature": 0,
            "seed": seed,
        },
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


def plain_completion(app: App) -> str:
    """The completion of "I can see" with greedy decoding, 6 words."""
    body = {"prompt": "I can see", "max_tokens": 6, "temperature": 0}
    response = httpx.post(f"{app.url}/v1/completions", json=body)
    return str(response.json()["choices"][0]["text"])


def test_langchain_chat_openai_invokes_and_streams(app: App, model: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=f"{app.url}/v1", api_key="unused", model=model, temperature=0, max_tokens=8
    )
    reply = chat.invoke("I can see")
    assert reply.content == native_reply(app, 0, 8)
    streamed = "".join(str(chunk.content) for chunk in chat.stream("I can see"))
    assert streamed == reply.content


def test_langchain_openai_completes(app: App, model: str) -> None:
    from langchain_openai import OpenAI

    llm = OpenAI(
        base_url=f"{app.url}/v1", api_key="unused", model=model, max_tokens=6, temperature=0
    )
    text = llm.invoke("I can see")
    plain = httpx.post(
        f"{app.url}/v1/completions",
        json={"prompt": "I can see", "max_tokens": 6, "temperature": 0},
    ).json()["choices"][0]["text"]
    assert text == plain


def test_litellm_completion_and_text_completion(app: App, model: str) -> None:
    import litellm

    common: dict[str, Any] = {"api_base": f"{app.url}/v1", "api_key": "unused"}
    reply = litellm.completion(
        model=f"openai/{model}",
        messages=[{"role": "user", "content": "I can see"}],
        max_tokens=8,
        temperature=0,
        **common,
    )
    assert reply.choices[0].message.content == native_reply(app, 0, 8)
    text = litellm.text_completion(
        model=f"text-completion-openai/{model}",
        prompt="I can see",
        max_tokens=6,
        temperature=0,
        **common,
    )
    assert isinstance(text.choices[0].text, str)
    assert text.choices[0].text
