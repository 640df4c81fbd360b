"""Serve a model as a real HTTP endpoint that answers scores or labels only.

``robustlab serve --model M --mode labels --port 8000 --token T --budget 100000`` starts a FastAPI application under
uvicorn implementing the protocol of :mod:`robustlab.remote`. It is what teams expose when a model must be
evaluated as a black box, and what robustlab's tests attack over loopback.

Guarantees: in ``labels`` mode no score ever leaves the server; every answered row is counted against the calling
client's budget (identified by its bearer token, or, when budgets are declared advisory, by ``X-Client-Id``), and a
request repeated with the same ``request_id`` and the same inputs is answered from a cache without being counted
again (the same id with other inputs is a 409). A request is authenticated from its headers before any of its body
is read; the body is counted as it arrives and cut off at the byte limit (chunked uploads too), its values are
counted before it is parsed, and it is parsed and checked (JSON shape, numbers only, input shape, NaN/Inf, input
bounds, rows per request) off the event loop, so ``/health`` keeps answering. Rejections are 4xx with a message, and
the server keeps serving. Usage counts can be persisted to a JSON file (never a pickle) so budgets survive a
restart. The model is run once at start-up on an input of the declared shape, so a wrong shape or class count stops
the server from starting instead of failing every request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import math
import os
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from torch import Tensor, nn

from robustlab.errors import ConfigError, ModelError, RobustlabError, StateFileError
from robustlab.oracles import check_model_takes, module_function, naming_forward_failures
from robustlab.remote import encode_array

__all__ = ["ServerConfig", "check_port", "client_key", "create_app", "run_server"]

ANSWER_CACHE_ENTRIES = 4096  # answers kept for retried request ids ...
ANSWER_CACHE_BYTES = 64 * 1024 * 1024  # ... and the most memory they may take
MAX_REQUEST_ID = 128
MAX_CLIENT_ID = 128
_LEGACY_TOKEN_KEY = re.compile(r"token-(\d+)")
# On a refusal before the whole body is read: the server closes the connection instead of reading (and dropping)
# the rest of an upload that may never end.
_CLOSE = {"Connection": "close"}


class ServerConfig:
    """Settings of a model server.

    Args:
        mode: "scores" (logits) or "labels" (top-1 only).
        input_shape: shape of one input, e.g. (1, 28, 28).
        num_classes: number of classes the model outputs (None: the width of its output at start-up).
        bounds: the valid input range; inputs outside it are rejected.
        token: the bearer token (or tokens: one per client) every request must carry (None: no authentication).
        budget: queries (rows) per client — per token — None for unlimited.
        max_batch: rows per request; max_body: bytes per request body.
        state_file: where usage counts are persisted (JSON), so budgets survive restarts.
        trust_client_id: allow a budget without tokens, counted per ``X-Client-Id`` header. Any client can reset it
            by sending another id, so such a budget is advisory; a warning says so.

    Raises:
        ConfigError: a setting that cannot work (non-positive shape, empty bounds, a budget anyone can bypass, ...).
    """

    def __init__(
        self,
        *,
        mode: str,
        input_shape: Sequence[int],
        num_classes: int | None = None,
        bounds: Sequence[float] = (0.0, 1.0),
        token: str | Sequence[str] | None = None,
        budget: int | None = None,
        max_batch: int = 4096,
        max_body: int = 64 * 1024 * 1024,
        state_file: str | Path | None = None,
        trust_client_id: bool = False,
    ) -> None:
        if mode not in ("scores", "labels"):
            raise ConfigError(f"mode must be 'scores' or 'labels', got {mode!r}")
        shape = list(input_shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ConfigError(f"the input shape must be one or more positive sizes (e.g. 1 28 28), got {shape}")
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
            raise ConfigError(f"the number of classes must be positive, got {num_classes}")
        if len(bounds) != 2 or any(math.isnan(float(b)) for b in bounds) or not float(bounds[0]) < float(bounds[1]):
            raise ConfigError(f"the input bounds must be LOW HIGH with LOW < HIGH, got {[float(b) for b in bounds]}")
        tokens = [token] if isinstance(token, str) else list(token or [])
        for t in tokens:
            if not isinstance(t, str) or not t or any(c.isspace() or not c.isprintable() for c in t):
                raise ConfigError("tokens must be non-empty strings without spaces or control characters")
        if len(set(tokens)) != len(tokens):
            raise ConfigError("the same token is given twice; give each client its own token")
        if budget is not None and budget < 1:
            raise ConfigError(f"the budget must be a positive number of queries, got {budget}")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be positive, got {max_batch}")
        if max_body < 1:
            raise ConfigError(f"max_body must be a positive number of bytes, got {max_body}")
        if budget is not None and not tokens:
            if not trust_client_id:
                raise ConfigError(
                    "a budget without tokens can be bypassed: clients choose their own X-Client-Id. Give each client "
                    "a --token, or accept an advisory budget with --budget-per-client-id (trust_client_id=True)"
                )
            warnings.warn(
                "the budget is advisory: without tokens it is counted per X-Client-Id, which any client can change",
                UserWarning,
                stacklevel=2,
            )
        self.mode = mode
        self.input_shape = tuple(int(s) for s in shape)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.tokens = tokens
        self.budget = budget
        self.max_batch = max_batch
        self.max_body = max_body
        self.state_file = Path(state_file) if state_file is not None else None
        self.trust_client_id = trust_client_id

    @property
    def max_values(self) -> int:
        """Commas a well-formed request body can hold: the values and lists of ``max_batch`` nested-list rows."""
        lists, count = 1, self.max_batch
        for size in self.input_shape[:-1]:
            lists += count
            count *= size
        return self.max_batch * math.prod(self.input_shape) + lists + count + 64


def check_port(port: int) -> None:
    """Raise ConfigError unless ``port`` is a TCP port a server can listen on (1-65535)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"the port must be between 1 and 65535, got {port}")


def client_key(token: str) -> str:
    """The name a token's usage is counted under (and persisted as): a hash, never the token itself."""
    return "token:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:16]


class PredictRequest(BaseModel):
    """A batch of inputs: base64 float32 ``data`` with its ``shape``, or nested lists of numbers in ``inputs``."""

    data: str | None = Field(None, description="base64 of the little-endian float32 bytes of the batch")
    shape: list[int] | None = Field(None, description="shape of the batch: [rows, *input_shape]")
    inputs: list[Any] | None = Field(
        None, description="the batch as nested lists of numbers, shape [rows, *input_shape] (instead of data/shape)"
    )
    request_id: str | None = Field(
        None,
        max_length=MAX_REQUEST_ID,
        description="a retry with the same id and the same inputs is answered from a cache and not counted again; "
        "the same id with other inputs is refused (409)",
    )


class PredictResponse(BaseModel):
    """Labels (labels mode) or base64 float32 scores (scores mode), and the client's query counts."""

    labels: list[int] | None = None
    scores: str | None = Field(None, description="base64 float32 logits (scores mode only)")
    scores_shape: list[int] | None = None
    queries: int
    used: int
    remaining: int | None


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong bearer token (checked before the body is read)"},
    409: {"description": "request_id already used by this client with other inputs"},
    413: {"description": "body over the byte limit, or more rows (values) than the row limit"},
    415: {"description": "the body is not application/json"},
    422: {"description": "malformed body or inputs (shape, non-numbers, NaN/Inf, out of bounds)"},
    429: {"description": "the client's query budget is exhausted"},
}


@dataclass
class _Cached:
    digest: str
    answer: dict[str, Any]
    size: int


class _Ledger:
    """Per-client usage with idempotent requests, persisted to a JSON file when asked."""

    def __init__(self, budget: int | None, state_file: Path | None, tokens: Sequence[str]) -> None:
        self.budget = budget
        self.state_file = state_file
        self.lock = threading.Lock()
        self.answers: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self.cached_bytes = 0
        self.used: dict[str, int] = {} if state_file is None else _read_usage(state_file, tokens)

    def remaining(self, client: str) -> int | None:
        return None if self.budget is None else self.budget - self.used.get(client, 0)

    def remember(self, key: tuple[str, str], entry: _Cached) -> None:
        self.answers[key] = entry
        self.cached_bytes += entry.size
        while self.answers and (len(self.answers) > ANSWER_CACHE_ENTRIES or self.cached_bytes > ANSWER_CACHE_BYTES):
            _, dropped = self.answers.popitem(last=False)
            self.cached_bytes -= dropped.size

    def persist(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        tmp.write_text(json.dumps(self.used))
        os.replace(tmp, self.state_file)


def _read_usage(path: Path, tokens: Sequence[str]) -> dict[str, int]:
    """The usage counts in ``path`` (a JSON object of client -> non-negative count); never unpickled."""
    if not path.exists():
        return {}
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StateFileError(f"cannot read the state file {path}: {exc.strerror or exc}") from None
    if raw[:1] == b"\x80":
        raise StateFileError(
            f"the state file {path} looks like a pickle, not robustlab's JSON usage counts; robustlab never unpickles "
            "it: remove it or give another --state-file"
        )
    try:
        usage = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise StateFileError(
            f"the state file {path} is not valid JSON ({reason}): fix it, or remove it to reset the usage counts"
        ) from None
    if not isinstance(usage, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in usage.values()
    ):
        raise StateFileError(
            f"the state file {path} must map client names to non-negative query counts (as robustlab serve writes "
            "it): fix it, or remove it to reset the usage counts"
        )
    legacy = {k: v for k, v in usage.items() if _LEGACY_TOKEN_KEY.fullmatch(k)}
    if legacy and tokens:
        warnings.warn(
            f"the state file {path} counts usage by --token position (written by an older robustlab); the counts go "
            "to the tokens in today's order and are stored by token hash from now on",
            UserWarning,
            stacklevel=4,
        )
        for name, count in legacy.items():
            position = int(name.split("-")[1])
            if position < len(tokens):
                key = client_key(tokens[position])
                usage[key] = usage.get(key, 0) + count
                del usage[name]
    return dict(usage)


def _probe_value(bounds: tuple[float, float]) -> float:
    low, high = bounds
    if math.isinf(low) and math.isinf(high):
        return 0.0
    if math.isinf(high):
        return low
    if math.isinf(low):
        return high
    return 0.5 * (low + high)


def _check_model(model: nn.Module | Callable[[Tensor], Tensor], config: ServerConfig) -> int:
    """Run the model on two inputs of the declared shape; the number of classes it answers, or a usage error."""
    shape = [2, *config.input_shape]
    sample = torch.full(shape, _probe_value(config.bounds))
    names = {
        "data_name": "inputs of the declared shape",
        "hint": "Check --input-shape (or --data): the server must declare the input shape the model was made for",
    }
    try:
        if isinstance(model, nn.Module):
            weight = next(itertools.chain(model.parameters(), model.buffers()), None)
            outputs = check_model_takes(model, sample.to(weight.device if weight is not None else "cpu"), **names)
        else:
            with torch.no_grad(), naming_forward_failures(sample, **names):
                outputs = model(sample)
    except (RobustlabError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise ModelError(
            f"the model fails on inputs of the declared shape {shape[1:]} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); check --input-shape"
        ) from None
    if not isinstance(outputs, Tensor):
        raise ModelError(f"the model must return a tensor, it returned {type(outputs).__name__}")
    if outputs.dim() == 1 and config.mode == "labels" and outputs.shape[0] == 2:
        if config.num_classes is None:
            raise ConfigError("the model answers labels, not scores: give --num-classes")
        return config.num_classes
    if outputs.dim() != 2 or outputs.shape[0] != 2:
        raise ModelError(
            f"the model must answer scores of shape (batch, classes) for inputs of shape {shape[1:]}, "
            f"got {list(outputs.shape)}; check --input-shape"
        )
    width = int(outputs.shape[1])
    if config.num_classes is not None and width != config.num_classes:
        raise ModelError(
            f"the model answers {width} classes for inputs of shape {shape[1:]}, but the server was told "
            f"{config.num_classes} (--num-classes or --data)"
        )
    return width


class _Predictor:
    """Answers one parsed-and-checked request: idempotency by request id, budget, model call, the answer."""

    def __init__(self, config: ServerConfig, ledger: _Ledger, evaluate: Callable[[Tensor], Tensor]) -> None:
        self.config = config
        self.ledger = ledger
        self.evaluate = evaluate
        self.model_lock = threading.Lock()

    def answer(self, client: str, body: bytearray) -> dict[str, Any]:
        """Parse, check, count and evaluate one request (in a worker thread)."""
        payload = _parse_json(body, self.config)
        body.clear()  # the parsed payload is all that is needed from here on
        request_id = payload.get("request_id")
        if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_REQUEST_ID):
            raise HTTPException(422, f"request_id must be a string of at most {MAX_REQUEST_ID} characters")
        batch = _parse_batch(payload, self.config)
        del payload
        digest = hashlib.sha256(repr(batch.shape).encode() + batch.tobytes()).hexdigest()
        key = (client, request_id) if request_id is not None else None
        cached = self._charge(client, key, digest, int(batch.shape[0]))
        if cached is not None:
            return cached
        result, size = self._run_model(client, batch)
        with self.ledger.lock:
            result["used"] = self.ledger.used[client]
            result["remaining"] = self.ledger.remaining(client)
            if key is not None:
                self.ledger.remember(key, _Cached(digest, result, size + 256))
            self.ledger.persist()
        return result

    def _charge(self, client: str, key: tuple[str, str] | None, digest: str, rows: int) -> dict[str, Any] | None:
        """The cached answer of a repeated request (409 if its inputs differ), else count the rows (429 if the
        budget cannot pay for them) and return None."""
        ledger = self.ledger
        with ledger.lock:
            if key is not None and key in ledger.answers:
                cached = ledger.answers[key]
                if cached.digest != digest:
                    message = f"request_id {key[1]!r} was already used with other inputs; use a new id for them"
                    raise HTTPException(409, message)
                return cached.answer
            remaining = ledger.remaining(client)
            if remaining is not None and rows > remaining:
                raise HTTPException(
                    429, f"query budget exhausted: {rows} asked, {max(remaining, 0)} of {self.config.budget} left"
                )
            ledger.used[client] = ledger.used.get(client, 0) + rows
        return None

    def _run_model(self, client: str, batch: np.ndarray) -> tuple[dict[str, Any], int]:
        """The model's answer in the server's mode (labels only, or base64 scores) and its size in bytes."""
        rows = int(batch.shape[0])
        try:
            with self.model_lock, torch.no_grad():
                outputs = self.evaluate(torch.from_numpy(batch))
        except Exception as exc:
            with self.ledger.lock:
                self.ledger.used[client] -= rows  # a failed evaluation is not a query
            raise HTTPException(500, f"the model failed on the batch: {type(exc).__name__}") from exc
        result: dict[str, Any] = {"queries": rows}
        if self.config.mode == "labels":
            labels = outputs if outputs.dim() == 1 else outputs.argmax(dim=1)
            result["labels"] = [int(v) for v in labels.tolist()]
            return result, 16 * rows
        scores = outputs.detach().float().cpu().numpy()
        result["scores"] = encode_array(scores)
        result["scores_shape"] = list(scores.shape)
        return result, len(result["scores"])


def create_app(model: nn.Module | Callable[[Tensor], Tensor], config: ServerConfig) -> Any:
    """The FastAPI application serving ``model`` under ``config``.

    Raises:
        ModelError: the model fails on an input of the declared shape, or answers another number of classes.
        StateFileError: the state file cannot be read, or is not robustlab's JSON usage counts (a pickle is never
            unpickled).
        ConfigError: the state file cannot be written.
    """
    evaluate = module_function(model) if isinstance(model, nn.Module) else model
    num_classes = _check_model(model, config)
    ledger = _Ledger(config.budget, config.state_file, config.tokens)
    try:
        ledger.persist()  # a state file that cannot be written fails now, not on every request
    except OSError as exc:
        raise ConfigError(f"cannot write the state file {config.state_file}: {exc.strerror or exc}") from None
    predictor = _Predictor(config, ledger, evaluate)
    token_keys = [(t.encode("utf-8"), client_key(t)) for t in config.tokens]

    app = FastAPI(
        title="robustlab model server",
        version="1",
        description=f"A classifier answering {config.mode} for inputs of shape {list(config.input_shape)} in "
        f"[{config.bounds[0]}, {config.bounds[1]}]. See robustlab.remote for the client.",
    )

    def authenticate(request: Request) -> str:
        return _client_of(request.headers, config, token_keys)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        return {
            "mode": config.mode,
            "input_shape": list(config.input_shape),
            "num_classes": num_classes,
            "bounds": list(config.bounds),
            "max_batch": config.max_batch,
            "budget_per_client": config.budget,
            "authentication": bool(config.tokens),
        }

    @app.get("/v1/usage", responses={401: _ERRORS[401]})
    def usage(client: str = Depends(authenticate)) -> dict[str, Any]:
        with ledger.lock:
            return {"used": ledger.used.get(client, 0), "remaining": ledger.remaining(client)}

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
    )
    async def predict(request: Request) -> Any:
        try:
            client = _client_of(request.headers, config, token_keys)  # before a byte of the body is read
            content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise HTTPException(415, f"send the body as application/json, not {content_type!r}")
        except HTTPException as refusal:
            refusal.headers = {**(refusal.headers or {}), **_CLOSE}  # the unread body is not drained
            raise
        body = await _read_body(request, config)
        return await run_in_threadpool(predictor.answer, client, body)

    return app


def _client_of(headers: Mapping[str, str], config: ServerConfig, token_keys: Sequence[tuple[bytes, str]]) -> str:
    """The name the caller's usage is counted under, from its headers alone; 401 without a valid token."""
    if not config.tokens:
        client = headers.get("x-client-id") or "anonymous"
        if len(client) > MAX_CLIENT_ID:
            raise HTTPException(400, f"X-Client-Id must be at most {MAX_CLIENT_ID} characters")
        return "client:" + client
    scheme, _, presented = (headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise HTTPException(
            401, "missing bearer token: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"}
        )
    # Header values arrive as bytes decoded as latin-1: encoding back gives the bytes the client sent, which are
    # compared in constant time with each token's UTF-8 bytes (str comparison fails on non-ASCII text).
    sent = presented.strip().encode("latin-1", errors="replace")
    found = None
    for token, key in token_keys:
        if hmac.compare_digest(sent, token) and found is None:
            found = key
    if found is None:
        raise HTTPException(401, "wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
    return found


async def _read_body(request: Request, config: ServerConfig) -> bytearray:
    """The request body, counted as it arrives: 413 as soon as it passes the byte limit or holds too many values."""
    limit = config.max_body
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise HTTPException(413, f"a request body of {declared} bytes exceeds the limit of {limit}", headers=_CLOSE)
    body = bytearray()
    commas = 0
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise HTTPException(413, f"the request body exceeds the limit of {limit} bytes", headers=_CLOSE)
            commas += chunk.count(b",")
            if commas > config.max_values:
                raise _too_many_values(config)
            body += chunk
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before the whole body arrived") from None
    return body


def _too_many_values(config: ServerConfig) -> HTTPException:
    shape = ", ".join(map(str, config.input_shape))
    return HTTPException(
        413, f"the body holds more values than {config.max_batch} rows of shape [{shape}] can", headers=_CLOSE
    )


def _parse_json(body: bytearray, config: ServerConfig) -> dict[str, Any]:
    if body.count(b",") > config.max_values:
        raise _too_many_values(config)
    try:
        payload = json.loads(body)
    except RecursionError:
        raise HTTPException(422, "the JSON body nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a number with too many digits
        raise HTTPException(422, f"the body is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(payload, dict):
        raise HTTPException(422, "the body must be a JSON object with 'data' and 'shape', or 'inputs'")
    return payload


def _shape_text(config: ServerConfig) -> str:
    return f"[rows, {', '.join(map(str, config.input_shape))}]"


def _parse_batch(payload: dict[str, Any], config: ServerConfig) -> np.ndarray:
    data, inputs = payload.get("data"), payload.get("inputs")
    if (data is None) == (inputs is None):
        raise HTTPException(422, "send either 'data' (base64 float32) with 'shape', or 'inputs' (nested lists)")
    batch = _decode_data(data, payload.get("shape"), config) if data is not None else _nested(inputs, config)
    if not np.isfinite(batch).all():
        raise HTTPException(422, "inputs contain NaN or Inf")
    low, high = config.bounds
    if batch.min() < low - 1e-6 or batch.max() > high + 1e-6:
        raise HTTPException(
            422, f"inputs must lie in [{low}, {high}], got values in [{batch.min():.4g}, {batch.max():.4g}]"
        )
    return batch


def _check_rows(rows: int, config: ServerConfig) -> None:
    if rows == 0:
        raise HTTPException(422, "the batch is empty")
    if rows > config.max_batch:
        raise HTTPException(413, f"{rows} rows exceed the limit of {config.max_batch} per request")


def _decode_data(data: Any, shape: Any, config: ServerConfig) -> np.ndarray:
    if not isinstance(data, str):
        raise HTTPException(422, "'data' must be a base64 string")
    if shape is None:
        raise HTTPException(422, "'data' needs a 'shape'")
    if (
        not isinstance(shape, list)
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape)
        or len(shape) != len(config.input_shape) + 1
        or tuple(shape[1:]) != config.input_shape
    ):
        raise HTTPException(422, f"shape must be {_shape_text(config)}, got {str(shape)[:80]}")
    _check_rows(shape[0], config)
    expected = 4 * shape[0] * math.prod(config.input_shape)
    try:
        raw = bytearray()
        step = 4 * 256 * 1024  # decoded a slice at a time, so other threads (and /health) get the interpreter
        for start in range(0, len(data), step):
            raw += base64.b64decode(data[start : start + step], validate=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise HTTPException(422, f"malformed input data: 'data' is not base64 ({exc})") from None
    if len(raw) != expected:
        raise HTTPException(
            422, f"malformed input data: {len(raw)} bytes of float32 data cannot have shape {shape} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32, copy=False)


_NAMES = {bool: "true/false", str: "strings", type(None): "null", dict: "objects", list: "lists nested deeper"}


def _nested(inputs: Any, config: ServerConfig) -> np.ndarray:
    """Nested lists of numbers to a float32 array, checking rows, shape and value types before converting."""
    expected = _shape_text(config)
    if not isinstance(inputs, list):
        raise HTTPException(422, f"'inputs' must be nested lists of numbers of shape {expected}")
    _check_rows(len(inputs), config)
    batch = np.empty((len(inputs), *config.input_shape), dtype=np.float32)
    for index, row in enumerate(inputs):
        level: list[Any] = [row]
        for size in config.input_shape:
            below: list[Any] = []
            for item in level:
                if not isinstance(item, list) or len(item) != size:
                    raise HTTPException(422, f"inputs must have shape {expected}; row {index} does not")
                below.extend(item)
            level = below
        kinds = set(map(type, level)) - {int, float}
        if kinds:
            found = ", ".join(sorted(_NAMES.get(kind, kind.__name__) for kind in kinds))
            raise HTTPException(422, f"inputs must be numbers; row {index} holds {found} (shape {expected})")
        try:
            with np.errstate(over="ignore"):  # beyond float32: inf, refused below
                batch[index] = np.asarray(level, dtype=np.float32).reshape(config.input_shape)
        except OverflowError:
            raise HTTPException(422, "inputs contain NaN or Inf (a number too large for float32)") from None
    return batch


def run_server(app: Any, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn

    check_port(port)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
