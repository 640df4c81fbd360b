"""The threat model: which perturbations an attacker may apply.

One :class:`ThreatModel` object (norm, eps and the input box) is used by every attack, trainer and certifier. It
owns everything that depends on the geometry of the allowed set: exact Euclidean projection onto the intersection of
the norm ball and the box, random starts inside it, steepest-ascent directions, the Frank-Wolfe linear
minimization oracle, and distances.

Tensors are batches: the first dimension indexes examples, all other dimensions are flattened for the norm.
Every method works on the device and dtype of its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from robustlab.errors import ConfigError, InvalidInputError

__all__ = ["Norm", "ThreatModel"]


class Norm(str, Enum):
    """Norm of the perturbation ball.

    ``l0`` counts changed coordinates (eps is a number of coordinates). It is not a norm, its ball is not convex,
    and only sparse minimum-norm attacks (``fmn``) search in it: it has a distance and an exact projection, but no
    random start, steepest-ascent direction or dual norm.
    """

    LINF = "linf"
    L2 = "l2"
    L1 = "l1"
    L0 = "l0"

    @classmethod
    def parse(cls, value: str | Norm) -> Norm:
        if isinstance(value, Norm):
            return value
        key = str(value).strip().lower().replace("_", "").replace("-", "")
        aliases = {
            "linf": "linf", "inf": "linf", "li": "linf", "l2": "l2", "2": "l2", "l1": "l1", "1": "l1", "l0": "l0",
            "0": "l0",
        }  # fmt: skip
        if key not in aliases:
            raise ConfigError(f"unknown norm {value!r}: choose one of linf, l2, l1, l0")
        return cls(aliases[key])

    @property
    def dual(self) -> float:
        """Exponent of the dual norm (linf <-> l1, l2 <-> l2), as used by bound propagation."""
        if self is Norm.L0:
            raise ConfigError("l0 counts coordinates: it has no dual norm (bound propagation needs linf, l2 or l1)")
        return {Norm.LINF: 1.0, Norm.L2: 2.0, Norm.L1: math.inf}[self]


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)


@dataclass(frozen=True)
class ThreatModel:
    """Perturbations ``x' `` with ``||x' - x||_norm <= eps`` and ``lower <= x' <= upper`` elementwise.

    Args:
        norm: ``"linf"``, ``"l2"`` or ``"l1"`` (or a :class:`Norm`).
        eps: radius of the ball, in input units (pixels in [0, 1] for images); must be positive and finite.
        lower, upper: the input box. Use ``-inf``/``inf`` for an unbounded input. Normalization belongs inside
            the model (:class:`robustlab.models.Normalize`), so the box is the raw input range.

    Example:
        >>> threat = ThreatModel("linf", 8 / 255)
        >>> x_adv = threat.project(x_candidate, x)
    """

    norm: Norm
    eps: float
    lower: float = 0.0
    upper: float = 1.0

    def __init__(self, norm: str | Norm, eps: float, lower: float = 0.0, upper: float = 1.0) -> None:
        object.__setattr__(self, "norm", Norm.parse(norm))
        try:
            eps_value = float(eps)
            lower_value, upper_value = float(lower), float(upper)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"eps and bounds must be numbers, got eps={eps!r}, bounds=({lower!r}, {upper!r})"
            ) from exc
        if not math.isfinite(eps_value) or eps_value <= 0:
            raise ConfigError(f"eps must be a positive finite number, got {eps!r}")
        if math.isnan(lower_value) or math.isnan(upper_value) or not lower_value < upper_value:
            raise ConfigError(f"input bounds must satisfy lower < upper, got ({lower!r}, {upper!r})")
        object.__setattr__(self, "eps", eps_value)
        object.__setattr__(self, "lower", lower_value)
        object.__setattr__(self, "upper", upper_value)

    def with_eps(self, eps: float) -> ThreatModel:
        """The same threat model with another radius."""
        return ThreatModel(self.norm, eps, self.lower, self.upper)

    def __str__(self) -> str:
        return f"{self.norm.value} eps={self.eps:g} box=[{self.lower:g}, {self.upper:g}]"

    # ------------------------------------------------------------------ checks
    def check_inputs(self, x: Tensor, *, name: str = "x", atol: float = 1e-6) -> None:
        """Raise :class:`InvalidInputError` unless ``x`` is a finite floating batch inside the box."""
        if not isinstance(x, Tensor):
            raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InvalidInputError(f"{name} must be a floating-point tensor (float32/float64), got {x.dtype}")
        if x.dim() < 2:
            raise InvalidInputError(
                f"{name} must be a batch with the examples along the first dimension, got shape {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise InvalidInputError(f"{name} is an empty batch")
        if not torch.isfinite(x).all():
            raise InvalidInputError(f"{name} contains NaN or Inf values")
        lo, hi = x.min().item(), x.max().item()
        if lo < self.lower - atol or hi > self.upper + atol:
            raise InvalidInputError(
                f"{name} has values in [{lo:.4g}, {hi:.4g}], outside the threat model's input bounds "
                f"[{self.lower:g}, {self.upper:g}]; scale the data to the bounds or declare the bounds "
                "(normalization belongs inside the model)"
            )

    # --------------------------------------------------------------- geometry
    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-example distance ``||x_adv - x||`` in this threat model's norm."""
        d = _flat(x_adv - x)
        if self.norm is Norm.LINF:
            return d.abs().amax(dim=1)
        if self.norm is Norm.L2:
            return d.norm(p=2, dim=1)
        if self.norm is Norm.L0:
            return (d != 0).sum(dim=1).to(d.dtype)
        return d.abs().sum(dim=1)

    def contains(self, x_adv: Tensor, x: Tensor, *, rtol: float = 1e-5, atol: float = 1e-6) -> Tensor:
        """Per-example mask: ``x_adv`` lies in the ball (up to ``rtol * eps``) and in the box (up to ``atol``)."""
        in_ball = self.distance(x_adv, x) <= self.eps * (1 + rtol) + atol
        f = _flat(x_adv)
        in_box = (f >= self.lower - atol).all(dim=1) & (f <= self.upper + atol).all(dim=1)
        return in_ball & in_box

    def project(self, x_adv: Tensor, x: Tensor, radius: Tensor | None = None) -> Tensor:
        """Exact Euclidean projection of ``x_adv`` onto {ball around ``x``} intersected with the box.

        ``radius`` (``(n,)``, optional) gives each example a ball of its own radius instead of ``eps`` (a
        minimum-norm attack's adaptive constraint); ``inf`` leaves only the box.

        ``x`` must lie in the box. For linf the set is a box and the projection a clamp. For l2 and l1 the
        projection is ``clip(t * d)`` or ``clip(soft_threshold(d, lam))`` of the perturbation ``d``; the scalar
        ``t`` or ``lam`` is found exactly from the sorted breakpoints of the piecewise norm function (one sort
        per example), not by projecting onto the ball and then clipping, which is feasible but not nearest. For l0
        the nearest point keeps the ``floor(eps)`` coordinates whose clipping to the box saves the most.
        """
        eps: float | Tensor = self.eps if radius is None else radius.to(x.dtype).reshape(-1, 1)
        if self.norm is Norm.LINF:
            if radius is None:
                low, high = self.linf_bounds(x)
                return torch.clamp(x_adv, low, high)
            flat_x = _flat(x)
            low = torch.clamp(flat_x - eps, min=self.lower).reshape(x.shape)
            high = torch.clamp(flat_x + eps, max=self.upper).reshape(x.shape)
            return torch.clamp(x_adv, low, high)
        delta = x_adv - x
        lo = _flat(self.lower - x)
        hi = _flat(self.upper - x)
        if self.norm is Norm.L2:
            delta_flat = _project_l2_box(_flat(delta), lo, hi, eps)
        elif self.norm is Norm.L0:
            delta_flat = _project_l0_box(_flat(delta), lo, hi, eps)
        else:
            delta_flat = _project_l1_box(_flat(delta), lo, hi, eps)
        return x + delta_flat.reshape(x.shape)

    def linf_bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Elementwise bounds of the linf ball intersected with the box (the feasible set is itself a box).

        Iterative linf attacks compute them once and clamp with them at every step.
        """
        if self.norm is not Norm.LINF:
            raise ValueError(f"linf_bounds is only defined for the linf norm, not {self.norm.value}")
        return torch.clamp(x - self.eps, min=self.lower), torch.clamp(x + self.eps, max=self.upper)

    def clip_to_box(self, x_adv: Tensor) -> Tensor:
        return x_adv.clamp(self.lower, self.upper)

    def random_start(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A point drawn uniformly from the ball around ``x``, then moved into the box.

        Moving into the box clips each coordinate toward ``x`` and so never leaves the ball.
        """
        self._refuse_l0("a random start")
        n = x.shape[0]
        dim = x[0].numel()
        if self.norm is Norm.LINF:
            delta = (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * self.eps
        elif self.norm is Norm.L2:
            direction = torch.randn((n, dim), generator=generator, device=x.device, dtype=x.dtype)
            direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
            radius = torch.rand((n, 1), generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / dim)
            delta = (direction * radius * self.eps).reshape(x.shape)
        else:
            # Uniform in the l1 ball: the first `dim` of `dim + 1` normalized exponentials are uniform on the
            # solid simplex; random signs spread it over the orthants.
            spacings = -torch.log(
                torch.rand((n, dim + 1), generator=generator, device=x.device, dtype=x.dtype).clamp_min(1e-30)
            )
            magnitude = (spacings / spacings.sum(dim=1, keepdim=True))[:, :dim]
            signs = torch.randint(0, 2, (n, dim), generator=generator, device=x.device).to(x.dtype) * 2 - 1
            delta = (magnitude * signs * self.eps).reshape(x.shape)
        return (x + delta).clamp(self.lower, self.upper)

    def steepest_ascent(self, grad: Tensor, *, l1_sparsity: float = 0.99) -> Tensor:
        """Direction of unit norm (in this norm) maximizing the inner product with ``grad``.

        linf: ``sign(grad)``; l2: ``grad / ||grad||_2``. For l1 the exact maximizer is a single coordinate, which
        makes poor progress; like SLIDE (Tramer & Boneh 2019) the step spreads over the coordinates whose
        magnitude is above the ``l1_sparsity`` quantile, with unit l1 norm.
        """
        self._refuse_l0("a steepest-ascent direction")
        if self.norm is Norm.LINF:
            return grad.sign()
        g = _flat(grad)
        if self.norm is Norm.L2:
            return (g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(grad.shape)
        k = max(1, round((1.0 - l1_sparsity) * g.shape[1]))
        magnitude = g.abs()
        threshold = magnitude.topk(k, dim=1).values[:, -1:]
        chosen = (magnitude >= threshold) & (magnitude > 0)
        direction = g.sign() * chosen
        return (direction / direction.abs().sum(dim=1, keepdim=True).clamp_min(1.0)).reshape(grad.shape)

    def lmo(self, direction: Tensor, x: Tensor) -> Tensor:
        """Frank-Wolfe linear maximization oracle: ``argmax_{||v - x|| <= eps} <v, direction>``.

        linf: ``x + eps * sign(direction)``; l2: ``x + eps * direction / ||direction||_2``; l1: ``eps`` on the
        coordinate of largest magnitude. The vertex is not clipped to the box; Frank-Wolfe clips its iterate.
        To minimize a function, pass the negative gradient.
        """
        self._refuse_l0("a linear maximization oracle")
        if self.norm is Norm.LINF:
            return x + self.eps * direction.sign()
        d = _flat(direction)
        if self.norm is Norm.L2:
            step = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        else:
            index = d.abs().argmax(dim=1, keepdim=True)
            step = torch.zeros_like(d).scatter_(1, index, d.gather(1, index).sign())
        return x + self.eps * step.reshape(x.shape)

    def _refuse_l0(self, what: str) -> None:
        if self.norm is Norm.L0:
            raise ConfigError(f"the l0 threat model has no {what}: only minimum-norm attacks (fmn) support l0")


def _project_l0_box(d: Tensor, lo: Tensor, hi: Tensor, eps: float | Tensor) -> Tensor:
    """Nearest point to each row of ``d`` with at most ``floor(eps)`` nonzero coordinates inside [lo, hi].

    Coordinates are independent once the support is fixed: a kept one becomes ``clip(d_i)`` at squared cost
    ``(d_i - clip(d_i))^2``, a dropped one 0 at cost ``d_i^2``, so the support is the coordinates that gain most.
    """
    boxed = torch.max(torch.min(d, hi), lo)
    count = torch.floor(_radius(eps, d) + 1e-9).clamp(0, d.shape[1])
    if bool((count >= d.shape[1]).all()):
        return boxed
    gain = d**2 - (d - boxed) ** 2
    rank = gain.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    return torch.where(rank < count, boxed, torch.zeros_like(boxed))


def _radius(eps: float | Tensor, d: Tensor) -> Tensor:
    """The radius per row as an ``(n, 1)`` column of ``d``'s dtype."""
    if isinstance(eps, Tensor):
        return eps.to(d.dtype).reshape(-1, 1).expand(d.shape[0], 1)
    return torch.full((d.shape[0], 1), float(eps), dtype=d.dtype, device=d.device)


def _project_l2_box(d: Tensor, lo: Tensor, hi: Tensor, eps: float | Tensor) -> Tensor:
    """Nearest point to each row of ``d`` in {||delta||_2 <= eps} intersected with [lo, hi] (lo <= 0 <= hi).

    The solution is ``clip(t * d, lo, hi)`` with the largest ``t`` in (0, 1] whose norm is at most eps.
    Coordinate i saturates once ``t >= c_i / |d_i|`` (c_i = the bound on its side), so ``||.||^2`` equals
    ``sum_saturated c_i^2 + t^2 sum_free d_i^2``: monotone and piecewise quadratic in t, solved on its segment.
    """
    boxed = torch.max(torch.min(d, hi), lo)
    radius = _radius(eps, d)
    inside = boxed.norm(dim=1) <= radius[:, 0]
    if bool(inside.all()):
        return boxed
    magnitude = d.abs()
    cap = torch.where(d >= 0, hi, -lo)
    positive = magnitude > 0
    kink = torch.where(positive, cap / torch.where(positive, magnitude, torch.ones_like(magnitude)), torch.ones_like(d))
    kink = kink.clamp(max=1.0)
    kink_sorted, order = kink.sort(dim=1)
    cap_sq = cap.gather(1, order) ** 2
    mag_sq = magnitude.gather(1, order) ** 2
    saturated_sq = cap_sq.cumsum(dim=1)
    free_sq = mag_sq.sum(dim=1, keepdim=True) - mag_sq.cumsum(dim=1)
    norm_sq_at_kink = saturated_sq + kink_sorted**2 * free_sq
    # Kinks capped at 1 lie beyond the segment of interest (the solution has t < 1 for rows not `inside`).
    norm_sq_at_kink = torch.where(kink_sorted < 1.0, norm_sq_at_kink, torch.full_like(norm_sq_at_kink, math.inf))
    count = (norm_sq_at_kink <= radius**2).sum(dim=1, keepdim=True)
    zero = torch.zeros_like(saturated_sq[:, :1])
    saturated_before = torch.cat([zero, saturated_sq], dim=1).gather(1, count)
    free_before = torch.cat([mag_sq.sum(dim=1, keepdim=True), free_sq], dim=1).gather(1, count)
    finite_sq = torch.where(torch.isfinite(radius), radius**2, torch.zeros_like(radius))  # inf rows are inside
    t = torch.sqrt((finite_sq - saturated_before).clamp_min(0) / free_before.clamp_min(1e-30)).clamp(max=1.0)
    projected = torch.max(torch.min(t * d, hi), lo)
    projected = torch.where(inside[:, None], boxed, projected)
    return _shrink_to_radius(projected, projected.norm(dim=1), radius[:, 0])


def _project_l1_box(d: Tensor, lo: Tensor, hi: Tensor, eps: float | Tensor) -> Tensor:
    """Nearest point to each row of ``d`` in {||delta||_1 <= eps} intersected with [lo, hi] (lo <= 0 <= hi).

    The solution is ``sign(d) * min(max(|d| - lam, 0), c)`` (c = the bound on d's side). The l1 norm
    g(lam) = sum_i min(max(|d_i| - lam, 0), c_i) is piecewise linear and decreasing with kinks at |d_i| - c_i and
    |d_i|; sorting the kinks and accumulating slopes gives g at each kink, and lam on the crossing segment.
    """
    magnitude = d.abs()
    cap = torch.where(d >= 0, hi, -lo)
    boxed_magnitude = torch.min(magnitude, cap)
    total = boxed_magnitude.sum(dim=1, keepdim=True)
    radius = _radius(eps, d)
    inside = (total <= radius).squeeze(1)
    if bool(inside.all()):
        return d.sign() * boxed_magnitude
    start = (magnitude - cap).clamp_min(0)
    kinks = torch.cat([start, magnitude], dim=1)
    events = torch.cat([torch.ones_like(d), -torch.ones_like(d)], dim=1)
    kinks_sorted, order = kinks.sort(dim=1)
    active = events.gather(1, order).cumsum(dim=1)
    # g at the k-th kink: total - sum_{j<k} active_j * (kink_{j+1} - kink_j).
    drop = active[:, :-1] * (kinks_sorted[:, 1:] - kinks_sorted[:, :-1])
    g_at_kink = torch.cat([total, total - drop.cumsum(dim=1)], dim=1)
    count = (g_at_kink > radius).sum(dim=1, keepdim=True).clamp(1, kinks.shape[1] - 1)
    prev = count - 1
    finite = torch.where(torch.isfinite(radius), radius, total)  # inf rows are inside
    lam = kinks_sorted.gather(1, prev) + (g_at_kink.gather(1, prev) - finite) / active.gather(1, prev).clamp_min(1)
    projected = d.sign() * torch.min((magnitude - lam).clamp_min(0), cap)
    projected = torch.where(inside[:, None], d.sign() * boxed_magnitude, projected)
    return _shrink_to_radius(projected, projected.abs().sum(dim=1), radius[:, 0])


def _shrink_to_radius(delta: Tensor, norm: Tensor, eps: float | Tensor) -> Tensor:
    """Guard against rounding: rescale rows whose norm exceeds eps (shrinking toward 0 stays in the box)."""
    scale = torch.where(norm > eps, eps / norm.clamp_min(1e-30), torch.ones_like(norm))
    return delta * scale[:, None]
