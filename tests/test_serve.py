"""A real model server on a loopback port: attacks through HTTP, auth, budgets, validation, retries, load."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

import robustlab
from robustlab.certification import load_denoiser
from robustlab.remote import RemoteModel, connect, encode_array
from robustlab.serve import ServerConfig, create_app


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 10)).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def live_server(model: nn.Module, port: int | None = None, **settings: Any) -> Iterator[str]:
    import uvicorn

    config = ServerConfig(input_shape=(1, 6, 6), num_classes=10, **{"mode": "scores", **settings})
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model, config), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 20
    while time.time() < deadline and thread.is_alive():
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        time.sleep(0.05)
    # Fail here, with the reason, rather than later in whatever the test asks of a server that is not there.
    assert server.started and thread.is_alive(), f"the test server did not start on port {port}"
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    return x, small_model()(x).argmax(1)


@pytest.mark.parametrize(("mode", "method", "options"), [
    ("scores", "square", {"queries": 300}),
    ("scores", "zo-fw", {"queries": 400}),
    ("labels", "rays", {"queries": 300}),
])  # fmt: skip
def test_attacks_over_http_match_in_process(mode: str, method: str, options: dict) -> None:
    model = small_model()
    x, y = batch()
    threat = robustlab.ThreatModel("linf", 0.1)
    local = robustlab.attack(model, x, y, threat, method, seed=3, **options)
    with live_server(model, mode=mode) as url:
        oracle = connect(url, budget=options["queries"])
        remote = robustlab.attack(oracle, x, y, threat, method, seed=3, **options)
        server_count = oracle.model.usage()["used"]  # type: ignore[attr-defined]
    assert torch.equal(remote.success, local.success)
    assert torch.allclose(remote.x_adv, local.x_adv, atol=1e-6)
    assert torch.equal(remote.queries, local.queries)
    # Both sides count the same queries: the attack's, the class probe and the re-check.
    assert server_count == int(remote.queries.sum() + remote.audits.sum())


def test_labels_mode_reveals_only_labels() -> None:
    x, _ = batch(3)
    with live_server(small_model(), mode="labels") as url:
        body = {"data": encode_array(x.numpy()), "shape": list(x.shape)}
        answer = httpx.post(url + "/v1/predict", json=body).json()
        assert set(answer) <= {"labels", "queries", "used", "remaining"} and "labels" in answer
        assert all(isinstance(v, int) for v in answer["labels"])
        oracle = connect(url)
        assert isinstance(oracle, robustlab.LabelOracle) and not isinstance(oracle, robustlab.ScoreOracle)
        error = httpx.post(url + "/v1/predict", json={"inputs": (x * 5).tolist()}).json()
        assert "scores" not in json.dumps(error)


def test_auth_and_budget_are_enforced() -> None:
    x, _ = batch(4)
    with live_server(small_model(), token=["alpha", "beta"], budget=10) as url:
        assert httpx.post(url + "/v1/predict", json={"inputs": x.tolist()}).status_code == 401
        wrong = httpx.post(url + "/v1/predict", json={"inputs": x.tolist()}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "wrong bearer token" in wrong.json()["detail"]
        with pytest.raises(robustlab.ModelError, match="refused the credentials"):
            RemoteModel(url, token="nope")(x)
        alpha = RemoteModel(url, token="alpha")
        alpha(x)
        alpha(x)
        with pytest.raises(robustlab.QueryBudgetExceeded, match="budget exhausted"):
            alpha(x)
        assert alpha.usage() == {"used": 8, "remaining": 2}
        beta = RemoteModel(url, token="beta")
        assert beta(x).shape == (4, 10)  # budgets are per client
        assert beta.usage()["used"] == 4 == beta.rows_sent


def test_malformed_requests_are_rejected_and_the_server_keeps_serving() -> None:
    x, _ = batch(2)
    with live_server(small_model(), max_batch=16, max_body=200_000) as url:
        post = lambda **kw: httpx.post(url + "/v1/predict", **kw)  # noqa: E731
        cases = [
            (post(content=b"{not json", headers={"content-type": "application/json"}), 422),
            (post(json={"inputs": [[1.0, 2.0]]}), 422),  # wrong shape
            (
                post(
                    content=json.dumps({"inputs": torch.full((1, 1, 6, 6), float("nan")).tolist()}),
                    headers={"content-type": "application/json"},
                ),
                422,
            ),
            (post(json={"inputs": (x + 3).tolist()}), 422),  # out of bounds
            (post(json={"data": "!!!", "shape": [1, 1, 6, 6]}), 422),
            (post(json={"data": encode_array(x.numpy()), "shape": [3, 1, 6, 6]}), 422),  # bytes do not match
            (post(json={"inputs": torch.rand(17, 1, 6, 6).tolist()}), 413),  # too many rows
            (post(json={"inputs": torch.rand(16, 1, 6, 6).tolist(), "pad": "x" * 300_000}), 413),  # body too big
            (post(json={}), 422),
        ]
        for response, status in cases:
            assert response.status_code == status, response.text
            assert "detail" in response.json()
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        assert RemoteModel(url)(x).shape == (2, 10)


def test_retries_survive_a_server_restart_without_losing_counts(tmp_path: Path) -> None:
    model = small_model()
    x, _ = batch(4)
    port = free_port()
    state = tmp_path / "usage.json"
    with live_server(model, port=port, token="t", state_file=state) as url:
        client = RemoteModel(url, token="t", retries=8, backoff=0.1)
        client(x)
    result: dict[str, Any] = {}

    def call_during_downtime() -> None:
        result["scores"] = client(x)

    caller = threading.Thread(target=call_during_downtime)
    caller.start()  # the server is down: the client retries with backoff
    time.sleep(0.4)
    with live_server(model, port=port, token="t", state_file=state):
        caller.join(timeout=30)
        assert result["scores"].shape == (4, 10)
        assert client.usage()["used"] == 8 == client.rows_sent  # the usage file carried the count over


def test_repeated_request_ids_are_not_counted_twice() -> None:
    x, _ = batch(3)
    with live_server(small_model()) as url:
        body = {"data": encode_array(x.numpy()), "shape": list(x.shape), "request_id": "abc"}
        first = httpx.post(url + "/v1/predict", json=body).json()
        second = httpx.post(url + "/v1/predict", json=body).json()
        assert first == second and first["used"] == 3


def test_an_attack_stopped_by_the_server_budget_returns_its_best_so_far() -> None:
    model = small_model()
    x, y = batch(6)
    with live_server(model, mode="scores", budget=900, token="t") as url:
        oracle = connect(url, token="t")
        result = robustlab.attack(oracle, x, y, robustlab.ThreatModel("linf", 0.15), "square", queries=5000, seed=0)
    assert "interrupted" in result.extras
    assert bool(result.success.any())  # what it had found before the server said no is kept
    assert bool(robustlab.ThreatModel("linf", 0.15).contains(result.x_adv, x).all())
    with torch.no_grad():
        assert torch.equal(model(result.x_adv).argmax(1) != y, result.success)


def test_bounded_load_from_concurrent_clients() -> None:
    x, _ = batch(4)
    errors: list[str] = []
    with live_server(small_model(), token="t") as url:

        def worker() -> None:
            client = RemoteModel(url, token="t")
            for _ in range(125):
                try:
                    client(x)
                except Exception as exc:  # collected, not raised in the thread
                    errors.append(repr(exc))
            client.close()

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert RemoteModel(url, token="t").usage()["used"] == 8 * 125 * 4
    assert errors == []


def test_evaluation_through_http_matches_in_process() -> None:
    from robustlab.evaluation import Suite, evaluate

    model = small_model()
    x, y = batch(12)
    threat = robustlab.ThreatModel("linf", 0.1)
    suite = Suite.custom([("square", {"queries": 200}), ("rays", {"queries": 200})])
    local = evaluate(robustlab.ScoreOracle(lambda z: model(z)), (x, y), threat, suite, progress=False)
    with live_server(model, mode="scores") as url:
        remote = evaluate(connect(url), (x, y), threat, suite, progress=False)
    assert torch.equal(remote.broken, local.broken)
    assert remote.robust_accuracy == local.robust_accuracy
    assert remote.diagnostics[0].name == "black_box_access"
    with live_server(model, mode="labels") as url, pytest.raises(robustlab.ConfigError, match="labels access"):
        evaluate(connect(url), (x, y), threat, Suite.custom(["square"]), progress=False)


def test_cli_attacks_a_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from robustlab.cli import main

    closed: list[str] = []
    original_close = RemoteModel.close

    def close_and_note(self: RemoteModel) -> None:
        closed.append(self.url)
        original_close(self)

    monkeypatch.setattr(RemoteModel, "close", close_and_note)
    model = small_model()
    x, y = batch(10)
    data = tmp_path / "d.npz"
    import numpy as np

    np.savez(data, x=x.numpy(), y=y.numpy())
    with live_server(model, mode="labels", token="k") as url:
        out = tmp_path / "r.json"
        code = main(["attack", "--model", url, "--token", "k", "--data", str(data), "--method", "rays", "--eps", "0.2",
                     "--queries", "200", "--out", str(out), "--quiet"])  # fmt: skip
        assert code == 0
        assert json.loads(out.read_text())["examples"] == 10
        assert main(["attack", "--model", url, "--data", str(data), "--method", "rays", "--eps", "0.2", "--quiet"]) == 2
        assert closed == [url, url]  # both commands closed their connection, the refused one included
        # Zeroth-order denoiser training needs scores: a labels server is a usage error, not a crash.
        denoise = ["denoise", "--model", url, "--token", "k", "--data", str(data), "--method", "zo-ds", "--quiet"]
        assert main([*denoise, "--depth", "2", "--width", "2", "--out", str(tmp_path / "d.pt")]) == 2
        assert not (tmp_path / "d.pt").exists() and closed == [url, url, url]
    with live_server(model, mode="scores") as url:  # the image box: the noisy inputs of ZO-DS are refused
        denoise = ["denoise", "--model", url, "--data", str(data), "--method", "zo-ds", "--quiet", "--q", "3"]
        assert (
            main([*denoise, "--depth", "2", "--width", "2", "--batch-size", "5", "--out", str(tmp_path / "d.pt")]) == 2
        )
    assert "--bounds -inf inf" in capsys.readouterr().err
    with live_server(model, mode="scores", bounds=(float("-inf"), float("inf"))) as url:
        denoise = ["denoise", "--model", url, "--data", str(data), "--method", "zo-ds", "--quiet", "--q", "3"]
        assert (
            main([*denoise, "--depth", "2", "--width", "2", "--batch-size", "5", "--out", str(tmp_path / "d.pt")]) == 0
        )
        summary = load_denoiser(tmp_path / "d.pt").extra["summary"]
        assert summary["steps"] == 2 and summary["total_queries"] == 2 * 5 * 4 + 10


def _zo_ae_ds(black_box: object) -> object:
    from robustlab.certification import DenoisedConfig, train_denoiser_zo
    from robustlab.data import ArrayDataset
    from robustlab.zeroth_order import RGE

    torch.manual_seed(0)
    denoiser = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(36, 8))
    decoder = nn.Sequential(nn.Linear(8, 36), nn.Unflatten(1, (1, 6, 6)))
    x, _ = batch(32, seed=5)
    data = ArrayDataset(x, torch.zeros(32, dtype=torch.long), "toy", 10)
    config = DenoisedConfig(sigma=0.25, batch_size=8, epochs=1, seed=0)
    estimator = RGE(q=4, mu=0.005, difference="forward")
    return train_denoiser_zo(denoiser, data, black_box, estimator, config, encoder=encoder, decoder=decoder)  # type: ignore[arg-type]


def test_zo_ae_ds_and_smoothing_through_http_match_in_process() -> None:
    """Noisy and decoded inputs leave [0, 1]: a server for smoothing declares an unbounded input box."""
    from robustlab.certification import RandomizedSmoothing

    model = small_model()
    x, _ = batch(4, seed=9)
    local = _zo_ae_ds(model)
    local_cert = RandomizedSmoothing(model, 10, 0.25).certify(x, 20, 200, generator=torch.Generator().manual_seed(1))
    unbounded = (float("-inf"), float("inf"))
    with live_server(model, mode="scores", bounds=unbounded) as url:
        oracle = connect(url)
        remote = _zo_ae_ds(oracle)
        trained = oracle.model.usage()["used"]  # type: ignore[attr-defined]
    with live_server(model, mode="labels", bounds=unbounded) as url:
        labels = connect(url)
        smoothed = RandomizedSmoothing(labels, 10, 0.25)
        remote_cert = smoothed.certify(x, 20, 200, generator=torch.Generator().manual_seed(1))
        certified = labels.model.usage()["used"]  # type: ignore[attr-defined]
    assert remote.losses == local.losses  # type: ignore[attr-defined]
    assert remote.queries_per_step == local.queries_per_step  # type: ignore[attr-defined]
    assert trained == sum(local.queries_per_step) > 0  # type: ignore[attr-defined]
    assert torch.equal(remote_cert.prediction, local_cert.prediction)
    assert torch.allclose(remote_cert.radius, local_cert.radius)
    assert certified == 4 * (20 + 200)
