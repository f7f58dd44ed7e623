"""``POST /bench/generate-noop``: ``/generate`` without the model, for the HTTP ceiling.

Served only with ``WORDRNN_BENCH_NOOP=1`` (``python -m app --bench-noop``), and left out of
the API docs. It takes the same `GenerateRequest`, runs the same checks (the same key check,
body limit and validation) and returns a `GenerateResponse` of the same shape, holding
``max_words`` copies of one word, so ``bench/serve_load.py`` can measure what HTTP and JSON
cost on their own.
"""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ModelsDep
from app.schemas import GenerateRequest, GenerateResponse

router = APIRouter(tags=["bench"], include_in_schema=False)


@router.post("/bench/generate-noop", response_model=GenerateResponse)
async def generate_noop(req: GenerateRequest, models: ModelsDep) -> GenerateResponse:
    return await models.run(req.model, lambda service: service.generate_noop(req))
