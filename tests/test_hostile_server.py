"""A model server facing hostile clients and hostile files: bodies, tokens, budgets, request ids, start-up checks."""

from __future__ import annotations

import json
import pickle
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch

with warnings.catch_warnings():  # starlette's note that a later TestClient prefers httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from robustlab.errors import ConfigError, RobustlabError, StateFileError
from robustlab.remote import encode_array
from robustlab.serve import ServerConfig, create_app
from tests.test_serve import live_server, small_model

SHAPE = (1, 6, 6)
FACTORY = "tests.test_serve:small_model"  # the same model, as the CLI loads it


def make_app(**settings: Any) -> Any:
    options: dict[str, Any] = {"mode": "scores", "input_shape": SHAPE, "num_classes": 10, **settings}
    return create_app(small_model(), ServerConfig(**options))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def data_body(x: torch.Tensor, **extra: Any) -> dict[str, Any]:
    return {"data": encode_array(x.numpy()), "shape": list(x.shape), **extra}


def call_asgi(app: Any, headers: dict[str, str], chunks: Iterable[bytes]) -> tuple[int, int]:
    """POST /v1/predict straight into the ASGI app, the body arriving chunk by chunk (as a chunked upload does).

    Returns (status, bytes of the body the app asked for).
    """
    consumed = 0
    pending: Iterator[bytes] = iter(chunks)
    finished = False
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal consumed, finished
        if finished:
            await anyio.sleep(3600)  # nothing more to say: an app waiting for a disconnect waits
        chunk = next(pending, None)
        if chunk is None:
            finished = True
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(int(message["status"]))

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/predict", "raw_path": b"/v1/predict", "query_string": b"", "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def run() -> None:
        with anyio.fail_after(20):
            await app(scope, receive, send)

    anyio.run(run)
    return status[0], consumed


def padding(total: int, chunk: int = 16 * 1024) -> Iterator[bytes]:
    """A JSON body of ``total`` bytes that is valid to the end: ``{"pad": "xxx...x"}``."""
    yield b'{"pad": "'
    left = total - 11
    while left > 0:
        yield b"x" * min(chunk, left)
        left -= chunk
    yield b'"}'


# ------------------------------------------------------------------------------------------------------- bodies
def test_a_request_without_the_token_is_refused_before_its_body_is_read() -> None:
    app = make_app(token="secret")
    status, consumed = call_asgi(app, {"content-type": "application/json"}, padding(1024 * 1024))
    assert status == 401 and consumed == 0
    status, consumed = call_asgi(app, bearer("wrong"), padding(1024 * 1024))
    assert status == 401 and consumed == 0


def test_a_chunked_body_is_cut_off_at_the_limit() -> None:
    limit = 64 * 1024
    app = make_app(token="secret", max_body=limit)
    status, consumed = call_asgi(app, bearer("secret"), padding(1024 * 1024))  # no Content-Length
    assert status == 413
    assert consumed <= limit + 16 * 1024  # one chunk past the limit at most, not the megabyte


def test_a_chunked_upload_over_the_limit_gets_413_from_a_real_server() -> None:
    sent = 0

    def upload() -> Iterator[bytes]:
        nonlocal sent
        for chunk in padding(8 * 1024 * 1024, chunk=64 * 1024):
            sent += len(chunk)
            yield chunk

    with live_server(small_model(), token="secret", max_body=64 * 1024) as url:
        try:
            answer = httpx.post(url + "/v1/predict", content=upload(), headers=bearer("secret"), timeout=20)
            assert answer.status_code == 413, answer.text
            assert "limit" in answer.json()["detail"]
        except httpx.TransportError:
            pass  # the server closed the connection mid-upload: also a refusal
        assert sent < 8 * 1024 * 1024  # the upload was cut off, not swallowed
        assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_health_answers_while_a_client_sends_a_huge_body() -> None:
    """Millions of numbers (well under the body limit) once stalled the event loop for seconds while parsed."""
    body = b'{"inputs": [' + b"0.5," * 4_000_000 + b"0]}"  # 16 MB: under the 64 MiB body limit
    headers = {**bearer("secret"), "content-type": "application/json"}
    answers: list[int] = []
    with live_server(small_model(), token="secret", max_batch=16) as url, httpx.Client(timeout=10) as poll:

        def hostile() -> None:
            for _ in range(3):
                try:
                    response = httpx.post(url + "/v1/predict", content=body, headers=headers, timeout=30)
                    answers.append(response.status_code)
                except httpx.TransportError:
                    answers.append(-1)

        thread = threading.Thread(target=hostile)
        thread.start()
        latencies: list[float] = []
        while thread.is_alive() or len(latencies) < 3:
            started = time.perf_counter()
            assert poll.get(url + "/health").status_code == 200  # one connection: only the server's time counts
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        thread.join()
    assert set(answers) <= {413, -1}
    # Parsed on the event loop, each such body held /health for 1-2 s (on 2 busy cores); now it takes milliseconds.
    assert max(latencies) < 0.5, latencies


def test_bodies_are_bounded_before_they_become_tensors() -> None:
    client = TestClient(make_app(max_batch=4))
    deep: Any = 0.5
    for _ in range(64):
        deep = [deep]
    assert client.post("/v1/predict", json={"inputs": deep}).status_code == 422
    too_deep = rows(1).tolist()
    too_deep[0][0][0][0] = [0.5]
    answer = client.post("/v1/predict", json={"inputs": too_deep})
    assert answer.status_code == 422 and "deeper" in answer.json()["detail"]
    bomb = b"[" * 100_000 + b"]" * 100_000
    assert client.post("/v1/predict", content=bomb, headers={"content-type": "application/json"}).status_code == 422
    many = b'{"inputs": [' + b"0," * 50_000 + b"0]}"  # more numbers than 4 rows of 1x6x6 can hold
    answer = client.post("/v1/predict", content=many, headers={"content-type": "application/json"})
    assert answer.status_code == 413
    assert client.post("/v1/predict", json={"inputs": rows(5).tolist()}).status_code == 413
    assert client.post("/v1/predict", json={"data": "", "shape": [5, *SHAPE]}).status_code == 413
    assert client.post("/v1/predict", json=data_body(rows(2))).status_code == 200
    text = json.dumps(data_body(rows(2)))
    assert client.post("/v1/predict", content=text, headers={"content-type": "text/plain"}).status_code == 415


def test_the_request_body_is_documented_in_the_schema() -> None:
    schema = TestClient(make_app(token="secret")).get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    if "$ref" in body:
        body = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert {"data", "shape", "inputs", "request_id"} <= set(body["properties"])


def test_what_is_public_and_what_needs_the_token() -> None:
    client = TestClient(make_app(token="secret"))
    for path in ("/health", "/v1/info", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path
    assert client.get("/v1/usage").status_code == 401
    assert client.post("/v1/predict", json=data_body(rows(1))).status_code == 401
    assert client.get("/v1/usage", headers=bearer("secret")).status_code == 200


# ------------------------------------------------------------------------------------------------------ tokens
def test_a_non_ascii_token_is_refused_not_a_crash() -> None:
    client = TestClient(make_app(token="secret"), raise_server_exceptions=False)
    for header in ("Bearer sécret".encode(), "Bearer sécret".encode("latin-1"), b"Bearer \xff\xfe"):
        answer = client.get("/v1/usage", headers={"Authorization": header})
        assert answer.status_code == 401, answer.text
        answer = client.post("/v1/predict", json=data_body(rows(1)), headers={"Authorization": header})
        assert answer.status_code == 401, answer.text
    client = TestClient(make_app(token="clé"), raise_server_exceptions=False)
    assert client.get("/v1/usage", headers={"Authorization": "Bearer clé".encode()}).status_code == 200


def test_usage_follows_the_token_not_its_position(tmp_path: Path) -> None:
    state = tmp_path / "usage.json"
    first = TestClient(make_app(token=["alpha-secret", "beta-secret"], budget=10, state_file=state))
    assert first.post("/v1/predict", json=data_body(rows(3)), headers=bearer("alpha-secret")).status_code == 200
    assert "alpha-secret" not in state.read_text() and "beta-secret" not in state.read_text()
    second = TestClient(make_app(token=["beta-secret", "alpha-secret"], budget=10, state_file=state))
    assert second.get("/v1/usage", headers=bearer("beta-secret")).json() == {"used": 0, "remaining": 10}
    assert second.get("/v1/usage", headers=bearer("alpha-secret")).json() == {"used": 3, "remaining": 7}


def test_a_state_file_counted_by_token_position_is_carried_over(tmp_path: Path) -> None:
    state = tmp_path / "usage.json"
    state.write_text(json.dumps({"token-1": 4}))  # written by an older robustlab
    with pytest.warns(UserWarning, match="position"):
        app = make_app(token=["alpha-secret", "beta-secret"], budget=10, state_file=state)
    client = TestClient(app)
    assert client.get("/v1/usage", headers=bearer("beta-secret")).json()["used"] == 4
    assert client.get("/v1/usage", headers=bearer("alpha-secret")).json()["used"] == 0
    assert "token-1" not in state.read_text()


# ------------------------------------------------------------------------------------------------------ budgets
def test_a_budget_without_tokens_is_refused_unless_declared_advisory() -> None:
    with pytest.raises(ConfigError, match="X-Client-Id"):
        ServerConfig(mode="labels", input_shape=SHAPE, num_classes=10, budget=10)
    with pytest.warns(UserWarning, match="advisory"):
        config = ServerConfig(mode="labels", input_shape=SHAPE, num_classes=10, budget=10, trust_client_id=True)
    client = TestClient(create_app(small_model(), config))
    for _ in range(2):
        assert client.post("/v1/predict", json=data_body(rows(4)), headers={"X-Client-Id": "a"}).status_code == 200
    assert client.post("/v1/predict", json=data_body(rows(4)), headers={"X-Client-Id": "a"}).status_code == 429
    assert client.post("/v1/predict", json=data_body(rows(4)), headers={"X-Client-Id": "b"}).status_code == 200


def test_a_reused_request_id_with_another_body_is_a_conflict() -> None:
    client = TestClient(make_app(token=["alpha", "beta"]))
    first = client.post("/v1/predict", json=data_body(rows(3), request_id="r1"), headers=bearer("alpha"))
    again = client.post("/v1/predict", json=data_body(rows(3), request_id="r1"), headers=bearer("alpha"))
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    other = client.post("/v1/predict", json=data_body(rows(3, seed=1), request_id="r1"), headers=bearer("alpha"))
    assert other.status_code == 409 and "request_id" in other.json()["detail"]
    assert client.get("/v1/usage", headers=bearer("alpha")).json()["used"] == 3
    # The same id from another client is that client's own request.
    beta = client.post("/v1/predict", json=data_body(rows(3, seed=1), request_id="r1"), headers=bearer("beta"))
    assert beta.status_code == 200 and beta.json()["used"] == 3


@pytest.mark.parametrize("value", ["0.5", True, False, None, {"v": 0.5}])
def test_pixels_must_be_numbers(value: Any) -> None:
    client = TestClient(make_app())
    inputs = rows(2).tolist()
    inputs[1][0][2][3] = value
    answer = client.post("/v1/predict", json={"inputs": inputs})
    assert answer.status_code == 422 and "number" in answer.json()["detail"], answer.text
    inputs[1][0][2][3] = 1  # an integer is a number
    assert client.post("/v1/predict", json={"inputs": inputs}).status_code == 200


# ---------------------------------------------------------------------------------------------------- start-up
def test_a_model_that_cannot_take_the_declared_input_is_refused_at_start_up() -> None:
    with pytest.raises(RobustlabError, match=r"shape|input"):
        create_app(small_model(), ServerConfig(mode="labels", input_shape=(1, 5, 5), num_classes=10))
    with pytest.raises(RobustlabError, match="10 classes"):
        create_app(small_model(), ServerConfig(mode="labels", input_shape=SHAPE, num_classes=7))
    app = create_app(small_model(), ServerConfig(mode="labels", input_shape=SHAPE, num_classes=None))
    assert TestClient(app).get("/v1/info").json()["num_classes"] == 10


def test_a_pickled_state_file_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    state = tmp_path / "usage.json"
    state.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(StateFileError, match="pickle"):
        make_app(token="t", state_file=state)
    assert not marker.exists()


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """run_server replaced by a recorder: a command that would start a server returns at once."""
    calls: list[dict[str, Any]] = []

    def record(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
        calls.append({"app": app, "port": port})

    monkeypatch.setattr("robustlab.serve.run_server", record)
    return calls


def serve_cli(*options: str) -> int:
    from robustlab.cli import main

    return main(["serve", "--model", FACTORY, "--mode", "labels", *options])


def test_the_cli_starts_a_well_formed_server(started: list[dict[str, Any]]) -> None:
    assert serve_cli("--input-shape", "1", "6", "6", "--token", "t", "--budget", "10", "--port", "8123") == 0
    assert serve_cli("--input-shape", "1", "6", "6", "--num-classes", "10") == 0
    with pytest.warns(UserWarning, match="advisory"):
        assert serve_cli("--input-shape", "1", "6", "6", "--budget", "10", "--budget-per-client-id") == 0
    assert [call["port"] for call in started] == [8123, 8000, 8000]


def bad_state(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--input-shape", "1", "5", "5", "--num-classes", "10"], "input"),
        (["--input-shape", "1", "5", "5"], "input"),
        (["--input-shape", "1", "6", "6", "--num-classes", "7"], "10 classes"),
        (["--input-shape", "1", "6", "6", "--port", "99999"], "port"),
        (["--input-shape", "1", "6", "6", "--port", "-1"], "port"),
        (["--input-shape", "0", "28", "28"], "input shape"),
        (["--input-shape", "1", "6", "6", "--bounds", "1", "0"], "bounds"),
        (["--input-shape", "1", "6", "6", "--bounds", "nan", "1"], "bounds"),
        (["--input-shape", "1", "6", "6", "--budget", "10"], "--token"),
    ],
)
def test_cli_mistakes_are_usage_errors(
    options: list[str], named: str, started: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve_cli(*options) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err and "Traceback" not in err, err
    assert started == []


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xffgarbage",
        b'{"token:0123456789abcdef": 3',  # truncated
        b"[1, 2, 3]",
        b'{"client:a": -1}',
        b'{"client:a": "3"}',
        b'{"client:a": true}',
        b'{"client:a": 2.5}',
        b"",
        pickle.dumps({"client:a": 3}),
    ],
)
def test_a_corrupt_state_file_is_a_usage_error(
    content: bytes, tmp_path: Path, started: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    state = bad_state(tmp_path, "usage.json", content)
    assert serve_cli("--input-shape", "1", "6", "6", "--token", "t", "--state-file", state) == 2
    err = capsys.readouterr().err.strip()
    assert "state file" in err and "\n" not in err and "Traceback" not in err, err
    assert started == []
