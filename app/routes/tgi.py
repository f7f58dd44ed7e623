"""``POST /`` and ``POST /generate_stream``: Hugging Face's text-generation protocol (see
``app/tgi/``), so that ``huggingface_hub.InferenceClient(URL).text_generation`` works.
``GET /`` is still the playground; the native ``/generate`` keeps its own contract."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.openapi.models import Example
from sse_starlette import EventSourceResponse

from app.deps import ModelsDep
from app.routes.docs import errors
from app.routes.generate import answered
from app.serving import TextService
from app.tgi.protocol import Generated, TextGenerationRequest
from app.tgi.translate import TextGeneration

router = APIRouter(tags=["text-generation"])

EXAMPLES: dict[str, Example] = {
    "plain": {
        "summary": "Continue a text",
        "value": {"inputs": "I can see", "parameters": {"max_new_tokens": 20, "seed": 1}},
    },
    "details": {
        "summary": "With each word's log-probability",
        "value": {"inputs": "I can", "parameters": {"max_new_tokens": 5, "details": True}},
    },
}
ERRORS = errors(400, 401, 404, 413, 422, 429, 503, 504)
STREAM_DOC: dict[str, Any] = {
    "description": "With `stream: true` (always on /generate_stream): server-sent events, "
    "`data: {index, token, top_tokens, generated_text, details}` a word; the last one holds "
    "`generated_text` and `details`. A failure after the start is `data: {error, error_type}`.",
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {"data": {"type": "string"}},
            },
            "example": 'data: {"index":1,"token":{"id":24,"text":" be","logprob":-2.9,'
            '"special":false},"top_tokens":null,"generated_text":null,"details":null}\n\n',
        }
    },
}


async def _answer(
    req: TextGenerationRequest, models: ModelsDep, request: Request, stream: bool
) -> list[Generated] | EventSourceResponse:
    def generation(service: TextService) -> TextGeneration:
        return TextGeneration(service, req)

    return await answered(
        request,
        stream,
        lambda stopping: models.stream(None, lambda s: generation(s).stream(stopping)),
        lambda: models.run(None, lambda s: generation(s).create()),
    )


@router.post(
    "/",
    response_model=list[Generated],
    responses={200: STREAM_DOC, **ERRORS},
    summary="Generate (Hugging Face)",
)
async def text_generation(
    req: Annotated[TextGenerationRequest, Body(openapi_examples=EXAMPLES)],
    models: ModelsDep,
    request: Request,
) -> list[Generated] | EventSourceResponse:
    """Hugging Face's text-generation protocol on the default model: `inputs` continued with
    `parameters`; with `stream: true`, server-sent events as `/generate_stream`."""
    return await _answer(req, models, request, req.stream)


@router.post(
    "/generate_stream",
    response_model=None,
    responses={200: STREAM_DOC, **ERRORS},
    summary="Generate as a stream (Hugging Face)",
)
async def generate_stream(
    req: Annotated[TextGenerationRequest, Body(openapi_examples=EXAMPLES)],
    models: ModelsDep,
    request: Request,
) -> list[Generated] | EventSourceResponse:
    """One server-sent event a word: its token (id, text, log-probability); the last one also
    holds `generated_text` and `details`."""
    return await _answer(req, models, request, True)
