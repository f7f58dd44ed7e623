"""The bare-FastAPI floor of ``bench/serve_load.py``: what HTTP and JSON cost with nothing of
the service around them.

    python -m bench.floor --port 8001

One ``POST /generate`` that takes the service's own request model (`GenerateRequest`, the
same validation) and answers a `GenerateResponse` of the same size as the real one (``max_words``
copies of one word), under the same uvicorn (httptools), with no middleware, no engine and no
model; and ``GET /readyz`` for the benchmark to wait on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn
from fastapi import FastAPI

from app.schemas import GenerateRequest, GenerateResponse, Sample, Usage

WORD = "the"

app = FastAPI()


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}


@app.post("/generate", response_model=GenerateResponse)
async def generate(req: GenerateRequest) -> GenerateResponse:
    words = [WORD] * req.max_words
    generated = "".join(" " + w for w in words)
    seed = req.seed_words.split() if isinstance(req.seed_words, str) else req.seed_words or []
    text = " ".join(seed) + generated
    samples = [
        Sample(
            index=i,
            text=text,
            generated_text=generated,
            words=words,
            finish_reason="length",
            longest_copy=len(seed) + req.max_words,
        )
        for i in range(req.n)
    ]
    return GenerateResponse(
        model="floor",
        random_seed=req.random_seed or 0,
        seed_words=seed,
        unknown_words=[],
        text=text,
        generated_text=generated,
        words=words,
        finish_reason="length",
        usage=Usage(
            seed_words=len(seed),
            generated_words=req.max_words * req.n,
            total_words=len(seed) + req.max_words * req.n,
        ),
        samples=samples,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", http="httptools")
    return 0


if __name__ == "__main__":
    sys.exit(main())
