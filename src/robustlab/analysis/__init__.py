"""Understanding robustness: local Lipschitz constants, loss landscapes, curvature, intrinsic robustness and
robust overfitting (one module per analysis)."""

from robustlab.analysis.lipschitz import LipschitzConfig, LipschitzResult, global_lipschitz_bound, local_lipschitz

__all__ = ["LipschitzConfig", "LipschitzResult", "global_lipschitz_bound", "local_lipschitz"]
