"""Serve a model as a real HTTP endpoint that answers scores or labels only.

``robustlab serve --model M --mode labels --port 8000 --token T --budget 100000`` starts a FastAPI application under
uvicorn implementing the protocol of :mod:`robustlab.remote`. It is what teams expose when a model must be
evaluated as a black box, and what robustlab's tests attack over loopback.

Guarantees: in ``labels`` mode no score ever leaves the server; every answered row is counted against the calling
client's budget (identified by its bearer token, else by ``X-Client-Id``), and a request repeated with the same
``request_id`` is answered from a cache without being counted again; requests are validated (JSON shape, dtype,
input shape, NaN/Inf, input bounds, rows per request, body size) and rejected with 4xx and a message, and the
server keeps serving. Usage counts can be persisted to a file so budgets survive a restart.
"""

from __future__ import annotations

import hmac
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from torch import Tensor, nn

from robustlab.errors import ConfigError
from robustlab.oracles import module_function
from robustlab.remote import decode_array, encode_array

__all__ = ["ServerConfig", "create_app", "run_server"]


class ServerConfig:
    """Settings of a model server.

    Args:
        mode: "scores" (logits) or "labels" (top-1 only).
        input_shape: shape of one input, e.g. (1, 28, 28).
        num_classes: number of classes the model outputs.
        bounds: the valid input range; inputs outside it are rejected.
        token: the bearer token (or tokens: one per client) every request must carry (None: no authentication).
        budget: queries (rows) per client — per token, else per ``X-Client-Id`` header — None for unlimited.
        max_batch: rows per request; max_body: bytes per request.
        state_file: where usage counts are persisted (JSON), so budgets survive restarts.
    """

    def __init__(
        self,
        *,
        mode: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        bounds: tuple[float, float] = (0.0, 1.0),
        token: str | Sequence[str] | None = None,
        budget: int | None = None,
        max_batch: int = 4096,
        max_body: int = 64 * 1024 * 1024,
        state_file: str | Path | None = None,
    ) -> None:
        if mode not in ("scores", "labels"):
            raise ConfigError(f"mode must be 'scores' or 'labels', got {mode!r}")
        if budget is not None and budget < 1:
            raise ConfigError(f"the budget must be a positive number of queries, got {budget}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be positive, got {max_batch}")
        self.mode = mode
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        tokens = [token] if isinstance(token, str) else list(token or [])
        if any(not t for t in tokens):
            raise ConfigError("tokens must be non-empty strings")
        self.tokens = tokens
        self.budget = budget
        self.max_batch = max_batch
        self.max_body = max_body
        self.state_file = Path(state_file) if state_file is not None else None


class PredictRequest(BaseModel):
    """A batch of inputs: base64 float32 ``data`` with its ``shape``, or nested lists in ``inputs``."""

    data: str | None = Field(None, description="base64 of the little-endian float32 bytes of the batch")
    shape: list[int] | None = Field(None, description="shape of the batch: [rows, *input_shape]")
    inputs: list[Any] | None = Field(None, description="the batch as nested lists (instead of data/shape)")
    request_id: str | None = Field(None, max_length=128, description="retries with the same id are not counted")


class PredictResponse(BaseModel):
    """Labels (labels mode) or base64 float32 scores (scores mode), and the client's query counts."""

    labels: list[int] | None = None
    scores: str | None = Field(None, description="base64 float32 logits (scores mode only)")
    scores_shape: list[int] | None = None
    queries: int
    used: int
    remaining: int | None


class _Ledger:
    """Per-client usage with idempotent requests, persisted to a file when asked."""

    def __init__(self, budget: int | None, state_file: Path | None) -> None:
        self.budget = budget
        self.state_file = state_file
        self.used: dict[str, int] = {}
        self.lock = threading.Lock()
        self.answers: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        if state_file is not None and state_file.exists():
            self.used = {str(k): int(v) for k, v in json.loads(state_file.read_text()).items()}

    def remaining(self, client: str) -> int | None:
        return None if self.budget is None else self.budget - self.used.get(client, 0)

    def persist(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.used))
        os.replace(tmp, self.state_file)


def create_app(model: nn.Module | Callable[[Tensor], Tensor], config: ServerConfig) -> Any:
    """The FastAPI application serving ``model`` under ``config``."""
    evaluate = module_function(model) if isinstance(model, nn.Module) else model
    ledger = _Ledger(config.budget, config.state_file)
    model_lock = threading.Lock()

    app = FastAPI(
        title="robustlab model server",
        version="1",
        description=f"A classifier answering {config.mode} for inputs of shape {list(config.input_shape)} in "
        f"[{config.bounds[0]}, {config.bounds[1]}]. See robustlab.remote for the client.",
    )

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body:
            return JSONResponse(
                {"detail": f"request body of {length} bytes exceeds the limit of {config.max_body}"}, status_code=413
            )
        return await call_next(request)

    def client_id(authorization: str | None = Header(None), x_client_id: str | None = Header(None)) -> str:
        if config.tokens:
            if authorization is None or not authorization.startswith("Bearer "):
                raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'")
            presented = authorization[len("Bearer ") :]
            for number, token in enumerate(config.tokens):
                if hmac.compare_digest(presented, token):
                    return f"token-{number}"
            raise HTTPException(401, "wrong bearer token")
        return "client:" + (x_client_id or "anonymous")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        return {
            "mode": config.mode,
            "input_shape": list(config.input_shape),
            "num_classes": config.num_classes,
            "bounds": list(config.bounds),
            "max_batch": config.max_batch,
            "budget_per_client": config.budget,
            "authentication": bool(config.tokens),
        }

    @app.get("/v1/usage")
    def usage(client: str = Depends(client_id)) -> dict[str, Any]:
        with ledger.lock:
            return {"used": ledger.used.get(client, 0), "remaining": ledger.remaining(client)}

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True)
    def predict(request: PredictRequest, client: str = Depends(client_id)) -> dict[str, Any]:
        key = (client, request.request_id) if request.request_id else None
        if key is not None:
            with ledger.lock:
                if key in ledger.answers:
                    return ledger.answers[key]
        batch = _parse_batch(request.data, request.shape, request.inputs, config)
        rows = int(batch.shape[0])
        with ledger.lock:
            remaining = ledger.remaining(client)
            if remaining is not None and rows > remaining:
                raise HTTPException(
                    429, f"query budget exhausted: {rows} asked, {max(remaining, 0)} of {config.budget} left"
                )
            ledger.used[client] = ledger.used.get(client, 0) + rows
        try:
            with model_lock:
                outputs = evaluate(torch.from_numpy(batch))
        except Exception as exc:
            with ledger.lock:
                ledger.used[client] -= rows  # a failed evaluation is not a query
            raise HTTPException(500, f"the model failed on the batch: {type(exc).__name__}") from exc
        answer: dict[str, Any] = {"queries": rows}
        if config.mode == "labels":
            labels = outputs if outputs.dim() == 1 else outputs.argmax(dim=1)
            answer["labels"] = [int(v) for v in labels.tolist()]
        else:
            scores = outputs.detach().float().cpu().numpy()
            answer["scores"] = encode_array(scores)
            answer["scores_shape"] = list(scores.shape)
        with ledger.lock:
            answer["used"] = ledger.used[client]
            answer["remaining"] = ledger.remaining(client)
            if key is not None:
                ledger.answers[key] = answer
                while len(ledger.answers) > 4096:
                    ledger.answers.popitem(last=False)
            ledger.persist()
        return answer

    return app


def _parse_batch(
    data: str | None, shape: list[int] | None, inputs: list[Any] | None, config: ServerConfig
) -> np.ndarray:
    if (data is None) == (inputs is None):
        raise HTTPException(422, "send either 'data' (base64 float32) with 'shape', or 'inputs' (nested lists)")
    try:
        if data is not None:
            if shape is None:
                raise HTTPException(422, "'data' needs a 'shape'")
            if len(shape) != len(config.input_shape) + 1 or any(s < 0 for s in shape):
                raise HTTPException(422, f"shape must be [rows, {', '.join(map(str, config.input_shape))}]")
            if shape[0] > config.max_batch:
                raise HTTPException(413, f"{shape[0]} rows exceed the limit of {config.max_batch} per request")
            batch = decode_array(data, shape)
        else:
            batch = np.asarray(inputs, dtype=np.float32)
    except HTTPException:
        raise
    except (ValueError, TypeError) as exc:
        raise HTTPException(422, f"malformed input data: {exc}") from exc
    if batch.ndim != len(config.input_shape) + 1 or tuple(batch.shape[1:]) != config.input_shape:
        raise HTTPException(
            422, f"inputs must have shape [rows, {', '.join(map(str, config.input_shape))}], got {list(batch.shape)}"
        )
    if batch.shape[0] == 0:
        raise HTTPException(422, "the batch is empty")
    if batch.shape[0] > config.max_batch:
        raise HTTPException(413, f"{batch.shape[0]} rows exceed the limit of {config.max_batch} per request")
    if not np.isfinite(batch).all():
        raise HTTPException(422, "inputs contain NaN or Inf")
    low, high = config.bounds
    if batch.min() < low - 1e-6 or batch.max() > high + 1e-6:
        raise HTTPException(
            422, f"inputs must lie in [{low}, {high}], got values in [{batch.min():.4g}, {batch.max():.4g}]"
        )
    return np.array(batch, dtype=np.float32)


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
