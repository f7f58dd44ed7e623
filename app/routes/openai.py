"""``/v1/completions`` and ``/v1/models``: the OpenAI-compatible API (see ``app/openai/``).

Every error under ``/v1/``, including a bad body, a missing API key, a model still loading or
a refusal by the middleware, is answered with OpenAI's error body: ``app.errors`` picks the
body by path.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request
from fastapi.openapi.models import Example
from sse_starlette import EventSourceResponse

from app.deps import ModelsDep
from app.openai.cards import model_card
from app.openai.chat import ChatCompletions
from app.openai.completions import Completions
from app.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
)
from app.routes.docs import RETRY_AFTER, component, json_data
from app.routes.generate import answered
from app.schemas import MODEL_NAME_MAX_CHARS
from app.serving import TextService

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": OpenAIErrorResponse, "description": "The body is invalid: `param` names it."},
    401: {"model": OpenAIErrorResponse, "description": "A valid API key is required."},
    404: {
        "model": OpenAIErrorResponse,
        "description": "No model has that id (code `model_not_found`; the message lists them).",
    },
    413: {"model": OpenAIErrorResponse, "description": "The body is too large."},
    429: {
        "model": OpenAIErrorResponse,
        "description": "Too many requests (code `rate_limit_exceeded`): retry after "
        "`Retry-After` seconds.",
        "headers": RETRY_AFTER,
    },
    503: {
        "model": OpenAIErrorResponse,
        "description": "Not ready or busy: retry later.",
        "headers": RETRY_AFTER,
    },
}
TIMEOUT: dict[int | str, dict[str, Any]] = {
    504: {
        "model": OpenAIErrorResponse,
        "description": "The completion did not finish within the server's time limit.",
    }
}

EXAMPLES: dict[str, Example] = {
    "plain": {
        "summary": "Continue a prompt",
        "value": {"prompt": "I can see", "max_tokens": 20, "seed": 42},
    },
    "sampling": {
        "summary": "Top-k, temperature, stop",
        "value": {
            "prompt": "The sea",
            "max_tokens": 30,
            "temperature": 0.8,
            "top_k": 10,
            "n": 2,
            "stop": ["."],
        },
    },
    "stream": {
        "summary": "Stream the words",
        "value": {"prompt": "I can", "max_tokens": 20, "stream": True},
    },
}


def _stream_doc(description: str, chunk: dict[str, Any], example: str) -> dict[str, Any]:
    """The OpenAPI description of an OpenAI stream: ``data:`` frames holding ``chunk`` (or an
    error), then ``data: [DONE]``; as schemathesis and OpenAPI 3.2's itemSchema read it."""
    data = {"anyOf": [chunk, component("OpenAIErrorResponse")]}
    schema = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, json_data(data)]}},
    }
    return {
        "description": description,
        "content": {"text/event-stream": {"schema": schema, "example": example}},
    }


STREAM_DOC = _stream_doc(
    "With `stream: true`: server-sent events, one `text_completion` chunk per word "
    "(`choices[0].text` is what it adds), a last chunk per choice with its `finish_reason`, "
    "with `stream_options.include_usage` a chunk with `usage` and no choices, then "
    "`data: [DONE]`. A failure after the start is a chunk holding `error`.",
    component("Completion"),
    'data: {"id":"cmpl-...","object":"text_completion","choices":'
    '[{"index":0,"text":" the","logprobs":null,"finish_reason":null}]}\n\n'
    "data: [DONE]\n\n",
)


@router.post(
    "/completions",
    response_model=Completion,
    response_model_exclude_none=True,
    responses={200: STREAM_DOC, **ERRORS, **TIMEOUT},
    summary="Create a completion (OpenAI-compatible)",
)
async def create_completion(
    req: Annotated[CompletionRequest, Body(openapi_examples=EXAMPLES)],
    models: ModelsDep,
    request: Request,
) -> Completion | EventSourceResponse:
    """OpenAI's completions API on the model `model` (the default model without one): point
    an OpenAI client at `.../v1`."""

    def completions(service: TextService) -> Completions:
        return Completions(service, req, models.registry.card_id(service))

    return await answered(
        request,
        bool(req.stream),
        lambda stopping: models.stream(req.model, lambda s: completions(s).stream(stopping)),
        lambda: models.run(req.model, lambda s: completions(s).create()),
    )


CHAT_EXAMPLES: dict[str, Example] = {
    "plain": {
        "summary": "Reply to a conversation",
        "value": {
            "messages": [
                {"role": "system", "content": "A play."},
                {"role": "user", "content": "Who goes there?"},
            ],
            "max_completion_tokens": 20,
            "seed": 42,
        },
    },
}

CHAT_STREAM_DOC = _stream_doc(
    "With `stream: true`: server-sent events, `chat.completion.chunk`s: per choice one with "
    "`delta.role`, one per word with `delta.content`, one with its `finish_reason`; with "
    "`stream_options.include_usage` a chunk with `usage` and no choices; then "
    "`data: [DONE]`. A failure after the start is a chunk holding `error`.",
    {"type": "object", "required": ["id", "object", "choices"]},
    'data: {"id":"chatcmpl-...","object":"chat.completion.chunk","choices":'
    '[{"index":0,"delta":{"content":" the"},"logprobs":null,"finish_reason":null}]}\n\n'
    "data: [DONE]\n\n",
)


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_none=True,
    responses={200: CHAT_STREAM_DOC, **ERRORS, **TIMEOUT},
    summary="Create a chat completion (OpenAI-compatible)",
)
async def create_chat_completion(
    req: Annotated[ChatCompletionRequest, Body(openapi_examples=CHAT_EXAMPLES)],
    models: ModelsDep,
    request: Request,
) -> ChatCompletion | EventSourceResponse:
    """OpenAI's chat completions on the model `model`: the conversation is rendered by the
    chat template (`GET /info` shows it) and each reply ends at the next turn marker. The
    model has no notion of turns: it continues a text that looks like a dialogue."""

    def chat(service: TextService) -> ChatCompletions:
        return ChatCompletions(service, req, models.registry.card_id(service))

    return await answered(
        request,
        bool(req.stream),
        lambda stopping: models.stream(req.model, lambda s: chat(s).stream(stopping)),
        lambda: models.run(req.model, lambda s: chat(s).create()),
    )


@router.get("/models", response_model=ModelList, responses=ERRORS, summary="List the models")
async def list_models(models: ModelsDep) -> ModelList:
    """Every model this server serves, the default first, each with its card."""
    registry = models.registry
    names = sorted(registry.names, key=lambda name: name != registry.default_name)
    return ModelList(data=[model_card(models.service(name), registry) for name in names])


@router.get("/models/{model}", response_model=ModelCard, responses=ERRORS, summary="Show a model")
async def get_model(
    model: Annotated[str, Path(max_length=MODEL_NAME_MAX_CHARS)], models: ModelsDep
) -> ModelCard:
    """One model's card, by its id or name."""
    return model_card(models.service(model), models.registry)
