"""Talking to a model behind an HTTP endpoint: the wire format, and the client that turns a URL into an oracle.

The protocol (served by :mod:`robustlab.serve`, documented in ``docs/serving.md`` and in the server's OpenAPI
schema at ``/openapi.json``):

- ``GET /health`` — liveness, no authentication.
- ``GET /v1/info`` — mode (``scores`` or ``labels``), input shape, number of classes, input bounds, batch limit.
- ``POST /v1/predict`` — body ``{"data": <base64 of little-endian float32>, "shape": [n, ...], "request_id": ...}``
  (or ``{"inputs": nested lists}``); answer ``{"scores": ...}`` or ``{"labels": [...]}`` plus the client's query
  counts. A repeated ``request_id`` with the same inputs is answered from a cache and not counted again, so retries
  are safe (the same id with other inputs is refused with 409).
- ``GET /v1/usage`` — the calling client's queries used and remaining.

Authentication is a bearer token (``Authorization: Bearer <token>``). Errors are JSON ``{"detail": message}``
with 400/401/409/413/415/422/429 for the client's mistakes and 5xx for the server's. A request is authenticated
before its body is read, and the body is cut off at the server's byte limit.

:func:`connect` returns a :class:`~robustlab.oracles.ScoreOracle` or :class:`~robustlab.oracles.LabelOracle`
depending on the server's mode, so every black-box attack, the evaluation and zeroth-order training run against a
URL unchanged. The client splits large batches, reuses one connection, retries transient failures (connection
errors, 502/503/504) with exponential backoff, and never double-counts a retried request.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustlab.errors import InvalidInputError, ModelError, QueryBudgetExceeded
from robustlab.oracles import LabelOracle, ScoreOracle

__all__ = ["RemoteModel", "connect", "decode_array", "encode_array"]

TRANSIENT_STATUS = {502, 503, 504}


def encode_array(array: np.ndarray) -> str:
    """Base64 of the little-endian float32 bytes of ``array``."""
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def decode_array(data: str, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`encode_array`; raises ValueError when the byte count does not match ``shape``."""
    raw = base64.b64decode(data, validate=True)
    count = int(np.prod(shape)) if len(shape) else 1
    if len(raw) != 4 * count:
        raise ValueError(f"{len(raw)} bytes of float32 data cannot have shape {list(shape)} ({4 * count} bytes)")
    return np.frombuffer(raw, dtype="<f4").reshape(shape)


class RemoteModel:
    """A model behind a robustlab endpoint, callable like a local one: ``scores = remote(x)``.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        token: bearer token, if the server requires one.
        timeout: seconds per request. retries: attempts after the first for transient failures; backoff: the first
            wait in seconds, doubled after each attempt.
        max_batch: rows per request (default: the server's limit).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.2,
        max_batch: int | None = None,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.retries = retries
        self.backoff = backoff
        self.rows_sent = 0  # rows the server answered for this client object
        self._info: dict[str, Any] | None = None
        self._max_batch = max_batch

    # -------------------------------------------------------------- plumbing
    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import httpx

        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                response = self._client.request(method, path, **kwargs)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                if attempt == self.retries:
                    raise ModelError(f"cannot reach the model server at {self.url}: {exc}") from exc
            else:
                if response.status_code not in TRANSIENT_STATUS:
                    return self._check(response)
                if attempt == self.retries:
                    raise ModelError(f"the model server at {self.url} kept failing ({response.status_code})")
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _check(self, response: Any) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:200]}
        if response.status_code < 400:
            return dict(body)
        detail = body.get("detail", body) if isinstance(body, dict) else body
        if response.status_code == 401:
            raise ModelError(f"the model server refused the credentials: {detail}")
        if response.status_code == 429:
            raise QueryBudgetExceeded(f"the model server's query budget is exhausted: {detail}")
        if response.status_code in (400, 409, 413, 415, 422):
            hint = ""
            if "must lie in" in str(detail):  # the server's input-box check
                hint = (
                    " (randomized smoothing and zeroth-order denoiser training query noisy or decoded inputs outside "
                    "the image box: serve the model with --bounds -inf inf for them; see docs/serving.md)"
                )
            raise InvalidInputError(f"the model server rejected the request: {detail}{hint}")
        raise ModelError(f"the model server failed ({response.status_code}): {detail}")

    # ------------------------------------------------------------------- API
    def info(self) -> dict[str, Any]:
        """The server's mode, input shape, classes, bounds and batch limit (cached)."""
        if self._info is None:
            self._info = self._request("GET", "/v1/info")
        return self._info

    @property
    def mode(self) -> str:
        return str(self.info()["mode"])

    @property
    def num_classes(self) -> int:
        return int(self.info()["num_classes"])

    def usage(self) -> dict[str, Any]:
        """Queries this client has used and has left, as counted by the server."""
        return self._request("GET", "/v1/usage")

    def __call__(self, x: Tensor) -> Tensor:
        limit = self._max_batch or int(self.info()["max_batch"])
        outputs = []
        for start in range(0, x.shape[0], limit):
            chunk = x[start : start + limit].detach().to("cpu", torch.float32).numpy()
            body = {"data": encode_array(chunk), "shape": list(chunk.shape), "request_id": uuid.uuid4().hex}
            answer = self._request("POST", "/v1/predict", json=body)
            self.rows_sent += chunk.shape[0]
            if "labels" in answer:
                outputs.append(torch.tensor(answer["labels"], dtype=torch.long))
            else:
                scores = decode_array(answer["scores"], answer["scores_shape"])
                outputs.append(torch.from_numpy(scores.copy()))
        return torch.cat(outputs).to(x.device)

    def close(self) -> None:
        self._client.close()


def connect(
    url: str, *, token: str | None = None, budget: int | None = None, **options: Any
) -> ScoreOracle | LabelOracle:
    """An oracle for the model at ``url``: a ScoreOracle for a scores server, a LabelOracle for a labels server.

    ``budget`` is the per-example query budget the oracle enforces on the client side (the server may enforce a
    per-client total on top).
    """
    remote = RemoteModel(url, token=token, **options)
    try:
        info = remote.info()
    except BaseException:  # refused credentials, no server, ...: do not leave the connection open
        remote.close()
        raise
    oracle_type = ScoreOracle if info["mode"] == "scores" else LabelOracle
    return oracle_type(remote, num_classes=int(info["num_classes"]), budget=budget)
