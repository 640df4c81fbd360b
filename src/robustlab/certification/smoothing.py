"""Randomized smoothing: certified L2 robustness from Gaussian noise.

Cohen, Rosenfeld, Kolter. "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019 (reference
``locuslab/smoothing``, ``code/core.py``). The smoothed classifier is ``g(x) = argmax_c P(f(x + e) = c)`` with
``e ~ N(0, sigma^2 I)`` in input space (no clipping). Only top-1 labels of the base classifier ``f`` are used, so
``f`` may be a black box: it is reached through a :class:`~robustlab.oracles.LabelOracle` that counts every query.

Guarantees (each holds with probability at least ``1 - alpha`` over the noise, for each input separately):

- :meth:`RandomizedSmoothing.certify` returns a class ``c`` and radius ``R``: ``g(x + d) = c`` for every
  ``||d||_2 < R`` — or abstains (class ``ABSTAIN``, radius 0). It guesses the top class from ``n0`` samples, then
  counts it in ``n`` fresh samples (selection and estimation samples are kept apart) and uses the one-sided
  Clopper-Pearson lower bound ``pA`` of its probability: abstain if ``pA < 1/2``, else ``R = sigma * Phi^-1(pA)``.
- :meth:`RandomizedSmoothing.predict` returns ``g(x)`` or abstains: a two-sided binomial test of the top two
  counts among ``n`` samples; it abstains when the p-value exceeds ``alpha``, so a returned class differs from
  ``g(x)`` with probability at most ``alpha``.

Unlike the reference, which certifies one image at a time, every call is batched over inputs *and* noise: the
model sees batches mixing the noisy copies of several images, and one draw of noise is shared across the images of
a batch (each image's samples stay independent of each other, which is all the per-image guarantee needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustlab.checks import check_number, check_positive_int
from robustlab.errors import ConfigError, InvalidInputError
from robustlab.oracles import LabelOracle, module_function

__all__ = [
    "ABSTAIN",
    "Certificate",
    "RandomizedSmoothing",
    "certified_accuracy",
    "clopper_pearson_lower",
]

ABSTAIN = -1


def clopper_pearson_lower(successes: Tensor | int, trials: int, alpha: float) -> Tensor:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion.

    Equals ``statsmodels.stats.proportion.proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``: the
    ``alpha`` quantile of Beta(k, n - k + 1), and 0 when ``k = 0``.
    """
    from scipy.stats import beta

    k = torch.as_tensor(successes).detach().cpu().double()
    bound = beta.ppf(alpha, k.numpy(), trials - k.numpy() + 1)
    out = torch.as_tensor(bound, dtype=torch.float64)
    return torch.where(k > 0, torch.nan_to_num(out, nan=0.0), torch.zeros_like(out))


def _binomial_two_sided_pvalue(top: int, runner_up: int) -> float:
    from scipy.stats import binomtest

    total = top + runner_up
    if total == 0:
        return 1.0
    return float(binomtest(top, total, 0.5).pvalue)


@dataclass(frozen=True)
class Certificate:
    """Per-example outcome of :meth:`RandomizedSmoothing.certify`.

    Attributes:
        prediction: the certified class, or ``ABSTAIN`` (-1).
        radius: certified L2 radius (0 when abstaining).
        p_lower: the (1 - alpha) lower confidence bound of the top class's probability.
        counts: top-class count among the ``n`` estimation samples.
        queries: base-model queries spent per example (n0 + n).
    """

    prediction: Tensor
    radius: Tensor
    p_lower: Tensor
    counts: Tensor
    queries: Tensor


class RandomizedSmoothing:
    """The Gaussian-smoothed version of a base classifier.

    Args:
        model: the base classifier: a ``torch.nn.Module`` (used as a label-only black box) or a
            :class:`LabelOracle` (e.g. a remote model). Only labels are ever requested.
        num_classes: number of classes, or None to take the model's output width (a label-only black box must
            then declare it, as remote oracles do). A given number must equal the model's width.
        sigma: noise standard deviation, in input units.
        batch_size: noisy inputs per model call.
    """

    def __init__(
        self, model: nn.Module | LabelOracle, num_classes: int | None, sigma: float, *, batch_size: int = 1000
    ) -> None:
        sigma = check_number("sigma", sigma, low=0, low_open=True)
        if num_classes is not None:
            check_positive_int("num_classes", num_classes, minimum=2)
        check_positive_int("batch_size", batch_size)
        if isinstance(model, LabelOracle):
            if None not in (num_classes, model.num_classes) and num_classes != model.num_classes:
                raise ConfigError(f"num_classes is {num_classes}, but the model answers {model.num_classes} classes")
            self.oracle = model
        else:  # the oracle checks every answer's width against num_classes
            self.oracle = LabelOracle(module_function(model), num_classes=num_classes)
        self._num_classes = num_classes
        self.sigma = float(sigma)
        self.batch_size = batch_size

    @property
    def num_classes(self) -> int | None:
        """The number of classes: given, or the model's output width once it has answered."""
        return self._num_classes if self._num_classes is not None else self.oracle.num_classes

    # ------------------------------------------------------------------ sampling
    def sample_counts(self, x: Tensor, num: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Class counts ``(len(x), num_classes)`` of the base model over ``num`` noisy copies of each input, and
        the queries spent per example."""
        check_positive_int("the number of noise samples", num)
        if not x.is_floating_point() or x.dim() < 2:
            raise InvalidInputError(f"x must be a floating batch (n, ...), got {x.dtype} {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise InvalidInputError("x contains NaN or Inf values")
        images = x.shape[0]
        oracle = self.oracle.bind(images, x.device)
        counts: Tensor | None = None  # sized by the model's first answer when the class count is not known yet
        # Each model call holds `per_image` noisy copies of every image of a group of `group` images.
        group = max(1, min(images, self.batch_size // min(num, self.batch_size)))
        per_image = max(1, self.batch_size // group)
        for start in range(0, images, group):
            chunk = x[start : start + group]
            members = chunk.shape[0]
            index = torch.arange(start, start + members, device=x.device)
            remaining = num
            while remaining > 0:
                copies = min(per_image, remaining)
                noise = torch.randn((copies, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
                noisy = (chunk.unsqueeze(1) + self.sigma * noise.unsqueeze(0)).reshape(-1, *x.shape[1:])
                labels = oracle.labels(noisy, index.repeat_interleave(copies))
                classes = self._num_classes if self._num_classes is not None else oracle.num_classes
                if classes is None:
                    raise ConfigError(
                        "the base model answers labels only and does not declare its number of classes: "
                        "pass num_classes"
                    )
                if counts is None:
                    counts = torch.zeros(images, classes, dtype=torch.long, device=x.device)
                    self._num_classes = classes  # learnt by the bound copy; later calls check against it
                if bool(((labels < 0) | (labels >= classes)).any()):
                    raise InvalidInputError(f"the base model returned labels outside 0..{classes - 1}")
                rows = torch.arange(members, device=x.device).repeat_interleave(copies)
                counts.index_put_((start + rows, labels), torch.ones_like(labels), accumulate=True)
                remaining -= copies
        if counts is None:  # no images
            counts = torch.zeros(images, self.num_classes or 0, dtype=torch.long, device=x.device)
        return counts, oracle.queries.clone()

    # -------------------------------------------------------------- procedures
    def predict(
        self, x: Tensor, n: int = 100_000, alpha: float = 0.001, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """``g(x)`` per example, or ``ABSTAIN``; wrong with probability at most ``alpha`` for each example."""
        _check_alpha(alpha)
        counts, _ = self.sample_counts(x, n, generator)
        top2 = counts.topk(2, dim=1)
        out = top2.indices[:, 0].clone()
        for i in range(x.shape[0]):
            if _binomial_two_sided_pvalue(int(top2.values[i, 0]), int(top2.values[i, 1])) > alpha:
                out[i] = ABSTAIN
        return out

    def certify(
        self,
        x: Tensor,
        n0: int = 100,
        n: int = 100_000,
        alpha: float = 0.001,
        *,
        generator: torch.Generator | None = None,
    ) -> Certificate:
        """Certify each example: class and L2 radius valid with probability >= 1 - alpha, or abstain."""
        _check_alpha(alpha)
        selection, queries0 = self.sample_counts(x, n0, generator)
        guess = selection.argmax(dim=1)
        estimation, queries = self.sample_counts(x, n, generator)
        top_count = estimation.gather(1, guess[:, None]).squeeze(1)
        p_lower = clopper_pearson_lower(top_count, n, alpha).to(x.device)
        certified = p_lower >= 0.5
        normal = torch.distributions.Normal(
            torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
        )
        # Phi^-1(1/2) = 0; clamp keeps icdf finite when p_lower is 1 - tiny.
        radius = self.sigma * normal.icdf(p_lower.clamp(max=1 - 1e-16).cpu()).to(x.device)
        return Certificate(
            prediction=torch.where(certified, guess, torch.full_like(guess, ABSTAIN)),
            radius=torch.where(certified, radius.float(), torch.zeros_like(radius, dtype=torch.float32)),
            p_lower=p_lower,
            counts=top_count,
            queries=queries0 + queries,
        )


def certified_accuracy(certificate: Certificate, labels: Tensor, radii: list[float]) -> list[float]:
    """Fraction of examples certified correct with radius at least ``r``, for each ``r`` in ``radii``.

    At radius 0 an example counts when the certified class is right (it did not abstain).
    """
    correct = certificate.prediction == labels.to(certificate.prediction.device)
    return [float((correct & (certificate.radius >= r)).float().mean()) for r in radii]


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, float) and 0.0 < alpha < 0.5):
        raise ConfigError(f"alpha must be a float in (0, 0.5), got {alpha!r}")
