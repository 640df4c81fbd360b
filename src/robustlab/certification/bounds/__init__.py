"""Bound propagation on general computation graphs: IBP, CROWN and alpha-CROWN.

- :mod:`.graph` traces a model with ``torch.fx`` into a :class:`BoundGraph` of supported operations
  (:mod:`.convert` lists them and names any other, with its place in the model);
- :mod:`.ops` holds each operation's forward pass, interval bounds and transposed linear map, and
  :mod:`.relaxations` the linear relaxations of ReLU/LeakyReLU, Sigmoid/Tanh and MaxPool;
- :mod:`.ibp`, :mod:`.crown` and :mod:`.alpha` are the three bounds; :mod:`.api` is the public entry point.
"""

from robustlab.certification.bounds.api import (
    METHODS,
    BoundOptions,
    BoundResult,
    Cascade,
    Method,
    ibp_and_crown_ibp,
    margin_bounds,
    spec_matrix,
    verify,
    verify_cascade,
)
from robustlab.certification.bounds.graph import BoundGraph, trace_graph

__all__ = [
    "METHODS",
    "BoundGraph",
    "BoundOptions",
    "BoundResult",
    "Cascade",
    "Method",
    "ibp_and_crown_ibp",
    "margin_bounds",
    "spec_matrix",
    "trace_graph",
    "verify",
    "verify_cascade",
]
