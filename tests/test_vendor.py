"""Vendors' HTTP APIs through a spec: a foreign-JSON endpoint on loopback, attacked with exact query counts, rate
limits, retried 429 bursts, refused credentials, bad answers, and a killed run resumed from the ledger."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import robustlab
from robustlab.errors import ConfigError, InvalidInputError, ModelError, StateFileError
from robustlab.oracles import LabelOracle, ScoreOracle, module_function
from robustlab.vendor import EndpointModel, connect_spec, load_spec, read_path, spec_from_mapping
from tests.test_serve import free_port

pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # at module level, where FastAPI resolves the annotations
from fastapi.responses import HTMLResponse, JSONResponse

KEY = "vendor-test-key-0123"
SHAPE = (1, 6, 6)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 10)).eval()


class Vendor:
    """A vendor's API in its own JSON shape: {"model": ..., "instances": [nested lists]} answered by
    {"result": {"predictions": [{"probs": [...], "top": name}]}}; PNG images one per request on /single.
    Counts the images it answers (what a vendor bills), and can be told to misbehave."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.images = 0
        self.requests = 0
        self.arrivals: list[float] = []
        self.busy_left = 0  # answer this many requests with busy_status first
        self.busy_status = 429
        self.retry_after: str | None = "0.05"  # None: no Retry-After header
        self.mode = "ok"  # or "html", "seven-classes"
        self.delay = 0.0  # seconds each classification takes (other requests are served meanwhile)
        self.client_ports: set[int] = set()  # one per TCP connection the clients opened
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()

    def app(self) -> Any:
        app = FastAPI()

        def refuse(request: Request) -> JSONResponse | None:
            with self.lock:
                self.requests += 1
                self.arrivals.append(time.monotonic())
                if request.client is not None:
                    self.client_ports.add(request.client.port)
                if request.headers.get("x-api-key") != KEY:
                    return JSONResponse({"error": "bad key"}, status_code=401)
                if self.busy_left > 0:
                    self.busy_left -= 1
                    headers = {} if self.retry_after is None else {"Retry-After": self.retry_after}
                    return JSONResponse({"error": "slow down"}, status_code=self.busy_status, headers=headers)
            return None

        @app.post("/classify")
        async def classify(request: Request) -> Any:
            refusal = refuse(request)
            if refusal is not None:
                return refusal
            if self.mode == "html":
                return HTMLResponse("<html><body>Service temporarily unavailable</body></html>")
            body = await request.json()
            if "instances" not in body:
                return JSONResponse({"error": "the body has no instances"}, status_code=422)
            x = torch.tensor(body["instances"], dtype=torch.float32)
            if self.mode == "slow":  # bills on receipt, answers too late
                with self.lock:
                    self.images += x.shape[0]
                await asyncio.sleep(0.4)
                return {"late": True}
            if self.delay:
                with self.lock:
                    self.in_flight += 1
                    self.most_in_flight = max(self.most_in_flight, self.in_flight)
                await asyncio.sleep(self.delay)
                with self.lock:
                    self.in_flight -= 1
            with torch.no_grad():
                probs = torch.softmax(self.model(x), dim=1)
            if self.mode == "seven-classes":
                probs = probs[:, :7]
            with self.lock:
                self.images += x.shape[0]
            return {"result": {"predictions": [{"probs": p, "top": int(np.argmax(p))} for p in probs.tolist()]}}

        @app.post("/single")
        async def single(request: Request) -> Any:
            refusal = refuse(request)
            if refusal is not None:
                return refusal
            from PIL import Image

            body = await request.json()
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]["png"]))), dtype=np.float32)
            x = torch.from_numpy(pixels / 255.0).reshape(1, *SHAPE)
            with self.lock:
                self.images += 1
            return {"label": {"id": int(self.model(x).argmax(1))}}

        return app


@contextlib.contextmanager
def serving(vendor: Vendor) -> Iterator[str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(vendor.app(), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while time.time() < deadline and not server.started:
        time.sleep(0.02)
    assert server.started, f"the test vendor did not start on port {port}"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def write_spec(folder: Path, server: str, **fields: Any) -> Path:
    spec = {
        "url": server + "/classify", "output": "scores", "response": "result.predictions[*].probs",
        "body": {"model": "m1", "instances": "$inputs"}, "token_env": "VENDOR_KEY", "token_header": "X-Api-Key",
        "token_prefix": "", "num_classes": 10, "batch_size": 4, "concurrency": 2, "backoff": 0.01, **fields,
    }  # fmt: skip
    file = folder / "vendor.json"
    file.write_text(json.dumps(spec))
    return file


def images(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))
    return x, small_model()(x).argmax(1)


def probabilities(model: nn.Module) -> nn.Module:
    return nn.Sequential(model, nn.Softmax(dim=1)).eval()


@pytest.fixture(autouse=True)
def vendor_key(monkeypatch) -> None:
    monkeypatch.setenv("VENDOR_KEY", KEY)


def test_square_through_a_foreign_json_endpoint_counts_every_query(tmp_path: Path) -> None:
    model = small_model()
    x, y = images()
    threat = robustlab.ThreatModel("linf", 0.1)
    local = robustlab.attack(ScoreOracle(module_function(probabilities(model)), budget=80), x, y, threat, "square",
                             queries=80, seed=3)  # fmt: skip
    vendor = Vendor(model)
    with serving(vendor) as url:
        oracle = connect_spec(write_spec(tmp_path, url), budget=80)
        endpoint = oracle.model
        assert isinstance(oracle, ScoreOracle) and isinstance(endpoint, EndpointModel)
        remote = robustlab.attack(oracle, x, y, threat, "square", queries=80, seed=3)
        endpoint.close()
    assert torch.equal(remote.success, local.success) and torch.equal(remote.queries, local.queries)
    assert torch.allclose(remote.x_adv, local.x_adv, atol=1e-6)
    # Every query the oracle counted reached the vendor once, or was a repeat answered from the ledger.
    ledger = endpoint.ledger
    assert vendor.images == ledger.paid > 0
    assert ledger.paid + ledger.hits == oracle.total_queries == int(remote.queries.sum() + remote.audits.sum())
    assert ledger.hits > 0  # the success re-check asks for points the attack already asked about
    assert vendor.requests == endpoint.requests


def test_rays_one_png_per_request_with_labels(tmp_path: Path) -> None:
    model = small_model()
    x, y = images(6)
    vendor = Vendor(model)
    with serving(vendor) as url:
        spec = write_spec(tmp_path, url, url=url + "/single", output="labels", response="label.id", encoding="png",
                          body={"image": {"png": "$input"}}, concurrency=3)  # fmt: skip
        oracle = connect_spec(spec, budget=120)
        assert isinstance(oracle, LabelOracle) and not isinstance(oracle, ScoreOracle)
        result = robustlab.attack(oracle, x, y, robustlab.ThreatModel("linf", 0.2), "rays", queries=120, seed=1)
        endpoint = oracle.model
        assert isinstance(endpoint, EndpointModel)
        endpoint.close()
    assert endpoint.spec.batch_size == 1 and vendor.requests == vendor.images == endpoint.ledger.paid
    assert endpoint.ledger.paid + endpoint.ledger.hits == oracle.total_queries
    assert int(result.queries.max()) <= 120
    # PNG rounds to 1/255: the labels the vendor gave are the labels of the rounded images
    rounded = torch.round(result.x_adv * 255) / 255
    assert torch.equal(model(rounded).argmax(1) != y, result.success)


def test_the_rate_limit_holds_across_concurrent_requests(tmp_path: Path, monkeypatch) -> None:
    vendor = Vendor(small_model())
    x, _ = images(24)
    with serving(vendor) as url:
        oracle = connect_spec(write_spec(tmp_path, url, rate_limit=25, concurrency=4, batch_size=2))
        endpoint = oracle.model
        assert isinstance(endpoint, EndpointModel)
        sends: list[float] = []
        send = endpoint._client.request

        def timed(*args: Any, **kwargs: Any) -> Any:
            sends.append(time.monotonic())
            return send(*args, **kwargs)

        monkeypatch.setattr(endpoint._client, "request", timed)
        endpoint(x)  # 12 requests of 2 images, up to 4 in flight
        endpoint.close()
    assert vendor.requests == len(sends) == 12
    assert np.diff(sorted(sends)).min() >= 1 / 25 - 5e-3  # every start about 40 ms or more after the last
    arrivals = sorted(vendor.arrivals)  # the vendor sees them spread over 11 intervals too (its clock is noisier)
    assert arrivals[-1] - arrivals[0] >= 11 / 25 - 0.03


def test_a_429_burst_is_retried_honouring_retry_after_and_not_paid_twice(tmp_path: Path) -> None:
    model = small_model()
    vendor = Vendor(model)
    vendor.busy_left = 5
    x, _ = images(8)
    with serving(vendor) as url:
        oracle = connect_spec(write_spec(tmp_path, url, concurrency=1, backoff=1.0))
        endpoint = oracle.model
        assert isinstance(endpoint, EndpointModel)
        started = time.monotonic()
        scores = endpoint(x)
        elapsed = time.monotonic() - started
        endpoint.close()
    assert torch.allclose(scores, probabilities(model)(x), atol=1e-6)
    assert endpoint.retried == 5 and vendor.requests == 2 + 5 and vendor.images == 8 == endpoint.ledger.paid
    assert 5 * 0.05 <= elapsed < 2.0  # Retry-After's 0.05 s, not the 1 s back-off


def test_5xx_answers_are_retried_with_exponential_back_off(tmp_path: Path) -> None:
    model = small_model()
    vendor = Vendor(model)
    vendor.busy_left, vendor.busy_status, vendor.retry_after = 2, 503, None
    x, _ = images(4)
    with serving(vendor) as url:
        endpoint = _endpoint(write_spec(tmp_path, url, concurrency=1, backoff=0.15))
        started = time.monotonic()
        scores = endpoint(x)
        elapsed = time.monotonic() - started
        endpoint.close()
    assert torch.allclose(scores, probabilities(model)(x), atol=1e-6)
    assert endpoint.retried == 2 and vendor.requests == 3 and vendor.images == 4 == endpoint.ledger.paid
    assert elapsed >= 0.15 + 0.3  # waited backoff, then twice that


def test_requests_share_connections_and_stay_within_the_concurrency_limit(tmp_path: Path) -> None:
    model = small_model()
    vendor = Vendor(model)
    vendor.delay = 0.1  # long enough for requests to overlap
    x, _ = images(24)
    with serving(vendor) as url:
        endpoint = _endpoint(write_spec(tmp_path, url, concurrency=3, batch_size=2))
        scores = torch.cat([endpoint(x[:12]), endpoint(x[12:])])  # two calls of 6 requests each
        endpoint.close()
    assert torch.allclose(scores, probabilities(model)(x), atol=1e-6)
    assert vendor.requests == 12 and 2 <= vendor.most_in_flight <= 3
    assert len(vendor.client_ports) <= 3  # 12 requests over at most 3 kept-alive connections, not one each


def test_bad_answers_and_refused_credentials_are_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    vendor = Vendor(small_model())
    x, _ = images(4)
    with serving(vendor) as url:
        spec = write_spec(tmp_path, url)
        vendor.mode = "html"
        with pytest.raises(ModelError, match=r"answered text/html \(status 200\), not JSON: '<html><body>Service"):
            connect_spec(spec).model(x)
        vendor.mode = "seven-classes"
        with pytest.raises(ModelError, match="answered 7 scores for an image, but it has 10 classes"):
            connect_spec(spec).model(x)
        vendor.mode = "ok"
        monkeypatch.setenv("VENDOR_KEY", "wrong")
        with pytest.raises(ModelError, match=r"refused the credentials \(401\) \(the token comes from \$VENDOR_KEY\)"):
            connect_spec(spec).model(x)
        monkeypatch.delenv("VENDOR_KEY")
        with pytest.raises(ConfigError, match=r"\$VENDOR_KEY, which is not set"):
            connect_spec(spec)
    ledger_text = (tmp_path / "vendor.json.ledger.jsonl").read_text()
    assert KEY not in ledger_text and "wrong" not in ledger_text
    # The ledger's bill is the vendor's: the 7-class answer was an answer (4 images), the HTML page and the 401 not.
    monkeypatch.setenv("VENDOR_KEY", KEY)
    ledger = _endpoint(spec).ledger
    assert vendor.images == 4 == ledger.paid and ledger.unresolved == 0 and not ledger.answers


def test_spec_mistakes_are_named(tmp_path: Path) -> None:
    base = {"url": "http://127.0.0.1:9/x", "output": "scores", "response": "scores"}
    with pytest.raises(ConfigError, match=r"missing field\(s\) response"):
        spec_from_mapping({"url": "http://h/x", "output": "scores"})
    with pytest.raises(ConfigError, match="unknown field"):
        spec_from_mapping({**base, "reponse_path": "x"})
    with pytest.raises(ConfigError, match="tokens never go in spec files"):
        spec_from_mapping({**base, "token": "abc"})
    with pytest.raises(ConfigError, match="tokens never go in spec files"):
        spec_from_mapping({**base, "headers": {"Authorization": "Bearer abc"}})
    with pytest.raises(ConfigError, match="output must be one of"):
        spec_from_mapping({**base, "output": "logits"})
    with pytest.raises(ConfigError, match=r'"\$inputs"'):
        spec_from_mapping({**base, "body": {"images": "x"}})
    yaml_file = tmp_path / "spec.yaml"
    yaml_file.write_text("url: http://127.0.0.1:9/x\noutput: labels\nresponse: data[0].label\n")
    pytest.importorskip("yaml")
    assert load_spec(yaml_file).output == "labels"
    assert "abc" not in repr(spec_from_mapping({**base, "token_env": "ABC"}))


def test_key_paths() -> None:
    answer = {"data": [{"p": [1, 2]}, {"p": [3, 4]}], "meta": {"n": 2}}
    assert read_path(answer, "data[*].p") == [[1, 2], [3, 4]]
    assert read_path(answer, "data[1].p[0]") == 3
    assert read_path(answer, "meta.n") == 2
    with pytest.raises(ModelError, match="no 'probs' at data\\[0\\]"):
        read_path(answer, "data[*].probs")


def test_the_budget_and_a_resumed_run_never_pay_twice(tmp_path: Path) -> None:
    """An attack stopped part-way (here: the vendor budget runs out) and rerun with the same seed replays every
    answered query from the ledger and pays only for the rest; the result is the uninterrupted run's."""
    model = small_model()
    x, y = images(4)
    threat = robustlab.ThreatModel("linf", 0.1)
    vendor = Vendor(model)
    run: dict[str, Any] = {"method": "square", "queries": 80, "seed": 5}
    with serving(vendor) as url:
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        with contextlib.closing(_endpoint(write_spec(fresh, url, batch_size=8))) as endpoint:
            whole = robustlab.attack(ScoreOracle(endpoint, budget=80), x, y, threat, **run)
        uninterrupted, vendor.images = vendor.images, 0
        spec = write_spec(tmp_path, url, batch_size=8, budget=uninterrupted // 2)
        with contextlib.closing(_endpoint(spec)) as endpoint:
            stopped = robustlab.attack(ScoreOracle(endpoint, budget=80), x, y, threat, **run)
            assert "budget of" in stopped.extras["interrupted"] and endpoint.ledger.spent <= uninterrupted // 2
        first = vendor.images
        assert 0 < first <= uninterrupted // 2
        raised = json.loads(spec.read_text())
        raised["budget"] = uninterrupted
        spec.write_text(json.dumps(raised))
        with contextlib.closing(_endpoint(spec)) as endpoint:
            resumed = robustlab.attack(ScoreOracle(endpoint, budget=80), x, y, threat, **run)
            assert endpoint.ledger.paid == uninterrupted and endpoint.ledger.hits >= first
    assert vendor.images == uninterrupted  # the first part was not asked again
    assert torch.equal(resumed.x_adv, whole.x_adv) and torch.equal(resumed.queries, whole.queries)


def _endpoint(spec: Path) -> EndpointModel:
    model = connect_spec(spec).model
    assert isinstance(model, EndpointModel)
    return model


KILLED_RUN = """
import sys, torch, robustlab
from robustlab.oracles import ScoreOracle
from robustlab.vendor import connect_spec
from tests.test_vendor import images
x, y = images(4)
oracle = connect_spec(sys.argv[1], budget=150)
robustlab.attack(oracle, x, y, robustlab.ThreatModel("linf", 0.1), "square", queries=150, seed=7)
print("finished", flush=True)
"""


def test_a_killed_run_resumes_from_the_ledger_without_paying_again(tmp_path: Path) -> None:
    model = small_model()
    x, y = images(4)
    threat = robustlab.ThreatModel("linf", 0.1)
    vendor = Vendor(model)
    with serving(vendor) as url:
        reference = tmp_path / "reference"
        reference.mkdir()
        with contextlib.closing(_endpoint(write_spec(reference, url))) as endpoint:
            whole = robustlab.attack(ScoreOracle(endpoint, budget=150), x, y, threat, "square", queries=150, seed=7)
        uninterrupted, vendor.images = vendor.images, 0
        spec = write_spec(tmp_path, url)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(spec)], env=env, stdout=subprocess.PIPE)
        deadline = time.time() + 60
        while vendor.images < uninterrupted // 3 and time.time() < deadline and process.poll() is None:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        before = vendor.images
        assert 0 < before < uninterrupted, "the run was not killed part-way"
        with contextlib.closing(_endpoint(spec)) as endpoint:
            in_flight = endpoint.ledger.unresolved  # sent, maybe answered, never recorded: counted as spent
            assert endpoint.ledger.paid <= before <= endpoint.ledger.paid + in_flight  # no answered query unrecorded
            resumed = robustlab.attack(ScoreOracle(endpoint, budget=150), x, y, threat, "square", queries=150, seed=7)
    assert torch.equal(resumed.x_adv, whole.x_adv) and torch.equal(resumed.queries, whole.queries)
    # Only images in flight at the kill can have been answered twice: at most one request of batch_size each.
    assert uninterrupted <= vendor.images <= uninterrupted + in_flight


def test_a_ledger_of_another_endpoint_or_a_pickle_is_refused(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "http://127.0.0.1:9")
    ledger = tmp_path / "vendor.json.ledger.jsonl"
    ledger.write_text(json.dumps({"format": "robustlab-endpoint-ledger", "version": 1, "endpoint": "other"}) + "\n")
    with pytest.raises(StateFileError, match="belongs to another endpoint spec"):
        connect_spec(spec)
    ledger.write_bytes(b"\x80\x04\x95 pickle")
    with pytest.raises(StateFileError, match="never unpickled"):
        connect_spec(spec)
    header = {"format": "robustlab-endpoint-ledger", "version": 1, "endpoint": load_spec(spec).identity()}
    ledger.write_text(json.dumps(header) + "\n" + json.dumps({"answered": "r1", "rows": 2}) + "\n{}\n")
    with pytest.raises(StateFileError, match="malformed record at line 2"):
        connect_spec(spec)


def test_an_endpoint_rejecting_the_request_says_why(tmp_path: Path) -> None:
    vendor = Vendor(small_model())
    with serving(vendor) as url:
        endpoint = _endpoint(write_spec(tmp_path, url, body={"model": "m1", "pixels": "$inputs"}))
        with pytest.raises(InvalidInputError, match=r"rejected the request \(422\): .*the body has no instances"):
            endpoint(images(2)[0])
        endpoint.close()


def test_a_timed_out_request_counts_as_maybe_billed_and_is_not_lost(tmp_path: Path) -> None:
    vendor = Vendor(small_model())
    vendor.mode = "slow"  # answers after 0.4 s, past the client's 0.1 s timeout, and bills the images anyway
    x, _ = images(3)
    with serving(vendor) as url:
        endpoint = _endpoint(write_spec(tmp_path, url, timeout=0.1, retries=1, backoff=0.01))
        with pytest.raises(ModelError, match=r"cannot reach the endpoint .*ReadTimeout"):
            endpoint(x)
        endpoint.close()
    ledger = _endpoint(write_spec(tmp_path, url)).ledger
    assert vendor.images == 6 == ledger.spent and ledger.paid == 0 and ledger.uncertain == 6
