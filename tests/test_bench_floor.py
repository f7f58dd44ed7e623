"""``bench/floor.py``, the bare-FastAPI floor of ``bench/serve_load.py``: the same request
model and a reply of the same size as ``POST /generate``."""

from __future__ import annotations

from fastapi.testclient import TestClient

from bench.floor import app


def test_the_bare_floor_answers_like_generate() -> None:
    with TestClient(app) as floor:
        answer = floor.post("/generate", json={"seed_words": "I can", "max_words": 25, "n": 2})
        assert floor.get("/readyz").status_code == 200
        refused = floor.post("/generate", json={"max_words": -1})
    assert answer.status_code == 200
    body = answer.json()
    assert len(body["words"]) == 25
    assert body["usage"] == {"seed_words": 2, "generated_words": 50, "total_words": 52}
    assert refused.status_code == 422  # the same request model
