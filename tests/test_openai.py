"""The OpenAI-compatible API, driven by the real ``openai`` SDK (in process, over the ASGI app).

Every completion is checked against ``POST /generate`` with the same parameters, so the
routes are shown to run on the same engine with the parameters mapped as documented.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from app.chat import TEMPLATE, TURN_MARKER, render
from app.engine.handles import WordEvent
from app.errors import ApiError
from app.generation import Failed
from app.main import create_app
from app.openai.chat import DEFAULT_WORDS
from app.openai.protocol import ChatMessage
from tests.app_helpers import settings_for


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    app = create_app(settings_for(tiny_run, max_words=60, max_samples=4))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0
    )


@pytest.fixture(scope="module")
def model(client: TestClient) -> str:
    return str(client.get("/info").json()["model"])


def generate(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_models_lists_the_served_model(sdk: openai.OpenAI, model: str) -> None:
    listed = sdk.models.list()
    assert [m.id for m in listed.data] == [model]
    assert listed.data[0].object == "model"
    assert listed.data[0].owned_by == "wordrnn"
    assert sdk.models.retrieve(model).id == model


def test_an_unknown_model_is_openais_404(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.completions.create(model="gpt-4", prompt="I can", max_tokens=3)
    assert caught.value.status_code == 404
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found"
    assert body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4")


def test_a_completion_is_generate_with_openais_names(
    sdk: openai.OpenAI, client: TestClient, model: str
) -> None:
    completion = sdk.completions.create(
        model=model,
        prompt="I can see",
        max_tokens=12,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        extra_body={"top_k": 5},
    )
    plain = generate(
        client,
        seed_words="I can see",
        max_words=12,
        temperature=0.8,
        top_p=0.9,
        random_seed=7,
        top_k=5,
    )
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.model == model
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.text == plain["generated_text"]
    assert choice.finish_reason == plain["finish_reason"] == "length"
    assert choice.logprobs is None
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == 15


def test_the_run_name_and_no_model_are_accepted(sdk: openai.OpenAI, client: TestClient) -> None:
    by_name = sdk.completions.create(model="run", prompt="I", max_tokens=4, seed=3)
    bare = client.post("/v1/completions", json={"prompt": "I", "max_tokens": 4, "seed": 3})
    assert bare.status_code == 200, bare.text
    assert bare.json()["choices"][0]["text"] == by_name.choices[0].text


def test_top_k_defaults_to_the_whole_vocabulary(
    sdk: openai.OpenAI, client: TestClient, model: str
) -> None:
    completion = sdk.completions.create(model=model, prompt="the sea", max_tokens=20, seed=11)
    plain = generate(client, seed_words="the sea", max_words=20, random_seed=11, top_k=0)
    assert completion.choices[0].text == plain["generated_text"]


def test_several_prompts_and_samples_are_numbered_prompt_by_prompt(
    sdk: openai.OpenAI, client: TestClient, model: str
) -> None:
    completion = sdk.completions.create(
        model=model, prompt=["I can", "the sea"], n=2, max_tokens=6, seed=5, stop=["!"]
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(["I can", "the sea"]):
        plain = generate(
            client, seed_words=prompt, n=2, max_words=6, random_seed=5, top_k=0, stop=["!"]
        )
        for sample in plain["samples"]:
            choice = completion.choices[p * 2 + sample["index"]]
            assert choice.text == sample["generated_text"]
            assert choice.finish_reason == sample["finish_reason"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4
    assert completion.usage.completion_tokens == sum(
        len(s["words"])
        for prompt in ("I can", "the sea")
        for s in generate(
            client, seed_words=prompt, n=2, max_words=6, random_seed=5, top_k=0, stop=["!"]
        )["samples"]
    )


def test_stop_ends_a_completion_with_finish_reason_stop(
    sdk: openai.OpenAI, client: TestClient, model: str
) -> None:
    text = generate(client, seed_words="I can", max_words=40, random_seed=2, top_k=0)[
        "generated_text"
    ]
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    completion = sdk.completions.create(
        model=model, prompt="I can", max_tokens=40, seed=2, stop=stop
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert text.startswith(choice.text)


def test_echo_puts_the_prompt_first(sdk: openai.OpenAI, model: str) -> None:
    plain = sdk.completions.create(model=model, prompt="I can see", max_tokens=5, seed=9)
    echoed = sdk.completions.create(
        model=model, prompt="I can see", max_tokens=5, seed=9, echo=True
    )
    assert echoed.choices[0].text == "I can see" + plain.choices[0].text


def test_a_stream_adds_up_to_the_completion_and_ends_with_done(
    sdk: openai.OpenAI, model: str
) -> None:
    params: dict[str, Any] = {
        "model": model,
        "prompt": ["I can", "the sea"],
        "n": 2,
        "max_tokens": 10,
        "seed": 4,
        "extra_body": {"top_k": 5},
    }
    whole = sdk.completions.create(**params)
    chunks = list(
        sdk.completions.create(**params, stream=True, stream_options={"include_usage": True})
    )
    texts = dict.fromkeys(range(4), "")
    finish: dict[int, str | None] = {}
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion"
        assert chunk.id == chunks[0].id
        [choice] = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == []
    assert chunks[-1].usage == whole.usage


def test_a_stream_is_unbuffered_sse_ending_in_done(client: TestClient) -> None:
    body = {"prompt": "I can", "max_tokens": 3, "stream": True, "seed": 1}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    frames = response.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert all(frame.startswith("data: {") for frame in frames[:-2])
    assert len(frames[:-2]) == 3 + 1  # one chunk per word, then the finish_reason chunk
    assert json.loads(frames[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"max_tokens": 61}, "max_tokens"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 5}, "n"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": 6}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["I can"] * 5}, "prompt"),
        ({"extra_body": {"top_k": 23}}, "top_k"),  # the tiny vocabulary has 22 words
        ({"extra_body": {"top_k": -1}}, "top_k"),
        ({"extra_body": {"bogus": 1}}, "bogus"),
    ],
)
def test_a_bad_request_is_openais_400_naming_the_parameter(
    sdk: openai.OpenAI, model: str, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(**{"model": model, "prompt": "I can", **params})
    assert caught.value.status_code == 400
    body = caught.value.body
    assert isinstance(body, dict)
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    assert body["param"] == param
    assert param in body["message"]


def test_a_bad_request_in_a_stream_is_refused_before_it_starts(
    sdk: openai.OpenAI, model: str
) -> None:
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model=model, prompt="I", max_tokens=1000, stream=True)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "I \ud800", "echo": True}, "prompt"),
        ({"prompt": ["I can", "\udc00"], "echo": True}, "prompt"),
        ({"prompt": "I", "stop": ["\ud800"]}, "stop"),
        ({"prompt": "I", "model": "run\ud800"}, "model"),
        ({"prompt": "I", "user": "\ud800"}, "user"),
    ],
)
def test_a_lone_surrogate_is_openais_400_before_any_stream(
    client: TestClient, body: dict[str, Any], param: str, stream: bool
) -> None:
    response = client.post(
        "/v1/completions",
        # json.dumps writes the surrogate as JSON's "\ud800"; httpx's encoder cannot.
        content=json.dumps({**body, "max_tokens": 2, "stream": stream}).encode(),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "lone UTF-16 surrogate (\\ud" in error["message"]


def test_malformed_json_is_openais_400(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]


def test_an_api_key_is_required_when_configured(tiny_run: Path) -> None:
    app = create_app(settings_for(tiny_run, api_keys="sesame"))
    with TestClient(app) as client:
        refused = openai.OpenAI(
            base_url="http://testserver/v1", api_key="wrong", http_client=client, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as caught:
            refused.models.list()
        assert caught.value.status_code == 401
        assert isinstance(caught.value.body, dict)
        assert caught.value.body["type"] == "authentication_error"
        allowed = openai.OpenAI(
            base_url="http://testserver/v1", api_key="sesame", http_client=client, max_retries=0
        )
        assert allowed.completions.create(model="run", prompt="I", max_tokens=2).choices


def test_before_the_model_is_loaded_the_answer_is_openais_503(tiny_run: Path) -> None:
    client = TestClient(create_app(settings_for(tiny_run)))  # no lifespan: still loading
    response = client.post("/v1/completions", json={"prompt": "I"})
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert response.json()["error"]["type"] == "server_error"


def test_the_openapi_document_describes_the_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    completions = paths["/v1/completions"]["post"]
    assert "text/event-stream" in completions["responses"]["200"]["content"]
    assert "400" in completions["responses"]
    assert "/v1/models" in paths


@pytest.mark.parametrize("stream", [False, True])
def test_a_refused_prompt_of_several_is_named_by_its_position(
    sdk: openai.OpenAI, model: str, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(
            model=model, prompt=["I can", "the " * 1001], max_tokens=2, stream=stream
        )
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == "prompt[1]"
    assert "at most 1000" in body["message"]


def test_logprobs_are_the_scores_of_the_words_and_add_up_to_the_text(
    client: TestClient, sdk: openai.OpenAI, model: str
) -> None:
    params: dict[str, Any] = {
        "model": model,
        "prompt": "I can see",
        "max_tokens": 12,
        "n": 2,
        "seed": 3,
        "logprobs": 3,
        "stop": ["."],
    }
    completion = sdk.completions.create(**params)
    native = generate(
        client, seed_words="I can see", max_words=12, n=2, random_seed=3, top_k=0, stop=["."]
    )
    for choice in completion.choices:
        scores = choice.logprobs
        assert scores is not None
        assert scores.tokens
        assert scores.token_logprobs
        assert "".join(scores.tokens) == choice.text
        assert scores.text_offset == [
            sum(len(t) for t in scores.tokens[:i]) for i in range(len(scores.tokens))
        ]
        assert scores.top_logprobs is not None
        for top in scores.top_logprobs:
            assert 1 <= len(top) <= 3
            assert list(top.values()) == sorted(top.values(), reverse=True)
        # The same figures /score gives the words after the prompt.
        words = ["I", "can", "see", *native["samples"][choice.index]["words"]]
        scored = client.post("/score", json={"text": words}).json()["words"][3:]
        for got, want in zip(scores.token_logprobs, scored, strict=True):
            assert got == pytest.approx(want["log_prob"], abs=1e-5)
    # Streamed, the chunks carry the same figures, word by word.
    chunks = list(sdk.completions.create(**params, stream=True))
    streamed: dict[int, list[float | None]] = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed[choice.index] += choice.logprobs.token_logprobs or []
    for choice in completion.choices:
        assert choice.logprobs is not None
        assert streamed[choice.index] == choice.logprobs.token_logprobs


def test_echo_with_logprobs_scores_the_prompt_as_score_does(
    client: TestClient, sdk: openai.OpenAI, model: str
) -> None:
    prompt = "I can see the sea"
    scored = client.post("/score", json={"text": prompt}).json()["words"]
    only = sdk.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    [choice] = only.choices
    assert choice.text == prompt
    scores = choice.logprobs
    assert scores is not None
    assert scores.token_logprobs is not None
    assert scores.tokens == ["I", " can", " see", " the", " sea"]
    assert scores.text_offset == [0, 1, 5, 9, 13]
    assert scores.token_logprobs[0] is None  # nothing before the first word
    for got, want in zip(scores.token_logprobs[1:], scored[1:], strict=True):
        assert got == pytest.approx(want["log_prob"], abs=1e-5)
    # With a completion: the prompt's figures, then the completion's, offsets running on.
    both = sdk.completions.create(
        model=model, prompt=prompt, max_tokens=4, echo=True, logprobs=1, seed=1
    ).choices[0]
    assert both.logprobs is not None
    assert both.logprobs.tokens is not None
    assert both.logprobs.text_offset is not None
    assert both.logprobs.tokens[:5] == scores.tokens
    assert "".join(both.logprobs.tokens) == both.text
    assert both.logprobs.text_offset[5] == len(prompt)
    streamed = sdk.completions.create(
        model=model, prompt=prompt, max_tokens=4, echo=True, logprobs=1, seed=1, stream=True
    )
    tokens = [t for c in streamed for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    assert tokens == both.logprobs.tokens


def test_a_failure_after_the_stream_started_is_an_error_chunk(
    client: TestClient, sdk: openai.OpenAI, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(req: object, stopping: object, *, owner: str | None) -> Any:
        async def events() -> Any:
            yield WordEvent(0, "the", " the")
            yield Failed(ApiError(503, "the server is stopping; retry shortly"))

        return events()

    monkeypatch.setattr(client.app.state.models.default.service, "stream", failing)  # type: ignore[attr-defined]
    stream = sdk.completions.create(model=model, prompt="I", max_tokens=5, stream=True)
    assert next(stream).choices[0].text == " the"
    with pytest.raises(openai.APIError, match="stopping"):
        next(stream)


# -- chat completions --------------------------------------------------------------------------

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "A play."},
    {"role": "user", "content": "I can see"},
    {"role": "assistant", "content": "the sea"},
    {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "text", "text": "I"}]},
]


def test_the_chat_template_renders_a_conversation_for_the_model() -> None:
    messages = [ChatMessage.model_validate(m).message() for m in CONVERSATION]
    assert (
        render(messages)
        == "A play.\n\nUser: I can see\nAssistant: the sea\nUser: and I\nAssistant:"
    )
    developer = ChatMessage.model_validate({"role": "developer", "content": "Be\nbrief."})
    assert render([developer.message()]) == "Be brief.\n\nAssistant:"  # one line per turn


def test_a_chat_reply_continues_the_rendered_conversation(
    client: TestClient, sdk: openai.OpenAI, model: str
) -> None:
    chat = sdk.chat.completions.create(
        model=model,
        messages=CONVERSATION,  # type: ignore[arg-type]
        max_completion_tokens=8,
        n=2,
        seed=9,
        extra_body={"top_k": 5},
    )
    assert chat.object == "chat.completion"
    assert chat.id.startswith("chatcmpl-")
    plain = generate(
        client,
        seed_words=render([ChatMessage.model_validate(m).message() for m in CONVERSATION]),
        max_words=8,
        n=2,
        random_seed=9,
        top_k=5,
        temperature=1.0,
        stop=[TURN_MARKER],
    )
    for choice, sample in zip(chat.choices, plain["samples"], strict=True):
        assert choice.message.role == "assistant"
        assert choice.message.content == sample["generated_text"].lstrip()
        assert choice.finish_reason == sample["finish_reason"]
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == plain["usage"]["seed_words"]
    assert chat.usage.completion_tokens == plain["usage"]["generated_words"]


def test_a_streamed_chat_reply_adds_up_to_the_plain_one(sdk: openai.OpenAI, model: str) -> None:
    params: dict[str, Any] = {
        "model": model,
        "messages": CONVERSATION,
        "max_tokens": 10,
        "seed": 4,
        "logprobs": True,
        "top_logprobs": 2,
    }
    whole = sdk.chat.completions.create(**params)
    chunks = list(
        sdk.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text, scores, finish = "", [], None
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk"
        [choice] = chunk.choices
        text += choice.delta.content or ""
        if choice.logprobs is not None and choice.logprobs.content:
            scores += [t.logprob for t in choice.logprobs.content]
        finish = choice.finish_reason or finish
    [choice] = whole.choices
    assert text == choice.message.content
    assert finish == choice.finish_reason
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    assert scores == [t.logprob for t in choice.logprobs.content]
    for token in choice.logprobs.content:
        assert 1 <= len(token.top_logprobs) <= 2
        assert bytes(token.bytes or []) == token.token.encode()
    assert chunks[-1].usage is not None
    assert chunks[-1].choices == []


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        # The service's own refusal (more seed words than it takes), named as the chat's field.
        ({"messages": [{"role": "user", "content": "the sea " * 600}]}, "messages"),
    ],
)
def test_a_bad_chat_request_is_openais_400(
    client: TestClient, body: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(param), error


def test_a_chat_reply_without_a_length_has_64_words_or_the_limit(
    sdk: openai.OpenAI, model: str
) -> None:
    chat = sdk.chat.completions.create(model=model, messages=CONVERSATION, seed=2)  # type: ignore[arg-type]
    assert chat.usage is not None
    [choice] = chat.choices
    # The README's default, capped by this server's max_words (60); a reply may end sooner
    # only at the turn marker.
    assert DEFAULT_WORDS == 64
    assert chat.usage.completion_tokens == min(DEFAULT_WORDS, 60) or choice.finish_reason == "stop"


def test_the_chat_template_is_on_the_model_card(client: TestClient, model: str) -> None:
    card = client.get(f"/v1/models/{model}").json()
    assert card["chat_template"] == TEMPLATE == client.get("/info").json()["chat_template"]
