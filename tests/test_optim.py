"""Every optimiser registry entry, driven by one table, plus the wrappers' own behaviour.

The table (:data:`TABLE`) gives each registered name the options and rates it is tested
with. For each entry: it reaches the least-squares optimum of a linear model (a convex
quadratic) within :data:`QUADRATIC_TOL` and the minimum of Rosenbrock's function within
:data:`ROSENBROCK_TOL`; a ``state_dict`` saved mid-run (through ``torch.save`` and
``torch.load(weights_only=True)``) continues exactly like the uninterrupted run; an LR
schedule reaches it (a rate of zero stops it); and a float64 or bfloat16 model keeps its
dtype. Adding a method is one line in the table; a registered name missing from it fails.
"""

from __future__ import annotations

import copy
import io
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn

from ribbed.data import load_dataset
from ribbed.extensions import load_extensions
from ribbed.optim import (
    OPTIMIZERS,
    NaturalGradient,
    OptimizerError,
    TrustRatio,
    build_optimizer,
    record_batch,
)
from ribbed.optim.functional import FlatParameters
from ribbed.optim.library import muon_param_groups
from ribbed.optim.natural_gradient import fisher_rows
from ribbed.train import build_run, train
from tests import processes
from tests.ribbed_configurations import BATTERY as RIBBED_BATTERY
from tests.ribbed_configurations import RIBBED_CONFIGURATIONS

QUADRATIC_TOL = 1e-3
"""Largest absolute error of any weight or bias against the least-squares solution."""
ROSENBROCK_TOL = 5e-2
"""Largest absolute error of either coordinate against Rosenbrock's minimum (1, 1), from (0, 0)."""


@dataclass(frozen=True)
class Entry:
    """How one registry entry is tested: rates per problem, steps per problem, options."""

    name: str
    quadratic_lr: float
    rosenbrock_lr: float
    options: dict[str, Any] = field(default_factory=dict)
    quadratic_steps: int = 500
    rosenbrock_steps: int = 1000
    constant_rate: bool = False  # for methods that set their own step size (Adagrad, line searches)
    label: str = ""  # a configuration of a registry name (``ribbed[metabp]``); default: the name

    def __str__(self) -> str:
        return self.label or self.name


NO_DECAY = {"weight_decay": 0.0}
TABLE = [
    Entry("sgd", 0.1, 0.003, {"momentum": 0.9}, rosenbrock_steps=2000),
    Entry("adam", 0.3, 0.3),
    Entry("adamw", 0.3, 0.3, NO_DECAY),
    Entry("rmsprop", 0.1, 0.01, {"momentum": 0.9}),
    Entry("adagrad", 1.0, 0.3, rosenbrock_steps=3000, constant_rate=True),
    Entry("lion", 0.1, 0.03, rosenbrock_steps=2000),
    Entry("lamb", 0.05, 0.05, rosenbrock_steps=2000),
    Entry("lars", 0.1, 0.1, {"trust_coefficient": 1.0}, quadratic_steps=800, rosenbrock_steps=2000),
    Entry("adan", 0.3, 0.1),
    Entry("muon", 0.1, 0.1, {"adamw_lr": 0.1}),
    Entry("lookahead", 0.3, 0.3, {"base": "adamw", "base_options": NO_DECAY}),
    Entry("layerwise", 0.3, 0.3, {"base": "adamw", "base_options": NO_DECAY,
                                  "rules": [{"pattern": "*weight", "lr_scale": 0.5}]}),
    Entry("trust_ratio", 0.1, 0.1, {"base": "adam"}),
    Entry("kfac", 0.1, 0.1, {"base": "adam", "damping": 1.0, "kl_clip": None}, quadratic_steps=300),
    Entry("natural_gradient", 1.0, 1.0, {"fisher": "exact", "likelihood": "gaussian"},
          quadratic_steps=10, rosenbrock_steps=30),
    Entry("hessian_free", 1.0, 1.0, quadratic_steps=20, rosenbrock_steps=30, constant_rate=True),
    Entry("ribbed", 0.1, 0.1, {"base_options": NO_DECAY}),
    Entry("adam-hd", 0.1, 0.1),
    Entry("continual-backprop", 0.3, 0.3, {"base_options": NO_DECAY}),
    Entry("redo", 0.3, 0.3, {"base_options": NO_DECAY}),
    Entry("shrink-perturb", 0.3, 0.3, {"base_options": NO_DECAY, "shrink": 0.999999, "sigma": 1e-7}),
    Entry("upgd", 0.25, 0.004, {"weight_decay": 0.0, "sigma": 1e-6}, quadratic_steps=2000),
    Entry("adamw-l2", 0.3, 0.3, {"base_options": NO_DECAY, "l2": 1e-6}),
    Entry("schedulefree-adamw", 0.3, 0.1, rosenbrock_steps=2000),
    Entry("norm-projected", 0.3, 0.3, {"base_options": NO_DECAY, "scope": "all"}),
    *(Entry("ribbed", **{"quadratic_lr": 0.1, "rosenbrock_lr": 0.1, **settings}, label=f"ribbed[{name}]",
            options={**RIBBED_CONFIGURATIONS[name],
                     "base_options": {**RIBBED_CONFIGURATIONS[name].get("base_options", {}), **NO_DECAY}})
      for name, settings in RIBBED_BATTERY.items()),
]


KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("schedule", "shrink-perturb"): "the shrink and the noise act at any rate, as Ash & Adams define them",
    ("rosenbrock", "upgd"): "gated SGD without momentum needs far more than 1000 steps along the valley",
    ("dcp", "lookahead"): "pytorch-optimizer's Lookahead saves {lookahead_state, base_optimizer}, not torch's layout "
                          "(KeyError 'state')",
    ("dcp", "natural_gradient"): "DCP steps a fresh optimiser once on zero gradients to create its state; this one "
                                 "needs the step's batch (a clear error)",
    ("dcp", "hessian_free"): "DCP steps a fresh optimiser once on zero gradients to create its state; this one "
                             "needs the step's batch (a clear error)",
    **{("dcp", f"ribbed[{name}]"): "DCP steps a fresh optimiser once on zero gradients to create its state; guided ES "
                                    "and selection evaluate the step's loss, so they need its batch (a clear error)"
       for name in ("guided-es", "selection")},
    ("dcp", "shrink-perturb"): "DCP's creating step runs at lr 0, but the shrink and the noise act at any rate and "
                               "move the freshly loaded weights (set the optimiser state before loading the model)",
    ("quadratic", "norm-projected"): "each neuron's weight norm is held at its initial value; the optimum has another",
    ("rosenbrock", "norm-projected"): "the weight starts at zero: no direction whose norm could be kept (refused)",
}


def table_for(check: str) -> list:
    """:data:`TABLE` with the entries known to fail ``check`` marked strict xfail (a fix makes them fail)."""
    return [pytest.param(entry, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[check, str(entry)]))
            if (check, str(entry)) in KNOWN_FAILURES else entry for entry in TABLE]


@pytest.fixture(autouse=True, scope="module")
def _every_extension_registered():
    """Optimisers registered by other extension packages (RIBBED) are in the table too."""
    load_extensions()


pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unit-variance Gaussian negative log-likelihood (up to a constant), mean over rows."""
    return 0.5 * (z - y).square().sum(-1).mean()


class Rosenbrock(nn.Module):
    """Rosenbrock's function ``(1 - u)² + 100 (v - u²)²`` as twice a least-squares loss.

    ``(u, v)`` is the weight of a bias-free ``Linear(1, 2)`` applied to the input 1, so the
    layer-based methods (K-FAC) see a layer; the outputs are the residuals ``u`` and
    ``10 (v - u²)``, to be matched to the targets ``(1, 0)``.
    """

    def __init__(self):
        super().__init__()
        self.theta = nn.Linear(1, 2, bias=False)
        nn.init.zeros_(self.theta.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.theta(x).unbind(-1)
        return torch.stack([u, 10 * (v - u.square())], dim=-1)


@dataclass
class Problem:
    """A model, its batch, and how far its parameters are from the optimum."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    optimum: torch.Tensor

    def error(self) -> float:
        return (torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]) - self.optimum).abs().max().item()


def quadratic(dtype=torch.float64) -> Problem:
    """Least squares ``0.5 mean ||W x + b - y||²`` on fixed data; its optimum by ``lstsq``."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 4, generator=generator, dtype=torch.float64)
         * torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64))
    y = (x @ torch.randn(4, 3, generator=generator, dtype=torch.float64)
         + 0.1 * torch.randn(64, 3, generator=generator, dtype=torch.float64))
    design = torch.cat([x, torch.ones(64, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # [5, 3]: weight columns, then the bias row
    optimum = torch.cat([solution[:4].T.reshape(-1), solution[4]])
    torch.manual_seed(0)
    return Problem(nn.Linear(4, 3).to(dtype), x.to(dtype), y.to(dtype), optimum)


def rosenbrock(dtype=torch.float64) -> Problem:
    return Problem(Rosenbrock().to(dtype), torch.ones(1, 1, dtype=dtype), torch.tensor([[1.0, 0.0]], dtype=dtype),
                   torch.ones(2, dtype=torch.float64))


def build(entry: Entry, problem: Problem, lr: float) -> torch.optim.Optimizer:
    return build_optimizer(entry.name, problem.model, lr=lr, **copy.deepcopy(entry.options))


def run_steps(problem: Problem, optimizer, steps: int, scheduler=None) -> None:
    """The training step every optimiser gets: backward, record the batch, step."""
    for _ in range(steps):
        optimizer.zero_grad()
        gaussian_loss(problem.model(problem.x), problem.y).backward()
        record_batch(problem.model, problem.x, problem.y, gaussian_loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def decayed(optimizer, steps: int, constant: bool):
    if constant:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def test_the_table_covers_every_registered_optimiser():
    load_extensions()
    assert sorted(entry.name for entry in TABLE if not entry.label) == OPTIMIZERS.names()


@pytest.mark.parametrize("entry", table_for("quadratic"), ids=str)
def test_reaches_the_quadratic_optimum(entry):
    problem = quadratic()
    optimizer = build(entry, problem, entry.quadratic_lr)
    start = problem.error()
    run_steps(problem, optimizer, entry.quadratic_steps, decayed(optimizer, entry.quadratic_steps, entry.constant_rate))
    assert start > 1.0
    assert problem.error() < QUADRATIC_TOL


@pytest.mark.parametrize("entry", table_for("rosenbrock"), ids=str)
def test_reaches_the_rosenbrock_minimum(entry):
    problem = rosenbrock()
    optimizer = build(entry, problem, entry.rosenbrock_lr)
    run_steps(problem, optimizer, entry.rosenbrock_steps,
              decayed(optimizer, entry.rosenbrock_steps, entry.constant_rate))
    assert problem.error() < ROSENBROCK_TOL


def _through_disk(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("entry", TABLE, ids=str)
def test_state_dict_round_trip_continues_identically(entry):
    """Save after 4 steps, continue 4 more; a fresh optimiser loaded from the save does the same."""
    problem = quadratic()
    optimizer = build(entry, problem, entry.quadratic_lr * 0.3)
    run_steps(problem, optimizer, 4)
    saved_model, saved_state = copy.deepcopy(problem.model.state_dict()), _through_disk(optimizer.state_dict())
    torch.manual_seed(1)
    run_steps(problem, optimizer, 4)

    resumed = quadratic()
    resumed.model.load_state_dict(saved_model)
    fresh = build(entry, resumed, entry.quadratic_lr * 0.3)
    fresh.load_state_dict(saved_state)
    torch.manual_seed(1)
    run_steps(resumed, fresh, 4)
    for name, value in problem.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)
    moved = any(not torch.equal(value, saved_model[name]) for name, value in problem.model.state_dict().items())
    assert moved, "the continued steps did not change the model, so the comparison proves nothing"


@pytest.mark.parametrize("entry", table_for("dcp"), ids=str)
def test_distributed_checkpoint_round_trip_continues_identically(entry):
    """``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` keeps only ``state`` and
    ``param_groups`` (renamed to parameter names): whatever an optimiser saves beside them is
    lost, so its own state must be inside (``ribbed.optim.state``). One process, no process group."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    problem = quadratic()
    optimizer = build(entry, problem, entry.quadratic_lr * 0.3)
    run_steps(problem, optimizer, 4)
    saved_model = copy.deepcopy(problem.model.state_dict())
    saved_state = _through_disk(get_optimizer_state_dict(problem.model, optimizer))
    assert set(saved_state) == {"state", "param_groups"}
    torch.manual_seed(1)
    run_steps(problem, optimizer, 4)

    resumed = quadratic()
    resumed.model.load_state_dict(saved_model)
    fresh = build(entry, resumed, entry.quadratic_lr * 0.3)
    set_optimizer_state_dict(resumed.model, fresh, saved_state)
    torch.manual_seed(1)
    run_steps(resumed, fresh, 4)
    for name, value in problem.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("entry", table_for("schedule"), ids=str)
def test_an_lr_schedule_reaches_the_optimiser(entry):
    """A schedule at zero for 3 steps freezes the parameters; at its full rate they move.

    The optimiser is built with a non-zero rate, so one that kept its own copy of the rate
    instead of reading ``param_groups`` would move during the first three steps.
    """
    problem = quadratic()
    optimizer = build(entry, problem, entry.quadratic_lr * 0.3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step < 3 else 1.0)
    initial = copy.deepcopy(problem.model.state_dict())
    run_steps(problem, optimizer, 3, scheduler)
    for name, value in problem.model.state_dict().items():
        torch.testing.assert_close(value, initial[name], rtol=0, atol=0)
    assert all(group["lr"] == pytest.approx(group["initial_lr"]) for group in optimizer.param_groups)
    run_steps(problem, optimizer, 6, scheduler)
    assert any(not torch.equal(value, initial[name]) for name, value in problem.model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("entry", TABLE, ids=str)
def test_keeps_the_parameter_dtype(entry, dtype):
    problem = quadratic(dtype)
    optimizer = build(entry, problem, entry.quadratic_lr * 0.3)
    before = problem.error()
    run_steps(problem, optimizer, 5)
    assert all(p.dtype == dtype for p in problem.model.parameters())
    assert math.isfinite(problem.error()) and problem.error() != before


# --------------------------------------------------------------------------- natural gradient


def _linear_gaussian(n=40):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.3], dtype=torch.float64)
    y = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    return nn.Linear(3, 2).double(), x, y


def _natural_step(model, x, y, damping, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """One natural-gradient step with SGD(lr=1): returns (gradient, step) as ``[out, in + 1]`` matrices."""
    optimizer = NaturalGradient(model, torch.optim.SGD(model.parameters(), lr=1.0), damping=damping, **options)
    before = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
    optimizer.zero_grad()
    gaussian_loss(model(x), y).backward()
    gradient = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
    record_batch(model, x, y, gaussian_loss)
    optimizer.step()
    return gradient, torch.cat([model.weight, model.bias[:, None]], 1).detach() - before


def test_natural_gradient_on_a_linear_gaussian_model_equals_the_closed_form():
    """For ``y ~ N(Wx + b, I)`` the Fisher is ``E[x̄x̄ᵀ] ⊗ I``, so the step is ``-∇ (Σ + λI)⁻¹``."""
    model, x, y = _linear_gaussian()
    damping = 0.01
    gradient, step = _natural_step(model, x, y, damping, fisher="exact", likelihood="gaussian")
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    closed_form = gradient @ torch.linalg.inv(design.T @ design / len(x) + damping * torch.eye(4, dtype=x.dtype))
    torch.testing.assert_close(step, -closed_form, rtol=1e-9, atol=1e-12)


def test_sampled_fisher_converges_to_the_closed_form():
    model, x, y = _linear_gaussian()
    damping = 0.01
    torch.manual_seed(5)
    gradient, step = _natural_step(model, x, y, damping, fisher="sampled", likelihood="gaussian", samples=2000)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    closed_form = gradient @ torch.linalg.inv(design.T @ design / len(x) + damping * torch.eye(4, dtype=x.dtype))
    assert (step + closed_form).norm() / closed_form.norm() < 0.05


def test_empirical_fisher_is_the_mean_outer_product_of_per_sample_gradients():
    model, x, y = _linear_gaussian(12)
    damping = 0.1
    reference = copy.deepcopy(model)
    per_sample = []
    for xi, yi in zip(x, y, strict=True):
        reference.zero_grad()
        gaussian_loss(reference(xi[None]), yi[None]).backward()
        per_sample.append(torch.cat([reference.weight.grad, reference.bias.grad[:, None]], 1).reshape(-1).clone())
    rows = torch.stack(per_sample)
    fisher = sum(torch.outer(g, g) for g in rows) / len(rows)
    gradient, step = _natural_step(model, x, y, damping, fisher="empirical")
    expected = torch.linalg.solve(fisher + damping * torch.eye(len(fisher), dtype=x.dtype), gradient.reshape(-1))
    torch.testing.assert_close(step.reshape(-1), -expected, rtol=1e-8, atol=1e-12)


def test_categorical_sampling_draws_labels_from_the_model():
    """Cross-entropy with sampled labels: a classifier sure of class 2 gives a Fisher built
    only from class-2 gradients, so the natural gradient of a class-0 batch is finite."""
    model = nn.Linear(2, 3).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 0.0, 30.0]))
    x, y = torch.randn(8, 2, dtype=torch.float64), torch.zeros(8, dtype=torch.long)
    rows, m = fisher_rows(FlatParameters(model, [{"params": list(model.parameters())}]), x, y,
                          torch.nn.functional.cross_entropy, fisher="sampled", samples=4)
    assert rows.shape == (32, 9) and m == 32
    assert rows.abs().max() < 1e-9, "a confident model's sampled labels agree with it: no gradient"


# --------------------------------------------------------------------------- layer-wise groups and trust ratio


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))


def test_layerwise_rules_set_rates_and_decay_first_match_wins():
    optimizer = build_optimizer("layerwise", _mlp(), lr=0.1, base="adamw", base_options={"weight_decay": 0.01},
                                rules=[{"pattern": "2.*", "lr_scale": 0.1},
                                       {"pattern": "*.bias", "weight_decay_scale": 0}])
    groups = {tuple(g["param_names"]): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert groups == {("2.weight", "2.bias"): (pytest.approx(0.01), 0.01), ("0.bias",): (0.1, 0.0),
                      ("0.weight",): (0.1, 0.01)}
    assert isinstance(optimizer, torch.optim.AdamW)


def test_layerwise_zero_rate_freezes_only_the_matching_layer():
    model = _mlp()
    optimizer = build_optimizer("layerwise", model, lr=0.1, base="sgd", rules=[{"pattern": "0.*", "lr_scale": 0.0}])
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    for _ in range(3):
        optimizer.zero_grad()
        gaussian_loss(model(x), y).backward()
        optimizer.step()
    after = model.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"]) and torch.equal(after["0.bias"], before["0.bias"])
    assert not torch.equal(after["2.weight"], before["2.weight"])


@pytest.mark.parametrize("options, message", [
    ({"rules": [{"pattern": "head.*"}]}, r"rules\[0\].pattern 'head.\*' matches no parameter"),
    ({"rules": [{"pattern": "*", "weight_decay_scale": 0.5}]}, "base's weight_decay is not set"),
    ({"rules": [{"pattern": "*", "lr_scal": 0.5}]}, r"rules\[0\]: unknown key\(s\) \['lr_scal'\]"),
    ({"rules": [{"pattern": "*", "lr_scale": -1}]}, r"rules\[0\].lr_scale: got -1; allowed: a number >= 0"),
    ({"base": "kfac"}, "cannot be built on given parameter groups"),
    ({"base": "adamx"}, "optimizer.options.base 'adamx'.*not registered"),
])
def test_layerwise_errors_name_the_field_and_what_is_allowed(options, message):
    with pytest.raises(OptimizerError, match=message):
        build_optimizer("layerwise", _mlp(), lr=0.1, **options)


def _one_step(optimizer, model, x, y):
    optimizer.zero_grad()
    gaussian_loss(model(x), y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    return before, grads, {name: p.detach() - before[name] for name, p in model.named_parameters()}


def test_trust_ratio_update_mode_is_lamb():
    """Each matrix moves by ``lr ||w|| / ||r|| r`` with ``r`` Adam's direction; the bias keeps Adam's step."""
    model, x, y = _mlp(), torch.randn(16, 2), torch.randn(16, 1)
    reference = copy.deepcopy(model)
    lr = 0.01
    adam_step = _one_step(torch.optim.Adam(reference.parameters(), lr=lr), reference, x, y)[2]
    before, _, step = _one_step(TrustRatio(torch.optim.Adam(model.parameters(), lr=lr), max_ratio=None), model, x, y)
    for name, delta in step.items():
        if delta.ndim > 1:
            direction = adam_step[name] / lr
            expected = lr * before[name].norm() / direction.norm() * direction
        else:
            expected = adam_step[name]
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)


def test_trust_ratio_gradient_mode_is_lars():
    """SGD steps with ``||w|| / (||g|| + β||w||) (g + βw)`` for matrices, plain ``g`` for biases."""
    model, x, y = _mlp(), torch.randn(16, 2), torch.randn(16, 1)
    lr, beta = 0.1, 0.01
    optimizer = TrustRatio(torch.optim.SGD(model.parameters(), lr=lr), mode="gradient", weight_decay=beta,
                           max_ratio=None)
    before, grads, step = _one_step(optimizer, model, x, y)
    for name, delta in step.items():
        w, g = before[name], grads[name]
        expected = -lr * (w.norm() / (g.norm() + beta * w.norm()) * (g + beta * w) if w.ndim > 1 else g)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)


def test_trust_ratio_is_clamped():
    model, x, y = _mlp(), torch.randn(16, 2), torch.randn(16, 1) * 1e-6
    optimizer = TrustRatio(torch.optim.SGD(model.parameters(), lr=1.0), mode="gradient", max_ratio=2.0)
    _, grads, step = _one_step(optimizer, model, x, y)
    torch.testing.assert_close(step["0.weight"], -2.0 * grads["0.weight"])


def test_muon_takes_hidden_matrices_and_leaves_the_rest_to_adamw():
    model = nn.Sequential()
    model.add_module("embed", nn.Embedding(5, 4))
    model.add_module("hidden", nn.Linear(4, 4))
    model.add_module("head", nn.Linear(4, 2))
    groups = muon_param_groups(model, ["head.*"])
    assert [[p.shape for p in g["params"]] for g in groups] == [[(4, 4)], [(5, 4), (4,), (2, 4), (2,)]]
    assert [g["use_muon"] for g in groups] == [True, False]


def test_misspelt_options_of_library_optimisers_are_errors():
    """pytorch-optimizer classes take ``**kwargs``; the registry still rejects unknown options."""
    with pytest.raises(OptimizerError, match=r"unknown option\(s\) \['betaz'\] for 'lion'; allowed: .*betas"):
        build_optimizer("lion", _mlp(), lr=0.1, betaz=(0.9, 0.99))


# --------------------------------------------------------------------------- in the training loop


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("optimizer, gradient_method", [
    ({"name": "kfac", "lr": 0.01, "options": {"damping": 0.01, "kl_clip": None}}, "backprop"),
    ({"name": "natural_gradient", "lr": 0.3, "options": {"damping": 0.1}}, "keep-batch"),
    ({"name": "hessian_free", "lr": 1.0, "options": {"cg_max_iters": 10}}, "keep-batch"),
    ({"name": "lookahead", "lr": 0.01, "options": {"base": "adamw"}}, "backprop"),
    ({"name": "trust_ratio", "lr": 0.1, "options": {"base": "adamw"}}, "backprop"),
], ids=lambda value: value.get("name") if isinstance(value, dict) else value)
def test_trains_in_the_training_loop(tiny_config, digits, optimizer, gradient_method):
    steps = {"steps": 30, "eval_every": 30, "gradient_method": gradient_method}
    untrained = train(build_run(tiny_config(optimizer=optimizer, train={**steps, "steps": 1, "eval_every": 1}), digits),
                      evaluate_test=False)
    result = train(build_run(tiny_config(optimizer=optimizer, train=steps), digits), evaluate_test=False)
    assert result.status == "completed"
    assert result.final["val_loss"] < 0.8 * untrained.final["val_loss"]
    if optimizer["name"] == "hessian_free":
        assert {"hf_damping", "hf_cg_iterations"} <= set(result.history[-1]), "telemetry joins the metric rows"


def test_a_batch_hungry_optimiser_without_keep_batch_says_what_to_set(tiny_config, digits):
    """Rejected when the run is built, before any record is written."""
    config = tiny_config(optimizer={"name": "hessian_free", "lr": 1.0}, train={"steps": 2})
    with pytest.raises(ValueError, match="train.gradient_method: got 'backprop'.*allowed: keep-batch"):
        build_run(config, digits)


# --------------------------------------------------------------------------- the precision study


def test_precision_study_measures_each_mode(tmp_path):
    from ribbed.config import StudyConfig
    from ribbed.experiments.studies import run_study

    config = StudyConfig(name="precision-test", study="precision", options={
        "modes": ["fp32", "bf16"], "seeds": [0], "profile_steps": 3,
        "base": {"data": {"name": "digits", "batch_size": 64}, "model": {"name": "mlp", "options": {"hidden": [16]}},
                 "optimizer": {"name": "adamw", "lr": 0.01}, "train": {"steps": 4, "eval_every": 4}},
    })
    outcome = run_study(config, runs_dir=tmp_path)
    modes = outcome.summary["data"]["modes"]
    fp32, bf16 = (modes[m]["profile"]["activation_bytes"] for m in ("fp32", "bf16"))
    assert bf16 < 0.7 * fp32, "bf16 autocast should store activations in two bytes, not four"
    assert [row[0] for row in outcome.summary["tables"][0]["rows"]] == ["fp32", "bf16"]
    assert len(outcome.summary["figures"]) == 1 and "bf16: a step takes" in outcome.summary["findings"][0]
    assert "half-precision instruction flags" in outcome.summary["findings"][-1]


def test_precision_study_rejects_unknown_modes(tmp_path):
    from ribbed.config import StudyConfig
    from ribbed.experiments.studies import run_study

    config = StudyConfig(name="bad", study="precision", options={"modes": ["fp8"], "base": {}})
    with pytest.raises(ValueError,
                       match=r"options.modes: got \['fp8'\]; allowed: distinct values among fp32, bf16, fp16"):
        run_study(config, runs_dir=tmp_path)


@pytest.mark.slow
def test_every_registry_name_builds_after_importing_ribbed_optim_alone():
    """A fresh interpreter that imports only ``ribbed.optim`` (as the README does) can build the
    optimisers other packages register (RIBBED, Adam-HD, continual backprop)."""
    script = ("import torch\nfrom ribbed.optim import build_optimizer\nmodel = torch.nn.Sequential("
              "torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))\n"
              "for name in ('adam-hd', 'ribbed', 'continual-backprop', 'redo'):\n"
              "    print(type(build_optimizer(name, model, lr=1e-3)).__name__)\n")
    done = processes.run([sys.executable, "-c", script], processes.limit(300))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["AdamHD", "RIBBED", "Resetting", "Resetting"]
