"""Bound propagation: exact on linear models, sound on every supported graph, each bound at least as tight as the
cheaper one, the same on a traced residual block as on its hand-written sequential form."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import robustlab
from robustlab.certification import margin_bounds, verify
from robustlab.certification.bounds import BoundOptions, spec_matrix, trace_graph, verify_cascade
from robustlab.models import Normalize

METHODS = ("ibp", "crown", "alpha-crown")


def linear_model(seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(12, 5).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 12, generator=g, dtype=torch.float64))
        layer.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
    return nn.Sequential(nn.Flatten(), layer)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
@pytest.mark.parametrize("method", METHODS)
def test_linear_model_bounds_equal_the_dual_norm_closed_form(norm: str, method: str) -> None:
    model = linear_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 3, 4, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    eps = 0.07
    threat = robustlab.ThreatModel(norm, eps, -math.inf, math.inf)
    result = margin_bounds(model, x, y, threat, method)  # type: ignore[arg-type]
    layer = model[1]
    assert isinstance(layer, nn.Linear)
    dual = {"linf": 1, "l2": 2, "l1": math.inf}[norm]
    for i in range(6):
        others = [j for j in range(5) if j != int(y[i])]
        w = layer.weight[y[i]] - layer.weight[others]
        exact = w @ x[i].flatten() + layer.bias[y[i]] - layer.bias[others] - eps * w.norm(p=dual, dim=1)
        assert torch.allclose(result.margins[i], exact.detach(), atol=1e-10)


# ----------------------------------------------------------------------------------------------- models
class Residual(nn.Module):
    """conv - ReLU - [conv - BN - ReLU - conv] + skip - ReLU - maxpool - linear: a small pre-activation ResNet."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize([0.4], [0.3])
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(channels * 9, 4)

    def forward(self, x: Tensor) -> Tensor:
        z = F.relu(self.stem(self.normalize(x)))
        out = self.conv2(F.relu(self.bn(self.conv1(z))))
        out = F.relu(out + z)
        return self.head(torch.flatten(self.pool(out), 1))


class Mixed(nn.Module):
    """Every other supported operation: LeakyReLU, Tanh, Sigmoid, AvgPool, overlapping padded MaxPool with ceil
    mode, concatenation, subtraction, scaling by constants, mean, a transposed convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.scale = nn.Parameter(torch.tensor([[[0.5]], [[-1.5]]]), requires_grad=False)
        self.head = nn.Linear(2 * 4 * 4 + 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        left = F.leaky_relu(self.a(x), 0.1)
        right = torch.tanh(self.b(x))
        both = torch.cat([left, right - 0.2 * left], dim=1)
        both = F.avg_pool2d(both, 2)
        up = torch.sigmoid(self.up(both)) * self.scale + 1.0
        pooled = F.max_pool2d(up, 3, stride=2, padding=1, ceil_mode=True)
        summary = up.mean(dim=(2, 3))
        return self.head(torch.cat([pooled.flatten(1), summary], dim=1))


class Modules(nn.Module):
    """The module forms of the activations and pools (Mixed calls their functions), an affine input layer other than
    Normalize (per-channel buffers), a BatchNorm that follows an activation (not folded: its own node), view and
    reshape."""

    scale: Tensor
    shift: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([[[6.0]]]))
        self.register_buffer("shift", torch.tensor([[[-3.0]]]))
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.2)
        self.bn = nn.BatchNorm2d(4)
        self.avg = nn.AvgPool2d(2)
        self.sigmoid_branch = nn.Sequential(nn.Conv2d(4, 2, 1), nn.Sigmoid(), nn.AdaptiveAvgPool2d(2))
        self.tanh_branch = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1), nn.Tanh())
        self.head = nn.Sequential(nn.Linear(2 * 2 * 2 + 2, 6), nn.ReLU(), nn.Linear(6, 4))

    def forward(self, x: Tensor) -> Tensor:
        z = self.avg(self.bn(self.leaky(self.conv(x * self.scale + self.shift))))  # (4, 3, 3)
        a = self.sigmoid_branch(z)  # (2, 2, 2): overlapping adaptive windows on 3x3
        b = F.adaptive_avg_pool2d(self.tanh_branch(z), 1)  # (2, 1, 1)
        return self.head(torch.cat([a.view(a.size(0), -1), b.reshape(-1, 2)], dim=1))


def randomize(norm: nn.modules.batchnorm._BatchNorm, spread: float = 0.2) -> None:
    """Running statistics and an affine part far from the identity, so that BatchNorm matters."""
    assert norm.running_mean is not None and norm.running_var is not None
    with torch.no_grad():
        norm.running_mean.uniform_(-spread, spread)
        norm.running_var.uniform_(0.2, 3.0)
        norm.weight.uniform_(-2.0, 2.0)
        norm.bias.uniform_(-1.0, 1.0)


def build(kind: str, seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    if kind == "mlp":
        model: nn.Module = nn.Sequential(
            nn.Flatten(), nn.Linear(36, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4)
        )
    elif kind == "residual":
        residual = Residual()
        randomize(residual.bn)
        model = residual
    elif kind == "modules":
        modules = Modules()
        randomize(modules.bn)
        model = modules
    else:
        model = Mixed()
    return model.double().eval(), (1, 6, 6)


def true_margins(model: nn.Module, z: Tensor, y: Tensor) -> Tensor:
    """f_y(z) - f_j(z) for every j != y, in class order (the rows of the specification)."""
    logits = model(z)
    return (spec_matrix(y, logits.shape[1], logits.dtype) @ logits.unsqueeze(2)).squeeze(2)


def pgd_lowest_margins(model: nn.Module, x: Tensor, y: Tensor, threat: robustlab.ThreatModel) -> Tensor:
    """The smallest margin PGD finds for each (example, other class): 20 steps on that margin alone."""
    g = torch.Generator().manual_seed(5)
    classes = int(model(x[:1]).shape[1])
    worst = true_margins(model, x, y).detach()
    for j in range(classes - 1):
        z = threat.random_start(x, g).requires_grad_(True)
        for _ in range(20):
            margin = true_margins(model, z, y)[:, j]
            (grad,) = torch.autograd.grad(margin.sum(), z)
            step = threat.steepest_ascent(-grad) * threat.eps / 4
            z = threat.project(z.detach() + step, x).requires_grad_(True)
        worst[:, j] = torch.minimum(worst[:, j], true_margins(model, z, y)[:, j].detach())
    return worst


@pytest.mark.parametrize("kind", ["mlp", "residual", "mixed", "modules"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_bounds_are_sound_and_each_at_least_as_tight_as_the_cheaper(kind: str, norm: str) -> None:
    model, shape = build(kind)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, *shape, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    threat = robustlab.ThreatModel(norm, 0.03 if norm == "linf" else 0.15)
    graph = trace_graph(model, shape, dtype=torch.float64)
    options = BoundOptions(alpha_steps=8)
    bounds = {m: margin_bounds(graph, x, y, threat, m, options=options).margins.detach() for m in METHODS}  # type: ignore[arg-type]
    assert bool((bounds["crown"] >= bounds["ibp"] - 1e-12).all())
    assert bool((bounds["alpha-crown"] >= bounds["crown"] - 1e-12).all())
    assert float((bounds["crown"] - bounds["ibp"]).max()) > 1e-4  # CROWN is not IBP in disguise
    if kind in ("mlp", "residual"):  # unstable ReLUs where CROWN does not verify: the optimized slopes must help
        assert float((bounds["alpha-crown"] - bounds["crown"]).max()) > 1e-4
    lowest = pgd_lowest_margins(model, x, y, threat)
    with torch.no_grad():
        for _ in range(100):
            lowest = torch.minimum(lowest, true_margins(model, threat.random_start(x, g), y))
    for method, bound in bounds.items():
        assert bool((lowest >= bound - 1e-9).all()), method


# ----------------------------------------------------------------------------------------------- exact ranges
def two_d_toy(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 7), nn.ReLU(), nn.Linear(7, 2)).double().eval()


def exact_minimum(model: nn.Sequential, center: Tensor, eps: float, row: Tensor) -> float:
    """The exact minimum of ``row @ model(z)`` over the box ``center +- eps`` (2-D, one hidden ReLU layer).

    The function is linear on each cell of the arrangement of the hidden neurons' lines, so its minimum over the
    box is at a vertex of that arrangement clipped to the box: a corner, a line crossing an edge, or two lines
    crossing inside.
    """
    first = model[0]
    assert isinstance(first, nn.Linear)
    w, b = first.weight.detach(), first.bias.detach()
    lo, hi = center - eps, center + eps
    points = [torch.stack([cx, cy]) for cx in (lo[0], hi[0]) for cy in (lo[1], hi[1])]
    for (w0, w1), c in zip(w.tolist(), b.tolist()):
        for fixed in (0, 1):
            for value in (lo[fixed], hi[fixed]):  # the line w.z + c = 0 crossing the edge z[fixed] = value
                other = 1 - fixed
                coefficient = (w0, w1)[other]
                if abs(coefficient) > 1e-12:
                    free = -(c + (w0, w1)[fixed] * value) / coefficient
                    point = torch.empty(2, dtype=torch.float64)
                    point[fixed], point[other] = value, free
                    points.append(point)
    for i, j in itertools.combinations(range(w.shape[0]), 2):
        system = w[[i, j]]
        if abs(float(torch.linalg.det(system))) > 1e-12:
            points.append(torch.linalg.solve(system, -b[[i, j]]))
    inside = [p for p in points if bool(((p >= lo - 1e-12) & (p <= hi + 1e-12)).all())]
    with torch.no_grad():
        values = model(torch.stack(inside)) @ row
    return float(values.min())


@pytest.mark.parametrize("seed", range(4))
def test_bounds_on_a_two_d_toy_contain_the_exact_range(seed: int) -> None:
    model = two_d_toy(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(5, 2, generator=g, dtype=torch.float64) * 2 - 1
    eps = 0.4
    threat = robustlab.ThreatModel("linf", eps, -math.inf, math.inf)
    for label in (0, 1):
        y = torch.full((5,), label, dtype=torch.long)
        row = torch.zeros(2, dtype=torch.float64)
        row[label], row[1 - label] = 1.0, -1.0
        exact = torch.tensor([exact_minimum(model, x[i], eps, row) for i in range(5)], dtype=torch.float64)
        dense = torch.rand(20000, 2, generator=g, dtype=torch.float64) * 2 * eps - eps
        with torch.no_grad():
            sampled = torch.stack([(model(x[i] + dense) @ row).min() for i in range(5)])
        assert bool((sampled >= exact - 1e-12).all())  # the enumeration is the true minimum
        assert float((sampled - exact).max()) < 0.05
        previous = None
        for method in METHODS:
            bound = margin_bounds(model, x, y, threat, method).margins[:, 0].detach()  # type: ignore[arg-type]
            assert bool((bound <= exact + 1e-10).all()), method
            if previous is not None:
                assert bool((bound >= previous - 1e-12).all()), method
            previous = bound
        if seed == 0 and label == 0:
            # One hidden layer with interval bounds of the input exact: CROWN is tight somewhere on this toy.
            assert previous is not None and float((exact - previous).min()) < 0.2


# ----------------------------------------------------------------------------------------------- residual
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Linear(2 * 5 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = F.relu(self.stem(x))
        out = F.relu(self.conv2(F.relu(self.conv1(z))) + z)
        return self.head(out.flatten(1))


def by_hand(block: Block) -> nn.Sequential:
    """The same network as an nn.Sequential: the block's input rides along as extra channels through the first
    convolution (an identity kernel) and its ReLU (exact: it is a ReLU output already), and the second convolution
    adds it back (identity kernel on those channels)."""
    identity = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    identity[0, 0, 1, 1] = identity[1, 1, 1, 1] = 1.0
    assert block.conv1.bias is not None and block.conv2.bias is not None
    widened1 = nn.Conv2d(2, 5, 3, padding=1).double()
    widened2 = nn.Conv2d(5, 2, 3, padding=1).double()
    assert widened1.bias is not None and widened2.bias is not None
    with torch.no_grad():
        widened1.weight.copy_(torch.cat([block.conv1.weight, identity]))
        widened1.bias.copy_(torch.cat([block.conv1.bias, torch.zeros(2, dtype=torch.float64)]))
        widened2.weight.copy_(torch.cat([block.conv2.weight, identity], dim=1))
        widened2.bias.copy_(block.conv2.bias)
    return nn.Sequential(
        block.stem, nn.ReLU(), widened1, nn.ReLU(), widened2, nn.ReLU(), nn.Flatten(), block.head
    ).eval()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_residual_block_traced_equals_its_sequential_form(norm: str) -> None:
    torch.manual_seed(3)
    block = Block().double().eval()
    sequential = by_hand(block)
    x = torch.rand(5, 1, 5, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.allclose(block(x), sequential(x), atol=1e-12)
    y = block(x).argmax(1)
    threat = robustlab.ThreatModel(norm, 0.05 if norm == "linf" else 0.2)
    for method in METHODS:
        graph = margin_bounds(block, x, y, threat, method).margins  # type: ignore[arg-type]
        hand = margin_bounds(sequential, x, y, threat, method).margins  # type: ignore[arg-type]
        assert torch.allclose(graph, hand, atol=1e-9), method


# ----------------------------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_batchnorm_folding_is_exact(kind: str) -> None:
    torch.manual_seed(6)
    if kind == "conv":
        layer: nn.Conv2d | nn.Linear = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        norm: nn.modules.batchnorm._BatchNorm = nn.BatchNorm2d(3)
        model = nn.Sequential(layer, norm, nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))
    else:
        layer = nn.Linear(25, 6)
        norm = nn.BatchNorm1d(6)
        model = nn.Sequential(nn.Flatten(), layer, norm, nn.ReLU(), nn.Linear(6, 4))
    randomize(norm, spread=1.0)
    model = model.double().eval()
    graph = trace_graph(model, (1, 5, 5), dtype=torch.float64)
    assert "+BatchNorm" in graph.describe() and len(graph.nodes) == len(model)  # one node fewer, plus the input
    # The same network with the normalization multiplied into the layer by hand.
    folded = copy.deepcopy(nn.Sequential(*[m for m in model if m is not norm])).eval()
    new = folded[0] if kind == "conv" else folded[1]
    assert isinstance(new, (nn.Conv2d, nn.Linear)) and new.bias is not None
    assert norm.running_mean is not None and norm.running_var is not None
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    with torch.no_grad():
        new.weight.mul_(scale.reshape(-1, *[1] * (new.weight.dim() - 1)))
        new.bias.copy_((new.bias - norm.running_mean) * scale + norm.bias)
    x = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.allclose(graph.forward(x), model(x), atol=1e-12)
    assert torch.allclose(folded(x), model(x), atol=1e-12)
    y = model(x).argmax(1)
    threat = robustlab.ThreatModel("linf", 0.05)
    for method in METHODS:
        ours = margin_bounds(graph, x, y, threat, method).margins  # type: ignore[arg-type]
        theirs = margin_bounds(folded, x, y, threat, method).margins  # type: ignore[arg-type]
        assert torch.allclose(ours, theirs, atol=1e-10), method


# ----------------------------------------------------------------------------------------------- relaxations
@pytest.mark.parametrize("kind", ["relu", "leaky", "sigmoid", "tanh"])
def test_activation_relaxations_hold_on_their_interval(kind: str) -> None:
    from robustlab.certification.bounds.ops import ActivationOp
    from robustlab.certification.bounds.relaxations import activation_relaxation

    op = ActivationOp("relu", 0.2) if kind == "leaky" else ActivationOp(kind)
    g = torch.Generator().manual_seed(8)
    ends = torch.randn(2, 4000, generator=g, dtype=torch.float64) * 4
    ends[:, :100] = ends[:, :100] * 1e-9  # nearly flat intervals
    lower, upper = ends.min(dim=0).values, ends.max(dim=0).values
    relax = activation_relaxation(op, lower, upper)
    zero = torch.zeros_like(lower)
    for t in torch.linspace(0, 1, 41, dtype=torch.float64):
        z = lower + t * (upper - lower)
        f = op.forward(z)
        low = relax.lower_slope * z + (relax.lower_offset if relax.lower_offset is not None else zero)
        high = relax.upper_slope * z + (relax.upper_offset if relax.upper_offset is not None else zero)
        assert bool((low <= f + 1e-12).all()) and bool((f <= high + 1e-12).all())
    # Not trivial: the lines touch the function somewhere on most intervals.
    middle = op.forward((lower + upper) / 2)
    assert float((middle - relax.lower_slope * (lower + upper) / 2).abs().median()) < 10


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "ceil"), [(2, 2, 0, False), (3, 2, 1, True), (3, 1, 1, False), (2, 3, 0, True)]
)
def test_maxpool_bounds_are_sound_for_every_window_layout(kernel: int, stride: int, padding: int, ceil: bool) -> None:
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil), nn.Flatten()
    ).double()
    width = int(model[:2](torch.zeros(1, 1, 7, 7, dtype=torch.float64)).numel())
    model.append(nn.Linear(width, 3).double())
    model.eval()
    g = torch.Generator().manual_seed(10)
    x = torch.rand(4, 1, 7, 7, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    threat = robustlab.ThreatModel("linf", 0.08)
    bounds = [margin_bounds(model, x, y, threat, m).margins.detach() for m in METHODS]  # type: ignore[arg-type]
    assert bool((bounds[1] >= bounds[0] - 1e-12).all()) and bool((bounds[2] >= bounds[1] - 1e-12).all())
    lowest = pgd_lowest_margins(model, x, y, threat)
    with torch.no_grad():
        for _ in range(300):
            lowest = torch.minimum(lowest, true_margins(model, threat.random_start(x, g), y))
    for bound in bounds:
        assert bool((lowest >= bound - 1e-9).all())


# ----------------------------------------------------------------------------------------------- API
def test_cascade_and_verify_agree_with_each_method_on_every_example() -> None:
    model, shape = build("residual", seed=1)
    g = torch.Generator().manual_seed(11)
    x = torch.rand(12, *shape, generator=g, dtype=torch.float64)
    y = model(x).argmax(1)
    y[0] = (y[0] + 1) % 4  # a wrong label: never verified
    threat = robustlab.ThreatModel("linf", 0.004)
    options = BoundOptions(alpha_steps=5)
    cascade = verify_cascade(model, x, y, threat, METHODS, batch_size=5, options=options)
    for method in METHODS:
        direct = margin_bounds(model, x, y, threat, method, options=options).verified  # type: ignore[arg-type]
        assert torch.equal(cascade.verified(method), direct), method
        assert torch.equal(verify(model, x, y, threat, method, options=options, batch_size=5), direct)  # type: ignore[arg-type]
    assert int(cascade.verified_by[0]) == -1
    assert cascade.examples["ibp"] == 11 and set(cascade.seconds) == set(METHODS)
    assert int(cascade.verified("alpha-crown").sum()) > 0 and int(cascade.verified("ibp").sum()) < 11


def test_memory_limit_splits_passes_without_changing_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    from robustlab.certification.bounds import alpha, crown
    from robustlab.certification.bounds.state import BoundState

    model, shape = build("residual", seed=2)
    x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    y = model(x).argmax(1)
    threat = robustlab.ThreatModel("linf", 0.02)
    rows: list[int] = []  # the rows of every backward pass
    original = crown.backward_bound

    def counted(state: BoundState, start: int, a: object, slopes: object = None) -> Tensor:
        rows.append(int((a if isinstance(a, Tensor) else a.values).shape[1]))  # type: ignore[attr-defined]
        return original(state, start, a, slopes)  # type: ignore[arg-type]

    monkeypatch.setattr(crown, "backward_bound", counted)
    monkeypatch.setattr(alpha, "backward_bound", counted)
    roomy, tight = BoundOptions(alpha_steps=4), BoundOptions(alpha_steps=4, memory_mb=1)
    wide = {}
    for method in ("crown", "alpha-crown"):
        assert method in METHODS
        rows.clear()
        wide[method] = margin_bounds(model, x, y, threat, method, options=roomy).margins
        roomy_rows = list(rows)
        rows.clear()
        chunked = margin_bounds(model, x, y, threat, method, options=tight).margins
        assert torch.allclose(wide[method], chunked, atol=1e-10), method
        # 1 MiB really split the intermediate passes: more of them, none as wide as the widest unsplit one.
        assert len(rows) > len(roomy_rows) and max(rows) < max(roomy_rows), method
    # The output's rows one per pass (what a large network at batch 1 gets): CROWN the same, alpha-CROWN the same
    # wherever it has not verified (a chunk whose rows are all verified stops optimizing early).
    monkeypatch.setattr(BoundState, "rows_per_pass", lambda self, start, *, retained=False: 1)
    rows.clear()
    single = margin_bounds(model, x, y, threat, "crown", options=roomy).margins
    assert torch.allclose(wide["crown"], single, atol=1e-10) and max(rows) <= 2  # refinement: one neuron, two sides
    optimized = margin_bounds(model, x, y, threat, "alpha-crown", options=roomy).margins
    open_rows = optimized <= 0
    assert bool(open_rows.any()) and bool((optimized > 0).any())
    assert torch.equal(optimized > 0, wide["alpha-crown"] > 0)
    assert torch.allclose(optimized[open_rows], wide["alpha-crown"][open_rows], atol=1e-10)


def test_ibp_and_crown_ibp_are_differentiable_on_a_residual_graph() -> None:
    model, shape = build("residual", seed=3)
    model = model.float()
    x = torch.rand(4, *shape)
    y = torch.tensor([0, 1, 2, 3])
    threat = robustlab.ThreatModel("linf", 0.05)
    graph = trace_graph(model, shape)
    for method, intermediate in (("ibp", None), ("crown", "ibp")):
        model.zero_grad()
        margin_bounds(graph, x, y, threat, method, intermediate=intermediate).margins.sum().backward()  # type: ignore[arg-type]
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads if g is not None)


def test_a_traced_graph_follows_parameter_updates() -> None:
    model, shape = build("mlp")
    graph = trace_graph(model, shape, dtype=torch.float64)
    x = torch.rand(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert torch.allclose(graph.forward(x), model(x))


# ----------------------------------------------------------------------------------------------- errors
class Squares(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        return h * h


class Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Softmax(dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


class Branching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.mean() > 0.5:  # depends on the input's values
            return self.head(x.flatten(1))
        return -self.head(x.flatten(1))


class ShapeChecked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or int(x.shape[1]) != 1:  # depends on the shape only: fine
            raise ValueError("wrong shape")
        return self.head(x.view(x.size(0), -1))


def test_unsupported_operations_are_named_with_their_place() -> None:
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    threat = robustlab.ThreatModel("linf", 0.1)
    with pytest.raises(
        robustlab.ConfigError,
        match=r"'mul' of two input-dependent tensors \(not linear\) at graph node 'mul' in the forward of Squares",
    ):
        margin_bounds(Squares().eval(), x, y, threat)
    with pytest.raises(robustlab.ConfigError, match=r"Softmax layers at graph node 'inner_2' module 'inner.2'"):
        margin_bounds(Softmaxed().eval(), x, y, threat)
    with pytest.raises(robustlab.ConfigError, match="depends on the input's values"):
        margin_bounds(Branching().eval(), x, y, threat)
    trained = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 3)).train()
    with pytest.raises(robustlab.ConfigError, match=r"BatchNorm in eval mode \(1 is in train mode\)"):
        margin_bounds(trained, x, y, threat)
    with pytest.raises(robustlab.ConfigError, match="method"):
        margin_bounds(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), x, y, threat, "deepz")  # type: ignore[arg-type]
    mixing = nn.Sequential(nn.Flatten(0), nn.Linear(8, 3))
    with pytest.raises(robustlab.ConfigError, match="keep examples apart"):
        margin_bounds(mixing, x, y, threat)
    margins = margin_bounds(ShapeChecked().eval(), x, y, threat, "crown").margins
    assert margins.shape == (2, 2)


def test_robustlab_architectures_trace() -> None:
    from robustlab.models import LeNet5, PreActResNet18, SmallCNN, WideResNet

    for model, shape in ((SmallCNN(), (1, 28, 28)), (LeNet5(), (1, 28, 28)), (PreActResNet18(), (3, 32, 32)),
                         (WideResNet(16, 1), (3, 32, 32))):  # fmt: skip
        graph = trace_graph(model.eval(), shape)
        x = torch.rand(2, *shape)
        with torch.no_grad():
            assert torch.allclose(graph.forward(x), model(x), atol=1e-5)


class StridedResidual(nn.Module):
    """Strided, dilated and grouped convolutions, a strided 1x1 projection on the skip path, BatchNorm: the layouts
    where patches (local coefficients) differ most from a dense map."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.project = nn.Conv2d(4, 4, 1, stride=2)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        z = F.relu(self.stem(x))
        out = self.dilated(F.relu(self.bn(self.down(z))))
        out = F.relu(out + self.project(z))
        return self.head(torch.flatten(out, 1))


@pytest.mark.parametrize("kind", ["residual", "strided", "mixed"])
def test_patches_give_the_same_bounds_as_dense_coefficients(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from robustlab.certification.bounds import crown, patches

    model: nn.Module
    shape: tuple[int, ...]
    if kind == "strided":
        torch.manual_seed(4)
        strided = StridedResidual()
        randomize(strided.bn)
        model, shape = strided.double().eval(), (1, 8, 8)
    else:
        model, shape = build(kind, seed=4)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    y = model(x).argmax(1)
    threat = robustlab.ThreatModel("linf", 0.03)
    options = BoundOptions(alpha_steps=3)
    local = {m: margin_bounds(model, x, y, threat, m, options=options).margins for m in ("crown", "alpha-crown")}
    starts = 0
    original_start = patches.start

    def dense_start(*args: object, **kwargs: object) -> Tensor:
        nonlocal starts
        starts += 1
        return patches.to_dense(original_start(*args, **kwargs))  # type: ignore[arg-type]

    monkeypatch.setattr(crown.patches, "start", dense_start)
    for method, bound in local.items():
        dense = margin_bounds(model, x, y, threat, method, options=options).margins  # type: ignore[arg-type]
        assert torch.allclose(bound, dense, atol=1e-9), method
    assert starts > 0  # the dense run really went through the replaced start
