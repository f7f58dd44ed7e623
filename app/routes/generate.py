"""``POST /generate``: text from the model, as one JSON response or as server-sent events.

Either way a client that disconnects stops its generation at the engine's next step: a stream
as its event generator is closed, a plain request through `cancelled_on_disconnect`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Body, Request
from fastapi.openapi.models import Example
from sse_starlette import EventSourceResponse
from starlette.types import Receive

from app.deps import ModelsDep
from app.errors import ApiError
from app.native import generate_response, sse_events, text_request
from app.routes.docs import component, errors, json_data
from app.schemas import GenerateRequest, GenerateResponse, WordEventData

T = TypeVar("T")

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


async def answered(
    request: Request,
    stream: bool,
    events: Callable[[anyio.Event], Awaitable[AsyncIterator[dict[str, str]]]],
    result: Callable[[], Awaitable[T]],
) -> T | EventSourceResponse:
    """The answer of a route that streams on request: ``events`` as server-sent events (told
    by the event it is given when the server stops, so that they can end with an error), or
    ``result`` (cancelled if the client leaves). Refusals raise before anything is sent."""
    if stream:
        stopping = anyio.Event()
        return EventSourceResponse(
            await events(stopping),
            headers=SSE_HEADERS,
            sep="\n",
            shutdown_event=stopping,
            shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
        )
    return await cancelled_on_disconnect(request, result())


async def cancelled_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``, the answer to a plain (not streamed) request, cancelled if its client leaves.

    Nothing else would stop it: only a streaming response listens for its client leaving, so
    an abandoned generation would keep its rows in every step to its last word. One task
    waits for the disconnect and then expires a timeout around ``work`` (asyncio's way to
    cancel a block from outside and tell that cancellation from any other); it reaches
    `Generation.result`, which drops the generation at the engine's next step. Nobody reads
    the answer then: a 499 (nginx's "client closed the request") for the log and metrics.
    """
    try:
        async with asyncio.timeout(None) as timeout:
            watcher = asyncio.create_task(_expire_on_disconnect(request.receive, timeout))
            try:
                return await work
            finally:
                watcher.cancel()
    except TimeoutError:
        if not timeout.expired():  # not ours: raised by the work itself
            raise
        raise ApiError(499, "the client closed the request") from None


async def _expire_on_disconnect(receive: Receive, timeout: asyncio.Timeout) -> None:
    """Expire ``timeout`` now once the client disconnects. The body was read whole before
    the handler ran, so ``receive`` has no byte left to take from anyone: it waits, without
    polling, for the disconnect (or is cancelled when the answer is ready)."""
    while (await receive())["type"] != "http.disconnect":
        pass  # an empty body message: a server may wake with one after the body
    timeout.reschedule(asyncio.get_running_loop().time())


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
    req: Annotated[GenerateRequest, Body(openapi_examples=EXAMPLES)],
    models: ModelsDep,
    request: Request,
) -> GenerateResponse | EventSourceResponse:
    """Continue the seed words (or a session) with the lab's stateful hidden-state sampling.

    The seed words are fed in one forward pass; then each step samples from the top-k words
    (after temperature and top-p) and feeds the chosen word back, carrying the hidden state.
    """
    asked = text_request(req)

    async def events(stopping: anyio.Event) -> AsyncIterator[dict[str, str]]:
        return sse_events(
            await models.stream(
                req.model, lambda service: service.stream(asked, stopping, owner=models.owner)
            )
        )

    async def result() -> GenerateResponse:
        work = models.run(req.model, lambda s: s.generate(asked, owner=models.owner))
        return generate_response(await work)

    return await answered(request, req.stream, events, result)
