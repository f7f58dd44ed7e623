"""The service around the model: the model card, docs, keys, CORS, sub-paths, concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi.testclient import TestClient

from app.main import create_app
from model_store import checkpoint
from tests.app_helpers import Gate, settings_for
from tests.conftest import MakeRun


@pytest.fixture(scope="module")
def client(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_run))) as client:
        yield client


def test_healthz_answers(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_info_is_the_model_card(make_run: MakeRun) -> None:
    run_dir = make_run(cell="lstm", layers=2)
    corpus = {"sources": ["/home/me/corpus.txt"], "sha256": "ab" * 32, "words": 120}
    checkpoint.commit(run_dir, info={"corpus": corpus, "best_valid_perplexity": 42.5})
    with TestClient(create_app(settings_for(run_dir, max_words=77))) as client:
        generated = client.post("/generate", json={"max_words": 1}).json()
        info = client.get("/info").json()
    manifest = checkpoint.read_manifest(run_dir)
    assert info["model"] == generated["model"]
    assert info["model"].startswith(run_dir.name + "-")
    assert info["run"] == run_dir.name
    assert info["device"] == "cpu"
    assert info["architecture"]["cell"] == "lstm"
    assert info["architecture"]["layers"] == 2
    assert info["parameters"] > 0
    assert info["vocab_size"] == info["architecture"]["vocab_size"] == 22
    assert info["tokenizer"] == {"name": "words", "lowercase": False}
    assert info["corpus"] == {"sha256": "ab" * 32, "words": 120}  # no paths of the trainer's
    assert info["best_valid_perplexity"] == 42.5
    assert info["created"] == manifest["created"]
    assert info["training"] == {"seed": 0}
    assert info["versions"]["torch"]
    assert info["limits"]["max_words"] == 77
    assert info["limits"]["max_top_k"] == 22
    assert info["served"] == {
        "generations": 2,  # the warm-up and the request
        "words": 3,
        "cancelled": 0,
        "failed": 0,
        "pending": 0,
    }


def test_the_docs_are_served(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.text
    schema = client.get("/openapi.json").json()
    generate = schema["paths"]["/generate"]["post"]
    assert "text/event-stream" in generate["responses"]["200"]["content"]
    assert {"400", "413", "422", "503"} <= set(generate["responses"])


def test_every_request_example_in_the_docs_works_when_pasted(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    tried = 0
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            content = operation.get("requestBody", {}).get("content", {})
            examples = content.get("application/json", {}).get("examples", {})
            for name, example in examples.items():
                response = client.request(method, path, json=example["value"])
                assert response.status_code in (200, 201), (path, name, response.text)
                tried += 1
    assert tried >= 10


@pytest.fixture(scope="module")
def keyed(tiny_run: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tiny_run, api_keys=["key-one", "key-two"]))) as client:
        yield client


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer key-two"}, {"X-API-Key": "key-one"}],
    ids=["bearer", "x-api-key"],
)
def test_a_valid_api_key_is_accepted(keyed: TestClient, headers: dict[str, str]) -> None:
    assert keyed.post("/generate", json={"max_words": 2}, headers=headers).status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/generate", {}),
        ("POST", "/generate", {"Authorization": "Bearer key-three"}),
        ("POST", "/generate", {"X-API-Key": "key-on"}),
        ("POST", "/sessions", {}),
        ("POST", "/next-words", {}),
        ("POST", "/score", {}),
        ("GET", "/info", {"Authorization": "Basic a2V5LW9uZTo="}),
        ("GET", "/metrics", {}),
    ],
)
def test_model_endpoints_need_a_key_when_keys_are_set(
    keyed: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = keyed.request(method, path, json={"text": "I"}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "API key" in response.json()["detail"]


def test_the_docs_declare_security_only_when_keys_are_set(
    client: TestClient, keyed: TestClient
) -> None:
    """An open server declares no authentication it does not enforce; a keyed one declares
    both ways of sending a key on every route that needs one."""
    document = client.get("/openapi.json").json()
    assert "securitySchemes" not in document.get("components", {})
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert not [op["operationId"] for op in operations if "security" in op]
    document = keyed.get("/openapi.json").json()
    assert set(document["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    for path in ("/generate", "/score", "/info", "/metrics", "/v1/completions"):
        operation = next(iter(document["paths"][path].values()))
        assert operation["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}], path
    assert "security" not in document["paths"]["/healthz"]["get"]


def test_the_401_of_metrics_is_documented(keyed: TestClient) -> None:
    operation = keyed.get("/openapi.json").json()["paths"]["/metrics"]["get"]
    error = operation["responses"]["401"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert keyed.get("/metrics").json()["errors"] == []


def test_probes_and_docs_need_no_key(keyed: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/"):
        assert keyed.get(path).status_code == 200, path


def test_metrics_are_scraped_with_a_key(keyed: TestClient) -> None:
    response = keyed.get("/metrics", headers={"Authorization": "Bearer key-one"})
    assert response.status_code == 200
    assert "wordrnn_" in response.text


def test_cors_lets_only_the_configured_origins_in(tiny_run: Path) -> None:
    app = create_app(settings_for(tiny_run, cors_origins=["https://app.example"]))
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    with TestClient(app) as client:
        allowed = client.options(
            "/generate", headers={"Origin": "https://app.example", **preflight}
        )
        refused = client.options(
            "/generate", headers={"Origin": "https://evil.example", **preflight}
        )
        posted = client.post(
            "/generate", json={"max_words": 1}, headers={"Origin": "https://app.example"}
        )
        too_big = client.post(
            "/generate", content=b"x" * 70_000, headers={"Origin": "https://app.example"}
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    assert posted.headers["access-control-allow-origin"] == "https://app.example"
    assert too_big.status_code == 413
    assert too_big.headers["access-control-allow-origin"] == "https://app.example"


def test_a_proxy_sub_path_works_stripped_or_not(tiny_run: Path) -> None:
    with TestClient(create_app(settings_for(tiny_run, root_path="/textgen"))) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/textgen/healthz").status_code == 200
        assert client.post("/textgen/generate", json={"max_words": 1}).status_code == 200
        assert client.get("/textgenerate").status_code == 404
        assert "/textgen/openapi.json" in client.get("/docs").text
        assert client.get("/openapi.json").json()["servers"] == [{"url": "/textgen"}]


def test_the_event_loop_answers_while_the_model_works_and_a_full_queue_is_503(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(settings_for(tiny_run, max_pending=1))
    gate = Gate(monkeypatch, install=False)

    async def scenario() -> None:
        async with LifespanManager(app) as manager:
            gate.install()  # after the warm-up
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                busy = asyncio.create_task(http.post("/generate", json={"max_words": 3}))
                await gate.wait_entered()
                health = await http.get("/healthz")
                ready = await http.get("/readyz")
                refused = await http.post("/generate", json={"max_words": 3})
                gate.open()
                done = await busy
                again = await http.post("/generate", json={"max_words": 3})
        assert health.status_code == 200
        assert ready.status_code == 200
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["detail"]
        assert done.status_code == 200
        assert again.status_code == 200

    asyncio.run(scenario())
