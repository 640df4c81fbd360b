"""Black-box handles for models held locally in a form robustlab cannot differentiate through, as oracles.

:func:`onnx_oracle`: an ONNX file run by onnxruntime (:class:`robustlab.models.onnx_model.OnnxModel`) behind a
:class:`~robustlab.oracles.ScoreOracle` or :class:`~robustlab.oracles.LabelOracle`. It lives here, above both the
models and the oracles, because the models layer imports only the foundation (docs/architecture.md).
"""

from __future__ import annotations

import torch

from robustlab.models.onnx_model import OutputChoice, PathLike, load_onnx
from robustlab.oracles import LabelOracle, ScoreOracle

__all__ = ["onnx_oracle"]


def onnx_oracle(
    path: PathLike,
    *,
    output: OutputChoice = None,
    layout: str = "auto",
    budget: int | None = None,
    labels_only: bool = False,
    device: torch.device | str = "cpu",
    normalize: str | None = None,
) -> ScoreOracle | LabelOracle:
    """A :class:`~robustlab.oracles.ScoreOracle` (or, with ``labels_only``, a LabelOracle) over the ONNX file in
    onnxruntime, counting every query and enforcing ``budget`` per example like any black-box handle."""
    model = load_onnx(path, output=output, layout=layout, device=device, normalize=normalize)
    oracle_type = LabelOracle if labels_only else ScoreOracle
    return oracle_type(model, num_classes=model.num_classes, budget=budget)
