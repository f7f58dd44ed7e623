"""``POST /generate``: text from the model, as one JSON response or as server-sent events."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body
from fastapi.openapi.models import Example
from sse_starlette import EventSourceResponse

from app.deps import ModelsDep
from app.routes.responses import component, errors, json_data
from app.schemas import GenerateRequest, GenerateResponse, WordEventData

router = APIRouter(tags=["generate"])

# Frames must reach the client as they are written, through proxies too.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# When the server stops, a stream gets this long to send its error event before it is cut.
SHUTDOWN_GRACE_SECONDS = 2.0

EXAMPLES: dict[str, Example] = {
    "seeded": {
        "summary": "Continue a seed, reproducibly",
        "value": {"seed_words": "I can see", "max_words": 20, "random_seed": 42},
    },
    "greedy": {
        "summary": "Always the most likely word",
        "value": {"seed_words": ["I", "can"], "max_words": 10, "temperature": 0},
    },
    "samples": {
        "summary": "Three samples, nucleus sampling",
        "value": {
            "seed_words": "The sea",
            "n": 3,
            "max_words": 15,
            "top_k": 10,
            "top_p": 0.9,
            "temperature": 0.8,
        },
    },
    "stop": {
        "summary": "Stop at the end of a sentence",
        "value": {"seed_words": "I can", "max_words": 50, "stop": [".", "!", "?"]},
    },
    "stream": {
        "summary": "Stream the words as server-sent events",
        "value": {"seed_words": "I can see", "max_words": 20, "stream": True},
    },
    "start": {"summary": "From the start of a text", "value": {}},
}


def _event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {"event": {"const": name}, "data": json_data(data)},
    }


STREAM_DOC: dict[str, Any] = {
    "description": (
        "With `stream: true`: server-sent events. One `word` event per generated word "
        "(`{index, word, text}`), then one `done` event holding the whole response as without "
        "streaming; a failure after the stream started ends it with an `error` event."
    ),
    "content": {
        "text/event-stream": {
            # Each event, as schemathesis and OpenAPI 3.2's itemSchema read it.
            "schema": {
                "oneOf": [
                    _event("word", WordEventData.model_json_schema()),
                    _event("done", component("GenerateResponse")),
                    _event("error", component("ErrorResponse")),
                ]
            },
            "example": 'event: word\ndata: {"index":0,"word":"the","text":" the"}\n\n'
            'event: done\ndata: {"model":"...","finish_reason":"length"}\n\n',
        }
    },
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={200: STREAM_DOC, **errors(400, 401, 404, 409, 413, 422, 429, 503, 504)},
    summary="Generate text",
)
async def generate(
    req: Annotated[GenerateRequest, Body(openapi_examples=EXAMPLES)], models: ModelsDep
) -> GenerateResponse | EventSourceResponse:
    """Continue the seed words (or a session) with the lab's stateful hidden-state sampling.

    The seed words are fed in one forward pass; then each step samples from the top-k words
    (after temperature and top-p) and feeds the chosen word back, carrying the hidden state.
    """
    if req.stream:
        stopping = anyio.Event()
        return EventSourceResponse(
            await models.stream(req.model, lambda service: service.stream(req, stopping)),
            headers=SSE_HEADERS,
            sep="\n",
            shutdown_event=stopping,
            shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
        )
    return await models.run(req.model, lambda service: service.generate(req))
