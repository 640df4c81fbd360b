"""ONNX files as users receive them: onnxruntime for black-box access, onnx2torch for white-box access.

Models trained in TensorFlow, Keras, JAX or another team's PyTorch reach robustlab users as ONNX exports. Two ways
in, chosen by the access an attack needs:

- :func:`load_onnx`: the file runs in onnxruntime (CPU, or its CUDA provider when present), as a score or label
  oracle through :func:`robustlab.model_access.onnx_oracle`. The graph's input name, shape and dtype are read
  from the file; images arrive in robustlab's ``(N, C, H, W)`` order and are transposed for graphs that take
  ``(N, H, W, C)`` (TensorFlow's order); a graph exported with a fixed batch size gets chunks of that size, the
  last one padded (a warning says so once).
- :func:`convert_onnx` (what :func:`robustlab.models.load_model` returns for ``.onnx`` files): the graph converted to
  a ``torch.nn.Module`` by onnx2torch, so gradient attacks run on it. The conversion is checked against onnxruntime
  on sample inputs before it is returned (its largest absolute difference is kept in ``max_abs_difference``); a
  graph with operators onnx2torch cannot convert, or a conversion that disagrees, is refused with a message that
  points to the black-box attacks.

A graph with several outputs is refused until the caller says which one holds the class scores (``output=`` name or
position; ``--onnx-output`` on the command line).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustlab.errors import ConfigError, DataNotFoundError, InvalidInputError, ModelError

__all__ = [
    "OnnxModel",
    "OnnxSignature",
    "OnnxTorchModule",
    "convert_onnx",
    "is_onnx_file",
    "load_onnx",
    "read_signature",
]

PathLike = str | os.PathLike[str]
OutputChoice = str | int | None
INSTALL_HINT = "ONNX models need the onnx extra: pip install 'robustlab[onnx]' (and pip install --no-deps onnx2torch)"
_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_CHANNELS = (1, 3, 4)  # gray, RGB, RGBA: how a channel axis is recognised in a static shape
BLACK_BOX_HINT = (
    "run a black-box attack instead (square, nes, zo-fw, rays, hsja, sign-opt), which queries the file through "
    "onnxruntime: robustlab attack --model FILE.onnx --method square"
)


def is_onnx_file(path: PathLike) -> bool:
    """Whether ``path`` names an ONNX file (by its ``.onnx`` suffix, as every exporter writes it)."""
    return os.fspath(path).lower().endswith(".onnx")


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return onnxruntime


@dataclass(frozen=True)
class OnnxSignature:
    """What the graph takes and gives: read from the file, never guessed from the data.

    ``input_shape`` is the graph's own (``None`` for a symbolic size); ``channels_last`` is True for a graph taking
    ``(N, H, W, C)``; ``output`` is the chosen output among ``outputs``.
    """

    path: Path
    input_name: str
    input_shape: tuple[int | None, ...]
    input_dtype: type
    outputs: tuple[str, ...]
    output: str
    channels_last: bool

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the graph was exported with, or None when its batch axis is dynamic."""
        return self.input_shape[0]

    @property
    def image_shape(self) -> tuple[int | None, ...]:
        """One input in robustlab's ``(C, H, W)`` order."""
        dims = self.input_shape[1:]
        return (dims[2], dims[0], dims[1]) if self.channels_last else dims

    def describe_input(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.input_shape)
        return f"input {self.input_name!r} of shape [{dims}] ({np.dtype(self.input_dtype).name})"


def _dims(shape: Any) -> tuple[int | None, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


def _choose_output(file: Path, outputs: list[str], output: OutputChoice) -> str:
    if output is None:
        if len(outputs) == 1:
            return outputs[0]
        raise ModelError(
            f"{file} has {len(outputs)} outputs ({', '.join(outputs)}): say which one holds the class scores with "
            f"--onnx-output NAME (output= in Python), e.g. --onnx-output {outputs[0]}"
        )
    if isinstance(output, int) and not isinstance(output, bool):
        if not 0 <= output < len(outputs):
            raise ConfigError(f"{file} has outputs 0..{len(outputs) - 1} ({', '.join(outputs)}); got {output}")
        return outputs[output]
    if isinstance(output, str) and output.isdigit() and output not in outputs:
        return _choose_output(file, outputs, int(output))
    if output not in outputs:
        raise ConfigError(f"{file} has no output {output!r}; its outputs: {', '.join(outputs)}")
    return str(output)


def _channels_last(dims: tuple[int | None, ...], layout: str) -> bool:
    if layout not in ("auto", "nchw", "nhwc"):
        raise ConfigError(f"layout must be 'auto', 'nchw' or 'nhwc', got {layout!r}")
    if layout != "auto":
        return layout == "nhwc"
    first, last = dims[1], dims[3]
    return last in _CHANNELS and first not in _CHANNELS


def _check_file(path: PathLike) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise DataNotFoundError(f"no ONNX file {file}")
    if file.is_dir():
        raise ModelError(f"{file} is a folder; give the .onnx file inside it")
    return file


def _session(file: Path, device: torch.device) -> Any:
    ort = _onnxruntime()
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime's own warnings go to stderr past Python's filters
    # As many threads as torch uses, and no spin-waiting: onnxruntime's default (all cores, spinning between calls)
    # took 6.7 ms per LeNet-5 call of 10 images here against 3.1 ms, and slows everything else on a shared CPU.
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(file), sess_options=options, providers=providers)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise ModelError(f"{file} is not an ONNX model onnxruntime can load: {reason}") from None


def read_signature(session: Any, file: Path, output: OutputChoice = None, layout: str = "auto") -> OnnxSignature:
    """The graph's image input and chosen output, or a ModelError naming why it is not an image classifier."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(f"{i.name} {list(i.shape)}" for i in inputs)
        raise ModelError(f"{file} takes {len(inputs)} inputs ({names}); robustlab needs a classifier of one image")
    graph_input = inputs[0]
    dims = _dims(graph_input.shape)
    dtype = _FLOAT_TYPES.get(graph_input.type)
    if dtype is None or len(dims) != 4:
        shown = ", ".join("?" if d is None else str(d) for d in dims)
        raise ModelError(
            f"{file}'s input {graph_input.name!r} is [{shown}] of {graph_input.type}, not an image tensor: robustlab "
            "needs one floating-point input (batch, channels, height, width) or (batch, height, width, channels)"
        )
    chosen = _choose_output(file, [o.name for o in session.get_outputs()], output)
    return OnnxSignature(
        file, graph_input.name, dims, dtype, tuple(o.name for o in session.get_outputs()), chosen,
        _channels_last(dims, layout),
    )  # fmt: skip


def _looks_like_probabilities(scores: Tensor) -> bool:
    """Rows that are non-negative and sum to one. (The same test as robustlab.oracles.looks_like_probabilities,
    written here because the models layer imports only the foundation.)"""
    sums = scores.sum(dim=1)
    return (
        scores.shape[1] >= 2
        and bool((scores >= 0).all())
        and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))
    )


def _in_batches(x: Tensor, fixed: int | None, run: Callable[[Tensor], Tensor]) -> Tensor:
    """``run`` over chunks of exactly ``fixed`` rows (the last one padded with copies of its first row)."""
    if fixed is None or x.shape[0] == fixed:
        return run(x)
    parts = []
    for start in range(0, x.shape[0], fixed):
        chunk = x[start : start + fixed]
        rows = chunk.shape[0]
        if rows < fixed:
            chunk = torch.cat([chunk, chunk[:1].expand(fixed - rows, *chunk.shape[1:])])
        parts.append(run(chunk)[:rows])
    return torch.cat(parts)


def _as_scores(out: Any, rows: int, file: Path, name: str) -> Any:
    """A ``(rows, classes)`` score array (extra unit axes dropped), or a ModelError naming the shape."""
    shape = tuple(out.shape)
    if len(shape) >= 2 and shape[0] == rows and all(s == 1 for s in shape[2:]):
        return out.reshape(rows, shape[1])
    if len(shape) >= 2 and shape[0] == rows and sum(s != 1 for s in shape[1:]) == 1:
        return out.reshape(rows, -1)
    raise ModelError(
        f"{file}'s output {name!r} has shape {list(shape)} for {rows} inputs; class scores of shape (batch, classes) "
        "are needed (choose another output with --onnx-output)"
    )


class OnnxModel:
    """An ONNX file in onnxruntime, callable like a module: ``scores = model(x)`` for ``x`` of shape ``(n, C, H, W)``.

    Args:
        path: the ``.onnx`` file. output: which output holds the scores (name or position; needed when there are
            several). layout: ``"auto"`` (from the graph's static shape), ``"nchw"`` or ``"nhwc"``.
        device: the CUDA provider is used for a CUDA device when onnxruntime has it; answers come back on the
            inputs' device.

    Raises:
        DataNotFoundError, ModelError, ConfigError: no file, not ONNX, not an image classifier, several outputs and
            none chosen, or onnxruntime not installed.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        output: OutputChoice = None,
        layout: str = "auto",
        device: torch.device | str = "cpu",
        normalize: str | None = None,
    ) -> None:
        self.file = _check_file(path)
        self.session = _session(self.file, torch.device(device))
        self.signature = read_signature(self.session, self.file, output, layout)
        self.normalize = _normalize_layer(normalize)
        stat = self.file.stat()
        # What the evaluation's resumable state is tied to: this file as it is now (a re-export is another model).
        self.url = f"{self.file.resolve().as_uri()}?size={stat.st_size}&mtime_ns={stat.st_mtime_ns}"
        self._warned_padding = False
        self._checked_scores = False

    @property
    def num_classes(self) -> int | None:
        for graph_output in self.session.get_outputs():
            if graph_output.name == self.signature.output:
                dims = _dims(graph_output.shape)
                return dims[1] if len(dims) >= 2 else None
        return None

    def _check_shape(self, x: Tensor) -> None:
        expected = self.signature.image_shape
        got = tuple(x.shape[1:])
        if x.dim() != 4 or any(e is not None and e != g for e, g in zip(expected, got)):
            shown = ", ".join("?" if d is None else str(d) for d in expected)
            raise InvalidInputError(
                f"{self.file} takes images of shape ({shown}) (channels, height, width), got {got}. Check that the "
                "data is what the model was made for"
            )

    def __call__(self, x: Tensor) -> Tensor:
        self._check_shape(x)
        fixed = self.signature.fixed_batch
        if fixed is not None and x.shape[0] != fixed and not self._warned_padding:
            self._warned_padding = True
            warnings.warn(
                f"{self.file} was exported with a fixed batch size of {fixed}: inputs go in chunks of {fixed}, "
                "the last one padded (export it with a dynamic batch axis to save that work)",
                UserWarning,
                stacklevel=2,
            )
        out = _in_batches(x.detach(), fixed, self._run)
        if not self._checked_scores:
            self._checked_scores = True
            if _looks_like_probabilities(out):
                warnings.warn(
                    f"{self.file}'s output {self.signature.output!r} looks like probabilities (non-negative rows "
                    "summing to 1); score attacks work on them, but a logits output, if the graph has one, is better",
                    UserWarning,
                    stacklevel=2,
                )
        return out.to(x.device)

    def _run(self, x: Tensor) -> Tensor:
        if self.normalize is not None:
            x = self.normalize(x.to("cpu"))
        images = x.permute(0, 2, 3, 1) if self.signature.channels_last else x
        array: np.ndarray = np.ascontiguousarray(images.to("cpu").numpy(), dtype=self.signature.input_dtype)
        try:
            (out,) = self.session.run([self.signature.output], {self.signature.input_name: array})
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            raise InvalidInputError(
                f"onnxruntime failed on {self.file} for a batch of shape {tuple(array.shape)}: {reason}"
            ) from None
        scores = _as_scores(np.asarray(out), int(x.shape[0]), self.file, self.signature.output)
        return torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))

    def check_takes(self, sample: Tensor, *, model_name: str = "the model", **names: str) -> Tensor:
        """The scores of ``sample`` (not counted as queries: the file is local), or an error naming the mismatch."""
        with torch.no_grad():
            return self(sample)

    def close(self) -> None:
        """Nothing to release (kept so the command line can close every kind of handle alike)."""


def load_onnx(
    path: PathLike,
    *,
    output: OutputChoice = None,
    layout: str = "auto",
    device: torch.device | str = "cpu",
    normalize: str | None = None,
) -> OnnxModel:
    """The ONNX file in onnxruntime: a callable from images ``(n, C, H, W)`` to scores ``(n, classes)``.

    ``normalize`` (a name or ``"M,M,M/S,S,S"``, see :func:`robustlab.models.robustbench.normalization_stats`)
    normalizes the images first, for a graph exported without its normalization."""
    return OnnxModel(path, output=output, layout=layout, device=device, normalize=normalize)


def _normalize_layer(normalize: str | None) -> nn.Module | None:
    if normalize is None:
        return None
    from robustlab.models.normalization import Normalize
    from robustlab.models.robustbench import normalization_stats

    stats = normalization_stats(normalize)
    return None if stats is None else Normalize(*stats)


@contextlib.contextmanager
def _without_torchvision() -> Iterator[None]:
    """Let onnx2torch import where torchvision is absent (PyPI's torchvision does not import beside every torch).

    onnx2torch imports torchvision at import time only for its NonMaxSuppression and RoiAlign converters; for the
    import, a stand-in module whose functions raise a clear error is put in ``sys.modules`` and taken out again.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        yield
        return

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise ModelError("this ONNX graph uses NonMaxSuppression/RoiAlign, which need torchvision to convert")

    stand_in, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    ops.nms = ops.box_convert = ops.roi_align = missing  # type: ignore[attr-defined]
    stand_in.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = stand_in, ops
    try:
        yield
    finally:
        for name, module in (("torchvision", stand_in), ("torchvision.ops", ops)):
            if sys.modules.get(name) is module:
                del sys.modules[name]


def _onnx2torch() -> Any:
    with _without_torchvision():
        try:
            import onnx2torch
        except ImportError:
            raise ConfigError(INSTALL_HINT) from None
    return onnx2torch


class OnnxTorchModule(nn.Module):
    """An ONNX graph converted to PyTorch by onnx2torch, taking and giving what :class:`OnnxModel` does.

    ``max_abs_difference`` is the largest absolute difference from onnxruntime's scores on the ``verified_on``
    sample inputs it was checked on when it was built.
    """

    def __init__(self, graph: nn.Module, signature: OnnxSignature, output_index: int) -> None:
        super().__init__()
        # Not "graph": torch.fx's GraphModule (bound propagation traces this module) keeps its own Graph there.
        self.network = graph
        self.signature = signature
        self.output_index = output_index
        self.max_abs_difference = float("nan")
        self.verified_on = 0

    def forward(self, x: Tensor) -> Tensor:
        return _in_batches(x, self.signature.fixed_batch, self._run)

    def _run(self, x: Tensor) -> Tensor:
        images = x.permute(0, 2, 3, 1) if self.signature.channels_last else x
        dtype = torch.from_numpy(np.zeros(0, dtype=self.signature.input_dtype)).dtype
        # Casts only when the dtypes differ: bound propagation (certify) traces this module and has no rule for a
        # cast, and a no-op one would stop it.
        out = self.network(images if images.dtype == dtype else images.to(dtype))
        if isinstance(out, (tuple, list)):
            out = out[self.output_index]
        rows = int(x.shape[0])
        if out.dim() != 2:
            out = out.reshape(rows, -1)
        return out if out.dtype == x.dtype else out.to(x.dtype)


def _sample_inputs(signature: OnnxSignature, rows: int = 8) -> Tensor:
    shape = signature.image_shape
    if any(d is None for d in shape):
        raise ModelError(
            f"{signature.path} has a symbolic image size ({signature.describe_input()}): give sample inputs "
            "(sample=...) so the conversion can be checked against onnxruntime"
        )
    generator = torch.Generator().manual_seed(0)
    return torch.rand(rows, *(int(d) for d in shape if d is not None), generator=generator)


def convert_onnx(
    path: PathLike,
    *,
    output: OutputChoice = None,
    layout: str = "auto",
    sample: Tensor | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    device: torch.device | str = "cpu",
) -> OnnxTorchModule:
    """The ONNX file as a ``torch.nn.Module`` (eval mode, on ``device``) for white-box attacks, checked first.

    The converted module and onnxruntime score ``sample`` (default: 8 seeded uniform images of the graph's input
    size); they must agree within ``atol + rtol * max|scores|`` with the same top-1 class on every row.

    Raises:
        ModelError: not ONNX, not an image classifier, operators onnx2torch cannot convert, or a conversion that
            disagrees with onnxruntime (the message gives the largest absolute difference and points to the
            black-box attacks).
    """
    reference = OnnxModel(path, output=output, layout=layout)
    signature = reference.signature
    file = signature.path
    graph = _convert_graph(file)
    module = OnnxTorchModule(graph, signature, signature.outputs.index(signature.output)).eval()
    x = (_sample_inputs(signature) if sample is None else sample).detach().to("cpu", torch.float32)
    with torch.no_grad():
        expected = reference(x)
        try:
            got = module(x)
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            raise ModelError(
                f"onnx2torch's conversion of {file} fails on sample inputs ({reason}); {BLACK_BOX_HINT}"
            ) from None
    difference = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    agree = difference <= atol + rtol * float(expected.abs().max()) and bool(
        (got.argmax(1) == expected.argmax(1)).all()
    )
    if not agree:
        raise ModelError(
            f"onnx2torch's conversion of {file} disagrees with onnxruntime (max abs difference {difference:.3g} on "
            f"{x.shape[0]} sample inputs), so gradients of it would not be the model's; {BLACK_BOX_HINT}"
        )
    module.max_abs_difference, module.verified_on = difference, int(x.shape[0])
    return module.to(torch.device(device))


def _convert_graph(file: Path) -> nn.Module:
    onnx2torch = _onnx2torch()
    import onnx

    try:
        proto = onnx.load(str(file))
    except Exception as exc:
        raise ModelError(f"{file} is not an ONNX model onnx can read: {str(exc)[:200]}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = onnx2torch.convert(proto)
    except NotImplementedError as exc:
        raise ModelError(
            f"{file} uses operators onnx2torch cannot convert to PyTorch ({str(exc)[:160]}), so white-box attacks "
            f"cannot run on it; {BLACK_BOX_HINT}"
        ) from None
    except Exception as exc:
        raise ModelError(
            f"onnx2torch cannot convert {file} to PyTorch ({type(exc).__name__}: {str(exc)[:160]}); {BLACK_BOX_HINT}"
        ) from None
    return graph
