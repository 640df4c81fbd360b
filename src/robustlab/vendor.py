"""Vendors' HTTP APIs as black-box oracles, described by a small spec file (JSON, or YAML with PyYAML installed).

A vendor's classifier answers JSON in its own shape. A spec says how to reach it and read it::

    {"url": "https://api.example.com/v2/classify", "output": "scores", "response": "predictions[*].probs",
     "body": {"model": "v2", "instances": "$inputs"}, "encoding": "png", "batch_size": 16,
     "token_env": "VENDOR_TOKEN", "num_classes": 10, "rate_limit": 5, "concurrency": 4, "budget": 20000}

:func:`connect_spec` turns it into a :class:`~robustlab.oracles.ScoreOracle` (or LabelOracle), so every black-box
attack, the evaluation and zeroth-order denoiser training run against it unchanged and count their queries.

- **Secrets** never sit in the spec: ``token_env`` names the environment variable that holds the token, sent as
  ``token_header: token_prefix + token``. A spec with a literal token or Authorization header is refused.
- **Requests**: ``body`` is a JSON template in which the string ``"$inputs"`` becomes a list of up to
  ``batch_size`` encoded images, or ``"$input"`` one image per request. ``encoding`` is ``list`` (nested numbers,
  ``layout`` ``chw`` or ``hwc``, times ``scale``) or ``png`` (base64 PNG: 8-bit, so the endpoint answers for the
  image rounded to multiples of 1/255).
- **Answers**: ``response`` is a key path into the JSON answer: ``a.b``, ``[0]``, and ``[*]`` for every item of a
  list, e.g. ``predictions[*].probs``. Scores are lists of numbers, or ``{class name: score}`` with ``classes``;
  labels are indices or names in ``classes``. An answer that is not JSON (an HTML error page), has the wrong number
  of items or classes, or lacks the path is a ModelError naming what came back.
- **Traffic**: one ``httpx`` client with connection reuse, up to ``concurrency`` requests in flight, request starts
  spaced to at most ``rate_limit`` per second, ``timeout`` seconds each, and up to ``retries`` retries of 429 and
  5xx answers and connection failures with exponential back-off from ``backoff`` seconds, honouring
  ``Retry-After`` (which also holds back every other request).
- **Budget and ledger**: ``budget`` caps the images the vendor is asked about, across runs. The ledger (JSON lines,
  ``ledger``, by default ``<spec>.ledger.jsonl`` beside the spec; never a pickle) records each request before it is
  sent and its answers when they arrive, keyed by a hash of exactly what was sent. A query whose image was answered
  before, in this run or an earlier one, is answered from the ledger without a request: an interrupted attack rerun
  with the same seed replays its queries from the ledger for free and pays only for the ones it had not made. A
  request sent but never answered (in flight when the process was killed, or its answer lost to a read timeout)
  counts against the budget, since the vendor may have charged it; nothing is ever counted twice. Answers are
  reused only for the same endpoint (URL, body, encoding, response path); remove the ledger when the vendor changes
  its model.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import io
import json
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustlab.checks import check_choice, check_number, check_positive_int
from robustlab.errors import (
    ConfigError,
    DataNotFoundError,
    InvalidInputError,
    ModelError,
    QueryBudgetExceeded,
    StateFileError,
)
from robustlab.oracles import LabelOracle, ScoreOracle

__all__ = ["EndpointLedger", "EndpointModel", "EndpointSpec", "connect_spec", "load_spec", "read_path"]

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
LEDGER_FORMAT = "robustlab-endpoint-ledger"
_SECRET_FIELDS = ("token", "api_key", "apikey", "key", "secret", "password", "bearer")


@dataclass(frozen=True)
class EndpointSpec:
    """How to query one vendor endpoint (see the module docstring); checked when built.

    Required: ``url``, ``output`` (``scores`` or ``labels``) and ``response`` (the key path to them).
    """

    url: str
    output: str
    response: str
    method: str = "POST"
    body: Any = field(default_factory=lambda: {"inputs": "$inputs"})
    encoding: str = "list"
    layout: str = "chw"
    scale: float = 1.0
    batch_size: int = 32
    headers: Mapping[str, str] = field(default_factory=dict)
    token_env: str | None = None
    token_header: str = "Authorization"
    token_prefix: str = "Bearer "
    num_classes: int | None = None
    classes: tuple[str, ...] | None = None
    rate_limit: float | None = None
    concurrency: int = 4
    timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 60.0
    budget: int | None = None
    ledger: str | None = ""  # "": beside the spec; None (JSON null): no ledger file, answers kept in memory

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"url must be an http:// or https:// address, got {self.url!r}")
        check_choice("output", self.output, ("scores", "labels"))
        check_choice("method", self.method, ("POST", "PUT"))
        check_choice("encoding", self.encoding, ("list", "png"))
        check_choice("layout", self.layout, ("chw", "hwc"))
        check_number("scale", self.scale, low=0, low_open=True)
        check_positive_int("batch_size", self.batch_size)
        check_positive_int("concurrency", self.concurrency)
        check_positive_int("num_classes", self.num_classes, allow_none=True)
        check_positive_int("budget", self.budget, allow_none=True)
        check_positive_int("retries", self.retries, minimum=0)
        for name in ("timeout", "backoff", "max_backoff"):
            check_number(name, getattr(self, name), low=0, low_open=True)
        if self.rate_limit is not None:
            check_number("rate_limit", self.rate_limit, low=0, low_open=True)
        parse_path(self.response)
        placeholders = _placeholders(self.body)
        if placeholders not in ({"$inputs"}, {"$input"}):
            raise ConfigError('body must hold the string "$inputs" (a list of images) or "$input" (one image) once')
        if "$input" in placeholders and self.batch_size != 1:
            object.__setattr__(self, "batch_size", 1)  # one image per request
        for name in self.headers:
            if name.lower() in ("authorization", "x-api-key", "api-key") or name.lower() == self.token_header.lower():
                raise ConfigError(
                    f"the spec sets the {name} header itself: tokens never go in spec files; put the token in an "
                    "environment variable and name it with token_env"
                )
        if self.classes is not None and self.num_classes is not None and len(self.classes) != self.num_classes:
            raise ConfigError(f"classes lists {len(self.classes)} names but num_classes is {self.num_classes}")

    @property
    def classes_count(self) -> int | None:
        return self.num_classes if self.num_classes is not None else (len(self.classes) if self.classes else None)

    def identity(self) -> str:
        """What makes two answers comparable: the same URL, request shape and reading of the answer."""
        keys = ("url", "method", "body", "encoding", "layout", "scale", "response", "output", "classes")
        text = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def __repr__(self) -> str:  # the headers may say how the vendor authenticates; never what the token is
        return f"EndpointSpec(url={self.url!r}, output={self.output!r}, response={self.response!r})"


def _placeholders(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value} if value in ("$inputs", "$input") else set()
    if isinstance(value, Mapping):
        found: set[str] = set()
        for item in value.values():
            found |= _placeholders(item)
        return found
    if isinstance(value, list):
        return set().union(*(_placeholders(item) for item in value)) if value else set()
    return set()


def _fill(template: Any, payload: Any) -> Any:
    if isinstance(template, str) and template in ("$inputs", "$input"):
        return payload
    if isinstance(template, Mapping):
        return {k: _fill(v, payload) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, payload) for v in template]
    return template


def load_spec(path: str | os.PathLike[str]) -> EndpointSpec:
    """The spec in a ``.json`` (or, with PyYAML, ``.yaml``/``.yml``) file, checked; a ConfigError names the mistake."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataNotFoundError(f"no endpoint spec {file}")
    text = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{file} is not valid JSON: {exc}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{file}: YAML specs need PyYAML (pip install pyyaml), or write it as JSON") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return spec_from_mapping(raw, file)


def spec_from_mapping(raw: Any, where: str | Path = "the spec") -> EndpointSpec:
    """An :class:`EndpointSpec` from a parsed mapping, refusing missing, unknown and secret-looking fields."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of fields (url, output, response, ...)")
    known = {f.name for f in fields(EndpointSpec)}
    for name in raw:
        if str(name).lower() in _SECRET_FIELDS:
            raise ConfigError(
                f"{where} has a field {name!r}: tokens never go in spec files; put the token in an environment "
                "variable and name it with token_env"
            )
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(known))}")
    missing = [name for name in ("url", "output", "response") if name not in raw]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)} (url, output and response are required)")
    values = dict(raw)
    if values.get("classes") is not None:
        if not isinstance(values["classes"], list) or not all(isinstance(c, str) for c in values["classes"]):
            raise ConfigError(f"{where}: classes must be a list of class names")
        values["classes"] = tuple(values["classes"])
    if not isinstance(values.get("headers", {}), Mapping):
        raise ConfigError(f"{where}: headers must be a mapping of header names to values")
    try:
        return EndpointSpec(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ------------------------------------------------------------------------------------------------ key paths
def parse_path(path: str) -> list[str | int]:
    """``"predictions[*].probs"`` -> ``["predictions", "*", "probs"]``; ints index lists, ``"*"`` maps over them."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"response must be a key path like 'predictions[*].probs', got {path!r}")
    steps: list[str | int] = []
    for part in path.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("["):
            inner = part[1:-1] if part.endswith("]") else None
            if inner is None or not (inner == "*" or inner.lstrip("-").isdigit()):
                raise ConfigError(f"response path {path!r}: {part!r} is not [N] or [*]")
            steps.append("*" if inner == "*" else int(inner))
        else:
            steps.append("*" if part == "*" else part)
    return steps


def read_path(document: Any, path: str) -> Any:
    """The value at ``path`` in a parsed JSON answer; a ModelError says where the path left the answer."""

    def walk(value: Any, steps: Sequence[str | int], done: str) -> Any:
        if not steps:
            return value
        step, rest = steps[0], steps[1:]
        if step == "*":
            if not isinstance(value, list):
                raise ModelError(f"the endpoint's answer has no list at {done or 'the top'} (path {path})")
            return [walk(item, rest, f"{done}[{i}]") for i, item in enumerate(value)]
        if isinstance(step, int):
            if not isinstance(value, list) or not -len(value) <= step < len(value):
                raise ModelError(f"the endpoint's answer has no item {done}[{step}] (path {path})")
            return walk(value[step], rest, f"{done}[{step}]")
        if not isinstance(value, Mapping) or step not in value:
            shown = json.dumps(value)[:160] if not isinstance(value, Mapping) else ", ".join(list(value)[:8])
            raise ModelError(
                f"the endpoint's answer has no {step!r} at {done or 'the top'} (path {path}); found: {shown}"
            )
        return walk(value[step], rest, f"{done}.{step}" if done else step)

    return walk(document, parse_path(path), "")


# ----------------------------------------------------------------------------------------------- the ledger
class EndpointLedger:
    """Every request and answer of one endpoint, appended to a JSON-lines file as it happens (see the module doc).

    ``paid`` counts images the endpoint answered, ``unresolved`` images sent but never answered nor refused (in
    flight when a run was killed); both count against ``budget``. ``answers`` maps what was sent (its hash) to
    the answer, so a repeated image is never asked twice.
    """

    def __init__(self, path: Path | None, identity: str, budget: int | None) -> None:
        self.path = path
        self.identity = identity
        self.budget = budget
        self.answers: dict[str, Any] = {}
        self.paid = 0
        self.uncertain = 0  # images of attempts that were sent but never answered (a timeout): maybe billed
        self.hits = 0  # images answered from the ledger in this session
        self._open: dict[str, int] = {}  # request id -> images, sent and not yet resolved
        self._lock = threading.Lock()
        self._stream: io.TextIOWrapper | None = None
        if path is not None:
            self._read(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not path.exists() or path.stat().st_size == 0
            self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for appends until close()
            if fresh:
                self._write({"format": LEDGER_FORMAT, "version": 1, "endpoint": identity})

    @property
    def unresolved(self) -> int:
        return sum(self._open.values())

    @property
    def spent(self) -> int:
        """What the budget is charged with: answered images, images of attempts that timed out after being sent,
        and images whose requests never came back (in flight when a run was killed)."""
        return self.paid + self.uncertain + self.unresolved

    def _read(self, path: Path) -> None:
        if not path.exists():
            return
        raw = path.read_bytes()
        if raw[:1] == b"\x80":
            raise StateFileError(f"the ledger {path} is a pickle, not robustlab's JSON lines; it is never unpickled")
        lines = raw.decode("utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                if number == len(lines):  # the last write was cut off by a kill: that request stays unresolved
                    warnings.warn(f"ignoring a cut-off last line of the ledger {path}", UserWarning, stacklevel=4)
                    continue
                raise StateFileError(
                    f"the ledger {path} is damaged at line {number}: fix it, or move it away (its answers are lost)"
                ) from None
            try:
                self._replay(record, path, number)
            except (KeyError, TypeError, ValueError):
                raise StateFileError(
                    f"the ledger {path} has a malformed record at line {number}: fix it, or move it away"
                ) from None

    def _replay(self, record: dict[str, Any], path: Path, number: int) -> None:
        if "format" in record:
            if record.get("format") != LEDGER_FORMAT or record.get("endpoint") != self.identity:
                raise StateFileError(
                    f"the ledger {path} belongs to another endpoint spec (URL, body, encoding or response path "
                    "differ): give this spec another ledger file, or remove that one"
                )
        elif "sent" in record:
            self._open[str(record["sent"])] = int(record["rows"])
        elif "answered" in record:
            self._open.pop(str(record["answered"]), None)
            for key, value in zip(record["keys"], record["values"]):
                self.answers[key] = value
            self.paid += int(record["rows"])
        elif "refused" in record:
            self._open.pop(str(record["refused"]), None)
        elif "uncertain" in record:
            self.uncertain += int(record["rows"])
        else:
            raise StateFileError(f"the ledger {path} has an unknown record at line {number}")

    def _write(self, record: dict[str, Any]) -> None:
        if self._stream is not None:
            # One line per write, flushed: a killed process loses at most the line being written, and the OS keeps
            # what was flushed even when the process dies.
            self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._stream.flush()

    def reserve(self, sizes: Sequence[int]) -> list[str]:
        """Record requests of ``sizes`` images before they are sent; refuses all when the budget cannot pay for them."""
        with self._lock:
            rows = sum(sizes)
            if self.budget is not None and self.spent + rows > self.budget:
                raise QueryBudgetExceeded(
                    f"the endpoint budget of {self.budget} images is spent ({self.paid} answered"
                    + (f", {self.uncertain + self.unresolved} sent and not answered" if self.spent > self.paid else "")
                    + f"); {rows} more were asked"
                )
            request_ids = []
            for size in sizes:
                request_id = uuid.uuid4().hex
                self._open[request_id] = size
                self._write({"sent": request_id, "rows": size})
                request_ids.append(request_id)
            return request_ids

    def answered(self, request_id: str, keys: Sequence[str], values: Sequence[Any]) -> None:
        with self._lock:
            rows = self._open.pop(request_id)
            self.paid += rows
            self.answers.update(zip(keys, values))
            self._write({"answered": request_id, "rows": rows, "keys": list(keys), "values": list(values)})

    def sent_unanswered(self, request_id: str) -> None:
        """An attempt of the request reached the endpoint but its answer did not come back (a read timeout, a dropped
        connection): the vendor may have billed it, so its images count against the budget; a retry is new."""
        with self._lock:
            rows = self._open.get(request_id, 0)
            self.uncertain += rows
            self._write({"uncertain": request_id, "rows": rows})

    def refused(self, request_id: str) -> None:
        """The endpoint refused the request (an error answer, nothing to pay for)."""
        with self._lock:
            self._open.pop(request_id, None)
            self._write({"refused": request_id})

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None


class RateLimiter:
    """Request starts at most ``rate`` per second across threads; a Retry-After pauses every thread."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 0.0 if rate is None else 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Return when this thread may start a request: a slot is taken when it is reached, not when it is booked,
        so a thread that wakes late cannot start within ``interval`` of the one after it."""
        while True:
            with self._lock:
                now = time.monotonic()
                if now >= self._next:
                    self._next = now + self.interval
                    return
                pause = self._next - now
            time.sleep(pause)

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


# ------------------------------------------------------------------------------------------- the endpoint
class EndpointModel:
    """A vendor endpoint, callable like a local model: ``scores = endpoint(x)`` (labels for a labels endpoint).

    ``requests`` counts HTTP requests made (retries included), ``ledger.paid`` the images answered by the vendor,
    ``ledger.hits`` the images answered from the ledger.
    """

    def __init__(self, spec: EndpointSpec, *, spec_path: Path | None = None, ledger: str | Path | None = None) -> None:
        import httpx

        self.spec = spec
        self.url = spec.url  # what an evaluation's resumable state is tied to
        self.num_classes = spec.classes_count
        ledger_path = self._ledger_path(spec, spec_path, ledger)
        self.ledger = EndpointLedger(ledger_path, spec.identity(), spec.budget)
        headers = {**spec.headers, **self._token_header(spec)}
        limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
        self._client = httpx.Client(headers=headers, timeout=spec.timeout, limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=spec.concurrency) if spec.concurrency > 1 else None
        self._limiter = RateLimiter(spec.rate_limit)
        self._batched = "$inputs" in _placeholders(spec.body)
        self.requests = 0
        self.retried = 0

    @staticmethod
    def _ledger_path(spec: EndpointSpec, spec_path: Path | None, ledger: str | Path | None) -> Path | None:
        if ledger is not None:
            return Path(ledger)
        if spec.ledger is None:
            return None
        if spec.ledger:
            given = Path(spec.ledger).expanduser()
            return given if given.is_absolute() or spec_path is None else spec_path.parent / given
        return None if spec_path is None else spec_path.with_name(spec_path.name + ".ledger.jsonl")

    @staticmethod
    def _token_header(spec: EndpointSpec) -> dict[str, str]:
        if spec.token_env is None:
            return {}
        token = os.environ.get(spec.token_env)
        if not token:
            raise ConfigError(f"the endpoint spec takes its token from ${spec.token_env}, which is not set")
        return {spec.token_header: spec.token_prefix + token}

    # ------------------------------------------------------------------------------------------- encoding
    def _encode(self, row: np.ndarray) -> tuple[str, Any]:
        """(hash of exactly what is sent, the JSON value sent) for one image ``(C, H, W)`` in [0, 1]."""
        spec = self.spec
        if spec.encoding == "png":
            from PIL import Image

            pixels = np.clip(np.rint(row * 255.0), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
            return hashlib.sha256(data).hexdigest(), base64.b64encode(data).decode("ascii")
        values = (row if spec.layout == "chw" else row.transpose(1, 2, 0)).astype(np.float32) * np.float32(spec.scale)
        key = hashlib.sha256(repr(values.shape).encode() + values.tobytes()).hexdigest()
        return key, values.tolist()

    # -------------------------------------------------------------------------------------------- queries
    def __call__(self, x: Tensor) -> Tensor:
        rows = x.detach().to("cpu", torch.float32).numpy()
        if rows.ndim != 4:
            raise InvalidInputError(f"the endpoint takes images (n, channels, height, width), got {tuple(rows.shape)}")
        encoded = [self._encode(row) for row in rows]
        needed: dict[str, Any] = {}
        with self.ledger._lock:
            for key, value in encoded:
                if key not in self.ledger.answers:
                    needed.setdefault(key, value)
            self.ledger.hits += len(encoded) - len(needed)  # repeats, within this batch too, cost nothing
        keys = list(needed)
        chunks = [keys[i : i + self.spec.batch_size] for i in range(0, len(keys), self.spec.batch_size)]
        request_ids = self.ledger.reserve([len(chunk) for chunk in chunks])  # the budget refuses before any request
        jobs = [(rid, chunk, [needed[k] for k in chunk]) for rid, chunk in zip(request_ids, chunks)]
        if self._pool is None or len(jobs) < 2:
            for number, job in enumerate(jobs):
                try:
                    self._ask(*job)
                except BaseException:
                    for rid, _, _ in jobs[number + 1 :]:
                        self.ledger.refused(rid)  # never sent: nothing to pay for
                    raise
        else:
            futures = [self._pool.submit(self._ask, *job) for job in jobs]
            wait(futures)  # every request ends answered or refused in the ledger before an error is raised
            for future in futures:
                future.result()
        return self._assemble([key for key, _ in encoded], x.device)

    def _ask(self, request_id: str, keys: list[str], values: list[Any]) -> None:
        """One request with retries; its answers go to the ledger, or its refusal when it fails."""
        body = _fill(self.spec.body, values if self._batched else values[0])
        try:
            document = self._post(body, request_id)
        except BaseException:
            self.ledger.refused(request_id)  # refused, unreachable or failing: the vendor answered nothing
            raise
        try:
            parsed = self._parse(document, len(keys))
        except BaseException:
            self.ledger.answered(request_id, [], [])  # the vendor answered (and bills it), but unusably
            raise
        self.ledger.answered(request_id, keys, parsed)

    def _post(self, body: Any, request_id: str) -> Any:
        import httpx

        spec = self.spec
        delay = spec.backoff
        for attempt in range(spec.retries + 1):
            self._limiter.wait()
            self.requests += 1
            wait: float | None = None
            try:
                response = self._client.request(spec.method, spec.url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                if not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):  # sent, answer lost
                    self.ledger.sent_unanswered(request_id)
                if attempt == spec.retries:
                    raise ModelError(f"cannot reach the endpoint {spec.url}: {type(exc).__name__}: {exc}") from None
            else:
                if response.status_code not in RETRY_STATUS:
                    return self._json(response)
                if attempt == spec.retries:
                    raise ModelError(
                        f"the endpoint {spec.url} kept answering {response.status_code} after {spec.retries} retries"
                    )
                wait = _retry_after(response.headers.get("retry-after"))
                if wait is not None:
                    self._limiter.hold(wait)
            self.retried += 1
            time.sleep(min(spec.max_backoff, delay if wait is None else wait))
            delay *= 2
        raise AssertionError("unreachable")

    def _json(self, response: Any) -> Any:
        status = response.status_code
        if status in (401, 403):
            where = f" (the token comes from ${self.spec.token_env})" if self.spec.token_env else ""
            raise ModelError(f"the endpoint {self.spec.url} refused the credentials ({status}){where}")
        try:
            document = response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            start = " ".join(response.text[:80].split())
            raise ModelError(
                f"the endpoint {self.spec.url} answered {kind} (status {status}), not JSON: {start!r}"
            ) from None
        if status >= 400:
            detail = json.dumps(document)[:200]
            raise InvalidInputError(f"the endpoint {self.spec.url} rejected the request ({status}): {detail}")
        return document

    def _parse(self, document: Any, rows: int) -> list[Any]:
        """Per image: a list of scores (scores endpoints) or a class index (labels endpoints), checked."""
        found = read_path(document, self.spec.response)
        items = found if self._batched else [found]
        if not isinstance(items, list) or len(items) != rows:
            count = len(items) if isinstance(items, list) else type(items).__name__
            raise ModelError(f"the endpoint answered {count} items at {self.spec.response} for {rows} images")
        if self.spec.output == "labels":
            return [self._label(item) for item in items]
        return [self._scores(item) for item in items]

    def _label(self, item: Any) -> int:
        classes = self.spec.classes
        if isinstance(item, str) and classes is not None and item in classes:
            return classes.index(item)
        if isinstance(item, int) and not isinstance(item, bool):
            if self.num_classes is not None and not 0 <= item < self.num_classes:
                raise ModelError(f"the endpoint answered label {item}, outside the {self.num_classes} classes")
            return item
        raise ModelError(f"the endpoint answered the label {json.dumps(item)[:60]}, not a class index or known name")

    def _scores(self, item: Any) -> list[float]:
        classes = self.spec.classes
        if isinstance(item, Mapping):
            if classes is None or set(item) != set(classes):
                raise ModelError(
                    f"the endpoint answered scores by name ({', '.join(list(map(str, item))[:6])}): list the names in "
                    "the spec's classes, in class order"
                )
            item = [item[name] for name in classes]
        if not isinstance(item, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in item
        ):
            raise ModelError(f"the endpoint answered {json.dumps(item)[:80]} where a list of scores was expected")
        if self.num_classes is None:
            self.num_classes = len(item)
        if len(item) != self.num_classes:
            raise ModelError(
                f"the endpoint answered {len(item)} scores for an image, but it has {self.num_classes} classes "
                "(num_classes in the spec, or its first answer)"
            )
        return [float(v) for v in item]

    def _assemble(self, keys: list[str], device: torch.device) -> Tensor:
        answers = [self.ledger.answers[key] for key in keys]
        if self.spec.output == "labels":
            return torch.tensor(answers, dtype=torch.long, device=device)
        return torch.tensor(answers, dtype=torch.float32, device=device).reshape(len(keys), -1)

    def check_takes(self, sample: Tensor, **names: str) -> None:
        """Nothing is sent to check a sample (queries cost money); the first query's answer is checked instead."""

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._client.close()
        self.ledger.close()


def connect_spec(
    path: str | os.PathLike[str] | EndpointSpec,
    *,
    budget: int | None = None,
    ledger: str | Path | None = None,
) -> ScoreOracle | LabelOracle:
    """A ScoreOracle (``output: scores``) or LabelOracle (``output: labels``) for the endpoint a spec describes.

    ``budget`` is the per-example query budget the oracle enforces, as for every black-box handle; the spec's
    ``budget`` caps the images the vendor is asked about in all, across runs. ``ledger`` overrides the spec's ledger
    file. Close the handle's model (``oracle.model.close()``) when done, to finish the ledger and the connection.
    """
    if isinstance(path, EndpointSpec):
        spec, spec_path = path, None
    else:
        spec_path = Path(path).expanduser()
        spec = load_spec(spec_path)
    model = EndpointModel(spec, spec_path=spec_path, ledger=ledger)
    oracle_type = ScoreOracle if spec.output == "scores" else LabelOracle
    return oracle_type(model, num_classes=model.num_classes, budget=budget)


@contextlib.contextmanager
def endpoint(path: str | os.PathLike[str] | EndpointSpec, **options: Any) -> Iterator[ScoreOracle | LabelOracle]:
    """:func:`connect_spec` as a context manager that closes the connection and the ledger at the end."""
    oracle = connect_spec(path, **options)
    try:
        yield oracle
    finally:
        model = oracle.model
        assert isinstance(model, EndpointModel)
        model.close()
