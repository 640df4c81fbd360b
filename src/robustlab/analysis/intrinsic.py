"""Intrinsic robustness: how robust can any classifier be on a data distribution, through a generative model of it.

Zhang, Chen, Gu & Evans, "Understanding the Intrinsic Robustness of Image Distributions using Conditional Generative
Models" (AISTATS 2020; also J. Chen's dissertation, ch. 4) model the data as a class-conditional generator: class
``k`` with prior ``p_k`` is ``G_k(z)``, ``z ~ N(0, I_d)``, ``G_k`` ``L_k``-Lipschitz from the latent l2 norm to the
threat model's norm. Gaussian isoperimetry (Borell; Sudakov-Tsirelson) bounds any classifier ``f``: if its error on
class ``k`` is ``alpha_k``, the latent error set has Gaussian measure ``alpha_k``, its ``eps / L_k`` expansion has
measure at least ``Phi(Phi^{-1}(alpha_k) + eps / L_k)``, and ``G_k`` maps that expansion into the ``eps`` expansion
of the error set in image space. Hence the robust accuracy at radius eps on the generated distribution satisfies

    AdvRob_eps(f) <= sum_k p_k Phi(Phi^{-1}(1 - alpha_k) - eps / L_k)                (:func:`robustness_bound`)

and, ``a -> Phi(Phi^{-1}(a) - c)`` being concave, ``<= Phi(Phi^{-1}(1 - alpha) - eps / L)`` with ``alpha`` the total
error and ``L = max_k L_k`` (:func:`intrinsic_limit`). The adversary of the bound may stay on the generated manifold
(``x' = G_k(z')``), so it also bounds *in-distribution* robustness, which :func:`in_distribution_attack` measures.

The bound is an estimate conditioned on the generative model: it holds for the generated distribution, not the
real one, and ``L_k`` is estimated (:func:`generator_lipschitz`: the largest Jacobian norm over sampled latents, and
a reverse-Weibull extrapolation of per-batch maxima as in CLEVER), not certified. A too-small ``L_k`` makes the
bound too low.

Here the generator is a small conditional VAE (Kingma et al. 2014, "Semi-Supervised Learning with Deep Generative
Models", M2's conditional decoder; :class:`ConditionalVAE`, trained by :func:`train_cvae`): stable and fast on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError
from robustlab.threat import Norm, ThreatModel
from robustlab.utils import model_mode

__all__ = [
    "CVAEConfig",
    "ConditionalVAE",
    "GeneratorLipschitz",
    "IntrinsicResult",
    "generator_lipschitz",
    "in_distribution_attack",
    "intrinsic_limit",
    "intrinsic_robustness",
    "jacobian_norm",
    "load_cvae",
    "robustness_bound",
    "save_cvae",
    "train_cvae",
]

Generator = Callable[[Tensor, Tensor], Tensor]  # (latents, labels) -> images


def _phi(t: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(t / math.sqrt(2.0)))


def _phi_inverse(p: Tensor) -> Tensor:
    return math.sqrt(2.0) * torch.erfinv(2 * p - 1)


def robustness_bound(
    eps: Sequence[float] | Tensor, lipschitz: Tensor, error: Tensor, prior: Tensor | None = None
) -> Tensor:
    """``sum_k p_k Phi(Phi^{-1}(1 - alpha_k) - eps / L_k)`` for each eps (Zhang et al. 2020's class-conditional
    bound): an upper bound on the robust accuracy of a classifier with per-class error ``error`` on the generated
    distribution whose class generators have Lipschitz constants ``lipschitz``. ``prior`` defaults to uniform."""
    eps_t = torch.as_tensor(eps, dtype=torch.float64).reshape(-1, 1)
    lip = torch.as_tensor(lipschitz, dtype=torch.float64).reshape(1, -1)
    err = torch.as_tensor(error, dtype=torch.float64).reshape(1, -1).clamp(0.0, 1.0)
    if lip.shape != err.shape:
        raise ConfigError(f"one Lipschitz constant and one error rate per class: got {lip.shape[1]} and {err.shape[1]}")
    if not bool((lip > 0).all()):
        raise ConfigError("generator Lipschitz constants must be positive")
    weights = torch.full_like(lip, 1.0 / lip.shape[1]) if prior is None else torch.as_tensor(prior).reshape(1, -1)
    weights = weights.to(torch.float64) / weights.sum()
    accuracy = (1 - err).clamp(1e-300, 1.0)
    per_class = torch.where(accuracy >= 1.0, torch.ones_like(accuracy), _phi(_phi_inverse(accuracy) - eps_t / lip))
    return (per_class * weights).sum(1)


def intrinsic_limit(eps: Sequence[float] | Tensor, lipschitz: float, error: float) -> Tensor:
    """``Phi(Phi^{-1}(1 - alpha) - eps / L)``: the most robust accuracy any classifier with error at least ``alpha``
    can have at each eps when every class generator is ``L``-Lipschitz (the intrinsic robustness limit)."""
    return robustness_bound(eps, torch.tensor([lipschitz]), torch.tensor([error]))


# ------------------------------------------------------------------------------------------------ generator
class ConditionalVAE(nn.Module):
    """A conditional VAE on images in [0, 1]: MLP encoder ``(x, y) -> (mu, log var)``, decoder ``(z, y) -> x``.

    :meth:`generate` (the decoder's mean image, a sigmoid) is the generator ``G(z, y)`` the bound is about.
    """

    def __init__(self, image_shape: Sequence[int], num_classes: int, latent_dim: int = 8, hidden: int = 400) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes, self.latent_dim = int(num_classes), int(latent_dim)
        size = math.prod(self.image_shape)
        self.encoder = nn.Sequential(nn.Linear(size + num_classes, hidden), nn.ReLU())
        self.mu = nn.Linear(hidden, latent_dim)
        self.log_var = nn.Linear(hidden, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim + num_classes, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, size),
        )  # fmt: skip

    def _onehot(self, y: Tensor, like: Tensor) -> Tensor:
        return F.one_hot(y, self.num_classes).to(like.dtype)

    def generate(self, z: Tensor, y: Tensor) -> Tensor:
        logits = self.decoder(torch.cat([z, self._onehot(y, z)], dim=1))
        return torch.sigmoid(logits).reshape(len(z), *self.image_shape)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction logits, mu, log var) of a batch."""
        h = self.encoder(torch.cat([x.reshape(len(x), -1), self._onehot(y, x)], dim=1))
        mu, log_var = self.mu(h), self.log_var(h).clamp(-10, 10)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        return self.decoder(torch.cat([z, self._onehot(y, z)], dim=1)), mu, log_var


@dataclass(frozen=True)
class CVAEConfig:
    """Training of :class:`ConditionalVAE` (Adam, Bernoulli likelihood, KL weight ``beta``)."""

    latent_dim: int = 8
    hidden: int = 400
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        for name in ("latent_dim", "hidden", "epochs", "batch_size"):
            check_positive_int(name, getattr(self, name))
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("beta", self.beta, low=0)


def train_cvae(data: Any, config: CVAEConfig | None = None, *, device: Any = "cpu") -> ConditionalVAE:
    """Train a conditional VAE on any :class:`~robustlab.data.ImageData` (read batch by batch, shuffled per epoch)."""
    from robustlab.data import iter_batches

    config = config or CVAEConfig()
    config.validate()
    torch.manual_seed(config.seed)  # the VAE's initialization and its sampling noise
    model = ConditionalVAE(tuple(data.image_shape), int(data.num_classes), config.latent_dim, config.hidden).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    order_generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=order_generator)
        for x, y in iter_batches(data, order.split(config.batch_size)):
            x, y = x.to(device), y.to(device)
            logits, mu, log_var = model(x, y)
            reconstruction = F.binary_cross_entropy_with_logits(logits, x.reshape(len(x), -1), reduction="sum")
            kl = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp())
            loss = (reconstruction + config.beta * kl) / len(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


CVAE_FORMAT = "robustlab-cvae-v1"


def save_cvae(model: ConditionalVAE, path: Any) -> None:
    """Save the VAE's sizes and weights (tensors and numbers only: read back without unpickling code)."""
    from robustlab.state_io import save_atomic

    hidden = model.mu.in_features
    save_atomic({"format": CVAE_FORMAT, "image_shape": list(model.image_shape), "num_classes": model.num_classes,
                 "latent_dim": model.latent_dim, "hidden": int(hidden), "state": model.state_dict()}, path)  # fmt: skip


def load_cvae(path: Any, *, device: Any = "cpu") -> ConditionalVAE:
    """A VAE written by :func:`save_cvae` (``torch.load(weights_only=True)``; anything else is a StateFileError)."""
    from robustlab.errors import StateFileError
    from robustlab.state_io import load_state_file

    fix = "Delete it to train a new generative model"
    saved = load_state_file(path, what="a conditional VAE", fix=fix, map_location=device)
    if saved.get("format") != CVAE_FORMAT:
        raise StateFileError(f"{path} is not a robustlab conditional VAE ({CVAE_FORMAT}). {fix}")
    model = ConditionalVAE(saved["image_shape"], saved["num_classes"], saved["latent_dim"], saved["hidden"])
    try:
        model.load_state_dict(saved["state"])
    except RuntimeError as exc:
        raise StateFileError(f"{path} holds weights that do not fit its declared sizes. {fix}") from exc
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------- generator Lipschitz
@dataclass(frozen=True)
class GeneratorLipschitz:
    """Per-class estimates of the generator's Lipschitz constant (latent l2 -> image norm).

    ``sampled_max``: the largest exact Jacobian norm ``||J(z)||_{2->p}`` over the sampled latents (a lower bound of
    the constant over the whole latent space); ``weibull``: the reverse-Weibull location fitted to per-batch
    maxima (CLEVER's extrapolation; at least ``sampled_max``).
    """

    norm: Norm
    sampled_max: Tensor
    weibull: Tensor

    def summary(self) -> dict[str, Any]:
        return {"norm": self.norm.value, "sampled_max": self.sampled_max.tolist(), "weibull": self.weibull.tolist()}


def jacobian_norm(generator: Generator, z: Tensor, y: Tensor, norm: Norm) -> Tensor:
    """``||J(z)||_{2->p}`` of ``z -> generator(z, y)`` per latent: the spectral norm (l2) or the largest row l2 norm
    (linf), from the full Jacobian (forward mode, one pass per latent dimension)."""
    if norm not in (Norm.L2, Norm.LINF):
        raise ConfigError(f"generator Lipschitz constants are computed for l2 and linf image norms, not {norm.value}")
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    columns = []
    for k in range(z.shape[1]):
        tangent = eye[k].expand_as(z)
        outputs = torch.func.jvp(lambda latent: generator(latent, y), (z,), (tangent,))
        columns.append(outputs[1].reshape(len(z), -1))
    jacobian = torch.stack(columns, dim=2)  # (n, D, d)
    if norm is Norm.L2:
        return torch.linalg.matrix_norm(jacobian, ord=2)
    return jacobian.norm(dim=2).amax(dim=1)


def generator_lipschitz(
    generator: Generator,
    num_classes: int,
    latent_dim: int,
    norm: Norm | str,
    *,
    batches: int = 20,
    batch_size: int = 64,
    seed: int = 0,
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
) -> GeneratorLipschitz:
    """Estimate each class generator's Lipschitz constant over latents drawn from ``N(0, I)``."""
    from robustlab.analysis.lipschitz import _reverse_weibull_location

    norm = Norm.parse(norm)
    check_positive_int("batches", batches, minimum=2)
    check_positive_int("batch_size", batch_size)
    rng = torch.Generator(device=device).manual_seed(seed)
    sampled, weibull = [], []
    with torch.no_grad():
        for k in range(num_classes):
            maxima = torch.empty(batches, dtype=torch.float64)
            for b in range(batches):
                z = torch.randn((batch_size, latent_dim), generator=rng, device=device, dtype=dtype)
                y = torch.full((batch_size,), k, dtype=torch.long, device=device)
                maxima[b] = float(jacobian_norm(generator, z, y, norm).max())
            sampled.append(float(maxima.max()))
            weibull.append(_reverse_weibull_location(maxima))
    return GeneratorLipschitz(
        norm, torch.tensor(sampled, dtype=torch.float64), torch.tensor(weibull, dtype=torch.float64)
    )


# ------------------------------------------------------------------------------------- in-distribution attack
def in_distribution_attack(
    classifier: nn.Module,
    generator: Generator,
    z: Tensor,
    y: Tensor,
    threat: ThreatModel,
    *,
    steps: int = 50,
    step_size: float = 0.1,
    restarts: int = 1,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """(broken mask, adversarial images) of latent-space PGD constrained to the generated manifold.

    Ascends the classifier's cross-entropy in latent space from ``z`` (normalized-gradient steps of ``step_size``);
    after each step the latent is pulled back along the segment from ``z`` by bisection until
    ``||G(z') - G(z)|| <= eps`` in the threat norm. An example counts as broken only when a fresh forward pass
    misclassifies ``G(z')`` and ``G(z')`` lies in the threat model's ball around ``G(z)`` and in its box.
    """
    with torch.no_grad():
        x = generator(z, y)
    rng = torch.Generator(device=z.device).manual_seed(seed)
    broken = torch.zeros(len(z), dtype=torch.bool, device=z.device)
    x_adv = x.clone()
    with model_mode(classifier, "eval"):
        for restart in range(restarts):
            latent = z.clone()
            if restart > 0:
                latent = latent + 0.1 * torch.randn(z.shape, generator=rng, device=z.device, dtype=z.dtype)
                latent = _pull_back(generator, z, latent, y, x, threat)
            for _ in range(steps):
                latent = latent.detach().requires_grad_(True)
                loss = F.cross_entropy(classifier(generator(latent, y)), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, latent)
                unit = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
                latent = _pull_back(generator, z, latent.detach() + step_size * unit, y, x, threat)
                with torch.no_grad():
                    candidate = generator(latent, y)
                    wrong = (classifier(candidate).argmax(1) != y) & threat.contains(candidate, x) & ~broken
                x_adv[wrong] = candidate[wrong]
                broken |= wrong
    with torch.no_grad():  # the fresh re-check of every claimed success
        verified = (classifier(x_adv).argmax(1) != y) & threat.contains(x_adv, x)
    return broken & verified, x_adv


def _pull_back(
    generator: Generator, z: Tensor, latent: Tensor, y: Tensor, x: Tensor, threat: ThreatModel, rounds: int = 12
) -> Tensor:
    """Each latent moved toward ``z`` along the segment until its image lies in the eps ball around ``x``."""
    with torch.no_grad():
        inside = threat.distance(generator(latent, y), x) <= threat.eps
        if bool(inside.all()):
            return latent
        low = torch.zeros(len(z), dtype=z.dtype, device=z.device)
        high = torch.ones_like(low)
        for _ in range(rounds):
            middle = (low + high) / 2
            point = z + middle[:, None] * (latent - z)
            ok = threat.distance(generator(point, y), x) <= threat.eps
            low = torch.where(ok, middle, low)
            high = torch.where(ok, high, middle)
        fraction = torch.where(inside, torch.ones_like(low), low)
        return z + fraction[:, None] * (latent - z)


# ------------------------------------------------------------------------------------------------- together
@dataclass(frozen=True)
class IntrinsicResult:
    """The bound at each eps next to the classifier's robust accuracies on generated data.

    ``bound_sampled`` uses the sampled-maximum Lipschitz estimates (the larger, safer bound), ``bound_weibull`` the
    reverse-Weibull ones; ``in_distribution`` is robust accuracy against the latent-space attack (the adversary of
    the bound), ``unconstrained`` against PGD in the full ball. All on ``examples`` generated images.
    """

    eps: list[float]
    norm: Norm
    error: Tensor
    lipschitz: GeneratorLipschitz
    bound_sampled: Tensor
    bound_weibull: Tensor
    in_distribution: Tensor
    unconstrained: Tensor
    examples: int

    def summary(self) -> dict[str, Any]:
        return {
            "eps": self.eps, "norm": self.norm.value, "examples": self.examples,
            "generated_accuracy": float(1 - self.error.mean()), "per_class_error": self.error.tolist(),
            "lipschitz": self.lipschitz.summary(), "bound_sampled_lipschitz": self.bound_sampled.tolist(),
            "bound_weibull_lipschitz": self.bound_weibull.tolist(),
            "in_distribution_robust_accuracy": self.in_distribution.tolist(),
            "unconstrained_robust_accuracy": self.unconstrained.tolist(),
            "note": "an estimate conditioned on the generative model: it bounds robustness on the generated "
            "distribution, with estimated (not certified) generator Lipschitz constants",
        }  # fmt: skip


def intrinsic_robustness(
    classifier: nn.Module,
    generator: Generator,
    num_classes: int,
    latent_dim: int,
    norm: Norm | str,
    eps: Sequence[float],
    *,
    per_class: int = 100,
    lipschitz_batches: int = 20,
    attack_steps: int = 50,
    seed: int = 0,
    device: Any = "cpu",
) -> IntrinsicResult:
    """Sample ``per_class`` generated images per class, measure the classifier's per-class error on them, estimate
    the generators' Lipschitz constants, and report the bound and both robust accuracies at each eps."""
    import robustlab

    norm = Norm.parse(norm)
    if not eps:
        raise ConfigError("give at least one eps")
    rng = torch.Generator(device=device).manual_seed(seed)
    z = torch.randn((num_classes * per_class, latent_dim), generator=rng, device=device)
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    with torch.no_grad(), model_mode(classifier, "eval"):
        x = generator(z, y)
        correct = classifier(x).argmax(1) == y
    error = 1 - correct.float().reshape(num_classes, per_class).mean(1).double()
    lipschitz = generator_lipschitz(generator, num_classes, latent_dim, norm, batches=lipschitz_batches, seed=seed,
                                    device=device)  # fmt: skip
    in_distribution, unconstrained = [], []
    for radius in eps:
        threat = ThreatModel(norm, radius)
        broken, _ = in_distribution_attack(classifier, generator, z, y, threat, steps=attack_steps, seed=seed)
        in_distribution.append(float((correct & ~broken).float().mean()))
        with model_mode(classifier, "eval"):
            pgd = robustlab.attack(classifier, x, y, threat, method="pgd", steps=attack_steps, seed=seed)
        unconstrained.append(float((correct & ~pgd.success).float().mean()))
    return IntrinsicResult(
        eps=[float(e) for e in eps], norm=norm, error=error, lipschitz=lipschitz,
        bound_sampled=robustness_bound(eps, lipschitz.sampled_max, error),
        bound_weibull=robustness_bound(eps, lipschitz.weibull, error),
        in_distribution=torch.tensor(in_distribution), unconstrained=torch.tensor(unconstrained),
        examples=len(z),
    )  # fmt: skip
