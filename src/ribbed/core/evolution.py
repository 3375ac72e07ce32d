"""Bidirectional evolutionary differentiation: guided evolution strategies beside backprop.

**Guided ES** (Maheswaranathan et al. 2019, "Guided evolutionary strategies: augmenting random
search with surrogate gradients", ICML). For a group of ``n`` parameters with current
backprop gradient ``g`` and an orthonormal basis ``U [n, k]`` (QR) of its last ``k``
gradients, antithetic perturbations ``±eps`` are drawn from ``N(0, sigma² C)`` with the
paper's covariance

    C = (alpha / n) I + ((1 - alpha) / k) U Uᵀ          (trace 1),

and the loss is evaluated at ``theta ± eps``. The estimate over ``P`` pairs is

    ĝ = beta / (2 sigma² P) Σ_i eps_i (f(theta + eps_i) - f(theta - eps_i)),    beta = n,

whose expectation on a quadratic is exactly ``Σ g`` with ``Σ = n C = alpha I +
(1 - alpha)(n / k) U Uᵀ`` (antithetic differences cancel every even term). The paper leaves
the scale ``beta`` free; ``beta = n`` makes the isotropic case (``alpha = 1``) an unbiased
gradient estimate. Where the loss's gradient lies in the span of recent gradients, most of
the search happens there and the estimate's variance drops (the paper's point).

The history holds the gradients of the last ``k`` ES steps (the current one included):
recording every step would cost a copy of every gradient at every step, ES or not.

The groups are the **layers** (a layer's weight rows and biases, flattened), not the controller
clusters: a layer's gradients share one scale and one history, whereas controller clusters
span layers of different scales (a joint basis would be dominated by the largest layer) and
their membership changes at every re-routing, which would invalidate the history. All
layers are perturbed at once (the covariance is block-diagonal over layers), so one estimate
costs ``2 P`` loss evaluations whatever the number of layers.

The estimate is combined with the backprop gradient per layer as
``g <- (1 - w) g + w (|g| / |ĝ|) ĝ``: the ES direction is rescaled to the gradient's norm,
so ``w`` (``es_weight``) mixes directions only and the base optimiser's learning rate stays
calibrated (the raw estimate's scale depends on ``beta``, ``n / k`` and ``P``).

**Selection** (the "evolutionary" half of the seed's idea): a small population made of the
incumbent and ``P - 1`` mutants of a vector (a controller bank's parameters), each scored on
the step's loss after a trial step; the best is kept, and a mutant replaces the incumbent
only if strictly better, so selection never accepts a worse candidate than the incumbent.
The same :func:`select` evolves the **chirality signs** (:func:`evolve_chirality`): candidates
are ``±1`` vectors, one sign per layer's chiral term, mutated by flipping one or a few layers;
each is scored by rotating the step's gradient with its ``J``, taking the real base step from
the same starting state, and evaluating the loss there.

Every evaluation goes through :class:`LossProbe`: it runs under ``torch.no_grad`` with the
forward-hook recorders paused, gives every evaluation the same random-number state (common random
numbers: dropout masks agree between ``+eps`` and ``-eps``), and restores the parameters, the
model's buffers, the gradients and the global random state exactly.

Why our own: no maintained PyTorch library implements guided ES (the paper's code is a
TensorFlow 1 notebook), and the pieces here are small; sampling, QR and the estimate are
``torch`` operations, vectorised per layer.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ribbed.core.chiral import ChiralTerm
from ribbed.core.layers import NeuronLayer
from ribbed.optim.batches import recorded_batches
from ribbed.optim.functional import join_batches

__all__ = [
    "GradientHistory",
    "GuidedES",
    "LossProbe",
    "OptimizerSnapshot",
    "Selection",
    "antithetic_estimate",
    "check_evolution_options",
    "evolve_bank",
    "evolve_chirality",
    "gaussian_mutation",
    "guided_covariance",
    "guided_perturbations",
    "layer_views",
    "orthonormal_basis",
    "paused",
    "select",
    "sign_flip_mutation",
    "step_loss",
    "vector_loaded",
]


def _check(name: str, value, ok: bool, allowed: str) -> None:
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")


def check_evolution_options(*, es_every: int, es_population: int, es_sigma: float, es_alpha: float,
                            es_subspace: int, es_weight: float, evolve_every: int, evolve_population: int,
                            evolve_sigma: float, controllers: bool, evolve_chirality: bool = False,
                            chiral_gamma: float = 0.0) -> None:
    """Validate RIBBED's guided-ES and selection options; errors name the field, value and rule.

    Selection (``evolve_every``) needs something to evolve: the controller bank
    (``controllers``), the chirality signs (``evolve_chirality``, which needs a chiral term,
    ``chiral_gamma != 0``), or both.
    """
    def integer(v, low):
        return isinstance(v, int) and v >= low

    def number(v):
        return isinstance(v, (int, float))

    for name, value, ok, allowed in (
        ("es_every", es_every, integer(es_every, 0), "an integer >= 0 (0: off)"),
        ("es_population", es_population, integer(es_population, 1), "an integer >= 1"),
        ("es_sigma", es_sigma, number(es_sigma) and es_sigma > 0, "a number > 0"),
        ("es_alpha", es_alpha, number(es_alpha) and 0 <= es_alpha <= 1, "a number in [0, 1]"),
        ("es_subspace", es_subspace, integer(es_subspace, 1), "an integer >= 1"),
        ("es_weight", es_weight, number(es_weight) and 0 <= es_weight <= 1, "a number in [0, 1]"),
        ("evolve_every", evolve_every, integer(evolve_every, 0), "an integer >= 0 (0: off)"),
        ("evolve_population", evolve_population, integer(evolve_population, 2), "an integer >= 2"),
        ("evolve_sigma", evolve_sigma, number(evolve_sigma) and evolve_sigma > 0, "a number > 0"),
    ):
        _check(name, value, ok, allowed)
    if not isinstance(evolve_chirality, bool):
        raise ValueError(f"evolve_chirality: got {evolve_chirality!r}; allowed: True or False")
    if evolve_chirality and not evolve_every:
        raise ValueError(f"evolve_chirality: got True with evolve_every={evolve_every!r}; allowed: False unless "
                         "evolve_every >= 1 (the signs are selected every evolve_every steps)")
    if evolve_chirality and not chiral_gamma:
        raise ValueError(f"evolve_chirality: got True with chiral_gamma={chiral_gamma!r}; allowed: False unless "
                         "chiral_gamma != 0 (the signs are the chiral term's handedness per layer)")
    if evolve_every and not (controllers or evolve_chirality):
        raise ValueError(f"evolve_every: got {evolve_every!r} with controllers=False and evolve_chirality=False; "
                         "allowed: 0 unless the controllers are on or evolve_chirality=True (selection evolves "
                         "the controller bank and/or the chirality signs)")


TRIAL_EVALUATIONS = "RIBBED's guided ES / selection (es_every, evolve_every)"
"""Who evaluates the loss at trial parameters, as :func:`step_loss`'s error names it (ES, selection)."""


def step_loss(model: nn.Module, closure: Callable[[], torch.Tensor | float] | None,
              who: str) -> Callable[[], torch.Tensor | float]:
    """How to evaluate the step's loss: the ``closure`` if given, else the recorded batches.

    The closure follows ``torch.optim``'s convention (it returns the loss); for evaluations
    it is called under ``torch.no_grad``, so a closure that also back-propagates must guard
    its ``backward()`` with ``if torch.is_grad_enabled()``. Without a closure, the batches
    recorded by the ``keep-batch`` gradient method (or :func:`ribbed.optim.record_batch`)
    are used. With neither, a ``RuntimeError`` names ``who`` and both ways to give the loss.
    """
    if closure is not None:
        return closure
    try:
        batch = join_batches(recorded_batches(model, who))
    except RuntimeError:
        raise RuntimeError(
            f"{who} evaluates the loss at trial parameters, but step() got no closure and no batch was recorded: "
            "call step(closure) with a closure returning the loss (torch.optim convention), or set "
            "train.gradient_method: keep-batch (or call ribbed.optim.record_batch(model, x, y, loss_fn) "
            "after the backward pass)"
        ) from None
    return lambda: batch.loss_fn(model(batch.x), batch.y)


@contextlib.contextmanager
def paused(recorders: list) -> Iterator[None]:
    """Turn off the ``recording`` flag of forward-hook recorders (activation statistics,
    information density) for trial evaluations, then put each flag back."""
    states = [recorder.recording for recorder in recorders]
    for recorder in recorders:
        recorder.recording = False
    try:
        yield
    finally:
        for recorder, on in zip(recorders, states, strict=True):
            recorder.recording = on


class LossProbe:
    """Evaluates the loss at trial values of ``params`` and leaves no trace (a context manager).

    On entry the parameters, the model's buffers, the gradients of ``grad_owners`` (default
    ``params``; a closure may zero them) and the global random state are kept. Each evaluation
    starts from the kept random state (common random numbers) with the ``recorders``
    (forward-hook statistics: objects with a ``recording`` flag) paused. On exit everything
    is put back exactly.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor], loss: Callable[[], torch.Tensor | float],
                 recorders: Sequence[Any] = (), grad_owners: list[torch.Tensor] | None = None):
        self.model, self.params, self.loss, self.recorders = model, params, loss, list(recorders)
        self.grad_owners = list(params if grad_owners is None else grad_owners)
        self.evaluations = 0

    def __enter__(self) -> LossProbe:
        self.saved = [p.detach().clone() for p in self.params]
        self.buffers = list(self.model.buffers())
        self.saved_buffers = [b.clone() for b in self.buffers]
        self.grads = [p.grad for p in self.grad_owners]
        devices = sorted({p.device.index or 0 for p in self.params if p.device.type == "cuda"})
        self._rng = contextlib.ExitStack()
        self._rng.enter_context(torch.random.fork_rng(devices=devices))
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
        self.devices = devices
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.saved)
        self._restore_side_effects()
        self._rng.close()

    def _restore_side_effects(self) -> None:
        with torch.no_grad():
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.saved_buffers)
        for p, g in zip(self.grad_owners, self.grads, strict=True):
            p.grad = g

    def _reset_rng(self) -> None:
        torch.set_rng_state(self.cpu_state)
        for device, state in zip(self.devices, self.cuda_states, strict=True):
            torch.cuda.set_rng_state(state, device)

    def _evaluate(self) -> float:
        self._reset_rng()
        with paused(self.recorders), torch.no_grad():
            value = float(self.loss())
        self._restore_side_effects()
        self.evaluations += 1
        return value

    def at(self, values: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> float:
        """The loss with ``params`` set to ``values``."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, values)
        return self._evaluate()

    def after(self, update: Callable[[], None]) -> float:
        """The loss after ``update()`` (a trial optimiser step) moves ``params`` from their kept
        values; ``update`` runs from the kept random state, like each evaluation."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.saved)
        self._reset_rng()
        update()
        return self._evaluate()

    def at_offset(self, offsets: list[torch.Tensor], sign: float = 1.0) -> float:
        """The loss at the kept values plus ``sign * offsets``."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.saved)
            torch._foreach_add_(self.params, offsets, alpha=sign)
        return self._evaluate()


# ---------------------------------------------------------------------- guided ES, the maths


def guided_covariance(basis: torch.Tensor | None, n: int, alpha: float) -> torch.Tensor:
    """``Σ = n C = alpha I + (1 - alpha)(n / k) U Uᵀ``: the expectation ``E[ĝ] = Σ g`` (dense, for tests)."""
    identity = torch.eye(n, dtype=torch.float64)
    if basis is None or basis.shape[1] == 0:
        return identity
    u = basis.double()
    return alpha * identity + (1 - alpha) * (n / u.shape[1]) * (u @ u.T)


def guided_perturbations(population: int, n: int, basis: torch.Tensor | None, alpha: float, sigma: float,
                         generator: torch.Generator, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """``[population, n]`` draws of ``eps ~ N(0, sigma² C)``, ``C = (alpha/n) I + ((1-alpha)/k) U Uᵀ``.

    Without a basis (no gradient history yet) the draw is isotropic, ``C = I / n``.
    """
    noise = torch.randn(population, n, generator=generator, dtype=dtype).to(device)
    if basis is None or basis.shape[1] == 0:
        return noise.mul_(sigma / math.sqrt(n))
    k = basis.shape[1]
    guided = torch.randn(population, k, generator=generator, dtype=dtype).to(device) @ basis.T.to(dtype)
    return noise.mul_(sigma * math.sqrt(alpha / n)).add_(guided, alpha=sigma * math.sqrt((1 - alpha) / k))


def antithetic_estimate(perturbations: torch.Tensor, loss_plus: torch.Tensor, loss_minus: torch.Tensor,
                        sigma: float) -> torch.Tensor:
    """``ĝ = n / (2 sigma² P) Σ_i eps_i (f(theta + eps_i) - f(theta - eps_i))`` (``beta = n``)."""
    population, n = perturbations.shape
    differences = (loss_plus - loss_minus).to(perturbations)
    return (differences @ perturbations).mul_(n / (2 * sigma ** 2 * population))


def orthonormal_basis(history: torch.Tensor) -> torch.Tensor:
    """``U [n, k]``: an orthonormal basis (reduced QR) of the rows of ``history [k, n]``."""
    return torch.linalg.qr(history.T.to(torch.promote_types(history.dtype, torch.float32)), mode="reduced").Q


def layer_views(layer: NeuronLayer, flat: torch.Tensor) -> list[torch.Tensor]:
    """A layer's flat vector (weight rows then bias) as views shaped like ``layer.params``."""
    return [part.view_as(p) for p, part in zip(layer.params, flat.split([p.numel() for p in layer.params]),
                                               strict=True)]


class GradientHistory:
    """The last ``k`` gradients of each layer, flattened, in a ring buffer ``[k, n_layer]``."""

    def __init__(self, layers: list[NeuronLayer], k: int):
        self.k = k
        self.rows = [torch.zeros(k, sum(p.numel() for p in layer.params), dtype=layer.weight.dtype,
                                 device=layer.weight.device) for layer in layers]
        self.slots = [[view for layer, rows in zip(layers, self.rows, strict=True)
                       for view in layer_views(layer, rows[slot])] for slot in range(k)]
        self.count = 0

    def push(self, grads: list[torch.Tensor]) -> int:
        """Store the layers' gradients (in ``layer.params`` order, concatenated); return the slot used."""
        slot = self.count % self.k
        torch._foreach_copy_(self.slots[slot], grads)
        self.count += 1
        return slot

    def bases(self) -> list[torch.Tensor]:
        """Each layer's orthonormal basis of its stored gradients."""
        filled = min(self.count, self.k)
        return [orthonormal_basis(rows[:filled]) for rows in self.rows]

    def state_dict(self) -> dict:
        return {"rows": [r.clone() for r in self.rows], "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        torch._foreach_copy_(self.rows, state["rows"])
        self.count = state["count"]


class GuidedES:
    """Guided ES per layer, blended into the layers' ``.grad`` (see the module docstring).

    Args:
        layers: the neuron layers (the groups).
        population: ``P``, antithetic pairs per estimate (``2 P`` loss evaluations).
        sigma: total perturbation scale (``E|eps|² = sigma²`` per layer).
        alpha: weight of the isotropic part (1: plain antithetic ES; 0: only the gradient subspace).
        subspace: ``k``, gradients kept per layer for the guiding subspace.
        weight: ``w``, share of the (norm-matched) ES direction in the gradient.
    """

    def __init__(self, layers: list[NeuronLayer], *, population: int, sigma: float, alpha: float,
                 subspace: int, weight: float):
        self.layers = layers
        self.population, self.sigma, self.alpha, self.weight = population, sigma, alpha, weight
        self.params: list[torch.Tensor] = [p for layer in layers for p in layer.params]
        self.history = GradientHistory(layers, subspace)
        self.sizes = [row.shape[1] for row in self.history.rows]
        self.last: dict[str, float] = {}

    def ready(self) -> bool:
        """Every layer has its gradients (a layer left out of the loss has none)."""
        return all(p.grad is not None for p in self.params)

    def record(self) -> int:
        """Push the current gradients into the history."""
        return self.history.push(self._grads())

    def _grads(self) -> list[torch.Tensor]:
        """Every parameter's gradient (callers check :meth:`ready` first)."""
        grads = []
        for p in self.params:
            assert p.grad is not None, "GuidedES needs every layer's gradient (ready())"
            grads.append(p.grad)
        return grads

    def estimate(self, probe: LossProbe, generator: torch.Generator) -> list[torch.Tensor]:
        """Each layer's ES estimate ``ĝ`` (flat), from ``2 P`` evaluations of ``probe`` (already entered)."""
        bases = self.history.bases()
        draws = [guided_perturbations(self.population, n, basis, self.alpha, self.sigma, generator,
                                      dtype=rows.dtype, device=rows.device)
                 for n, basis, rows in zip(self.sizes, bases, self.history.rows, strict=True)]
        plus, minus = (torch.empty(self.population, dtype=torch.float64),
                       torch.empty(self.population, dtype=torch.float64))
        for i in range(self.population):
            offsets = [v for layer, draw in zip(self.layers, draws, strict=True) for v in layer_views(layer, draw[i])]
            plus[i], minus[i] = probe.at_offset(offsets, 1.0), probe.at_offset(offsets, -1.0)
        self.last = {"es_loss_spread": float((plus - minus).abs().mean())}
        return [antithetic_estimate(draw, plus, minus, self.sigma) for draw in draws]

    def blend(self, probe: LossProbe, generator: torch.Generator) -> None:
        """Record the gradients, estimate, and set each layer's gradient to the norm-matched blend."""
        slot = self.record()
        estimates = self.estimate(probe, generator)
        current = [rows[slot] for rows in self.history.rows]
        grad_norms = torch.stack([g.norm() for g in current])
        estimate_norms = torch.stack([e.norm() for e in estimates])
        cosines = torch.stack([torch.dot(g, e) for g, e in zip(current, estimates, strict=True)])
        cosines = cosines / (grad_norms * estimate_norms).clamp_min(1e-30)
        scales = (self.weight * grad_norms / estimate_norms.clamp_min(1e-30)).tolist()
        torch._foreach_mul_(estimates, scales)
        additions = [v for layer, e in zip(self.layers, estimates, strict=True) for v in layer_views(layer, e)]
        grads = self._grads()
        torch._foreach_mul_(grads, 1 - self.weight)
        torch._foreach_add_(grads, additions)
        self.last["es_cosine"] = float(cosines.mean())

    def state_dict(self) -> dict:
        return self.history.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state)


# ---------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Selection:
    """The kept vector, every candidate's loss (the incumbent first) and the winner's index."""

    vector: torch.Tensor
    losses: list[float]
    winner: int


def gaussian_mutation(sigma: float) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """``v -> v + sigma * N(0, I)``: the mutation of real-valued vectors (controller parameters)."""
    return lambda v, generator: v + sigma * torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)


def select(incumbent: torch.Tensor, population: int, loss_of: Callable[[torch.Tensor], float],
           mutate: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
           generator: torch.Generator) -> Selection:
    """Score the incumbent and ``population - 1`` mutants with ``loss_of``; keep the best.

    A mutant wins only with a strictly lower loss than the incumbent's, so the kept vector's
    loss is never above the incumbent's.
    """
    candidates = [incumbent] + [mutate(incumbent, generator) for _ in range(population - 1)]
    losses = [loss_of(candidate) for candidate in candidates]
    winner = min(range(len(losses)), key=lambda i: (losses[i], i))
    if not losses[winner] < losses[0]:
        winner = 0
    return Selection(candidates[winner], losses, winner)


@contextlib.contextmanager
def vector_loaded(module: nn.Module, vector: torch.Tensor) -> Iterator[None]:
    """Temporarily set ``module``'s parameters from a flat ``vector`` (then restore them)."""
    saved = nn.utils.parameters_to_vector(module.parameters()).detach().clone()
    with torch.no_grad():
        nn.utils.vector_to_parameters(vector, module.parameters())
    try:
        yield
    finally:
        with torch.no_grad():
            nn.utils.vector_to_parameters(saved, module.parameters())


def evolve_bank(bank: nn.Module, multiplier_of: Callable[[], torch.Tensor], *, population: int, sigma: float,
                loss_of_multiplier: Callable[[torch.Tensor], float], generator: torch.Generator) -> Selection:
    """Selection over a controller bank's flat parameter vector; the bank keeps the winner.

    Each candidate is loaded into ``bank`` and scored by ``loss_of_multiplier`` on the
    per-neuron multipliers ``multiplier_of()`` then gives (the trial step is the caller's).
    """
    def loss_of(vector: torch.Tensor) -> float:
        with vector_loaded(bank, vector), torch.no_grad():
            multiplier = multiplier_of()
        return loss_of_multiplier(multiplier)

    incumbent = nn.utils.parameters_to_vector(bank.parameters()).detach().clone()
    result = select(incumbent, population, loss_of, gaussian_mutation(sigma), generator)
    with torch.no_grad():
        nn.utils.vector_to_parameters(result.vector, bank.parameters())
    return result


# ---------------------------------------------------------------------- chirality signs


def _kept(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _put_back(target: dict, saved: dict, untouched: tuple[str, ...] = ()) -> None:
    """Make ``target`` equal ``saved`` (a dict of kept values), writing tensors in place; keys
    in ``untouched`` are left as they are."""
    for key in [key for key in target if key not in saved and key not in untouched]:
        del target[key]
    for key, value in saved.items():
        live = target.get(key)
        if (isinstance(value, torch.Tensor) and isinstance(live, torch.Tensor) and live.shape == value.shape
                and live.dtype == value.dtype and live.device == value.device):
            live.copy_(value)
        else:
            target[key] = _kept(value)


class OptimizerSnapshot:
    """An optimiser's per-parameter ``state`` and its groups' hyperparameters, kept on creation
    and put back exactly by :meth:`restore` (any number of times).

    Restoring writes into the live tensors (``copy_``) and the live group dicts, and deletes
    state a trial step created (lazily initialised moments, a first momentum buffer), rather than
    ``load_state_dict``: that would replace the state tensors and the ``param_groups`` list,
    which RIBBED shares with its base and which LR schedulers hold. State an optimiser keeps
    outside ``state`` and ``param_groups`` (and any step hooks it fires) is not covered.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.state = {p: {k: _kept(v) for k, v in s.items()} for p, s in optimizer.state.items()}
        self.groups = [{k: _kept(v) for k, v in group.items() if k != "params"} for group in optimizer.param_groups]

    def restore(self) -> None:
        live = self.optimizer.state
        for p in [p for p in live if p not in self.state]:
            del live[p]
        for p, saved in self.state.items():
            _put_back(live[p], saved)
        for group, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
            _put_back(group, saved, untouched=("params",))


def sign_flip_mutation(max_flips: int = 2) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """``s -> s`` with ``k`` distinct random entries negated, ``k`` uniform in ``1..max_flips``
    (at most the length): one or a few layers change handedness per mutant, so a mutant's
    loss difference is attributable to few layers."""
    if isinstance(max_flips, bool) or not isinstance(max_flips, int) or max_flips < 1:
        raise ValueError(f"max_flips: got {max_flips!r}; allowed: an integer >= 1")

    def mutate(signs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        k = int(torch.randint(1, min(max_flips, len(signs)) + 1, (1,), generator=generator))
        flipped = signs.clone()
        flipped[torch.randperm(len(signs), generator=generator)[:k]] *= -1
        return flipped

    return mutate


def evolve_chirality(chiral: ChiralTerm, layers: list[NeuronLayer], probe: LossProbe,
                     optimizer: torch.optim.Optimizer, update: Callable[[], None], *, population: int,
                     generator: torch.Generator, max_flips: int = 2) -> Selection:
    """Selection over the chiral term's per-layer signs; ``chiral.signs`` keeps the winner.

    The incumbent and ``population - 1`` mutants (:func:`sign_flip_mutation`) are each scored
    exactly as the step would run with them: the layers' gradients (before the chiral term) are
    put back, the candidate's ``s_l gamma J`` is applied by ``chiral.apply``, ``update()`` (the
    caller's base step, e.g. ``optimizer.step()``) runs from the kept parameters (``probe``,
    entered, over every parameter ``update`` moves) and the kept ``optimizer`` state
    (:class:`OptimizerSnapshot`), and ``probe`` evaluates the loss there. Afterwards the
    gradients, the optimiser's state and (via ``probe``) the parameters are as on entry, so
    applying the chiral term with the kept signs and stepping reproduces the winner's trial step
    bit for bit. ``chiral.last`` reports the selection. Call it after ``chiral.refresh``
    (which sets the graphs and the signs) and before the step's ``chiral.apply``.
    """
    grads = [p.grad for layer in layers for p in layer.params if p.grad is not None]
    kept = [g.clone() for g in grads]
    snapshot = OptimizerSnapshot(optimizer)

    def loss_of(signs: torch.Tensor) -> float:
        torch._foreach_copy_(grads, kept)
        chiral.signs = signs
        chiral.apply(layers)
        try:
            return probe.after(update)
        finally:
            snapshot.restore()

    assert chiral.signs is not None, "chiral.refresh() sets the signs first"
    incumbent = chiral.signs.clone()
    try:
        result = select(incumbent, population, loss_of, sign_flip_mutation(max_flips), generator)
    finally:
        torch._foreach_copy_(grads, kept)
        chiral.signs = incumbent
    chiral.signs = result.vector
    chiral.last = {"chiral_sign_flips": float((result.vector != incumbent).sum()),
                   "chiral_signs_positive_share": float((result.vector > 0).double().mean()),
                   "chiral_evolve_gain": result.losses[0] - result.losses[result.winner],
                   "chiral_evolve_loss": result.losses[result.winner]}
    return result
