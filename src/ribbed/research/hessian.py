"""Top eigenvalues of the loss Hessian from Hessian-vector products, and a plug-in that tracks them.

The Hessian of a network's loss is never formed: :class:`HessianOperator` builds the
gradient graph once on a fixed batch and answers ``H·v`` by differentiating ``gᵀv`` again
(Pearlmutter 1994, "Fast exact multiplication by the Hessian", reverse-over-reverse), which
costs about two backward passes and works for every module with double-backward support.
On top of it:

* :func:`power_iteration` gives the dominant eigenpair (the largest ``|λ|``; for a trained
  network that is the top eigenvalue, the "sharpness"), as in PyHessian (Yao et al. 2020,
  arXiv:1912.07145);
* :func:`lanczos_top_eigenvalues` gives the ``k`` largest (algebraic) eigenvalues with
  ARPACK's implicitly restarted Lanczos (:func:`scipy.sparse.linalg.eigsh`) on a
  :class:`scipy.sparse.linalg.LinearOperator` that calls the HVP: a well-kept Lanczos with
  restarts and reorthogonalisation, rather than our own. (PyHessian and loss-landscapes
  have had no release since 2021 and 2019.)
* :class:`HessianSpectrumTracker`, the ``hessian-spectrum`` training plug-in, measures them
  at every evaluation of a run, on a fixed probe batch, so curvature is tracked over
  training; it runs inside the evaluation (outside the training clock) and uses its own
  random generator, so it changes neither the trained weights nor time-to-target.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
    >>> op = HessianOperator(model, torch.nn.functional.mse_loss, x, y)
    >>> op.dim
    4
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from ribbed.data import Split
from ribbed.nn import pop_aux_loss
from ribbed.train import TrainingPlugin, register_plugin, task_loss

__all__ = [
    "HessianOperator",
    "HessianSpectrumTracker",
    "lanczos_top_eigenvalues",
    "power_iteration",
    "probe_batch",
    "top_eigenvalues",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("power", "lanczos")


class HessianOperator:
    """``v ↦ H·v`` for ``loss_fn(model(x), y)`` (plus any auxiliary losses) at the current weights.

    The model runs in evaluation mode (no dropout noise) on the fixed batch ``(x, y)``; the
    gradient graph is built once and reused by every product. Vectors are flat, in the order
    of ``params`` (default: every parameter that requires a gradient); a parameter the loss
    does not use in evaluation mode (a concrete dropout's rate) has zero rows and columns.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
        params: Sequence[torch.Tensor] | None = None,
    ):
        self.params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        was_training = model.training
        model.eval()
        try:
            loss = loss_fn(model(x), y)
            aux = pop_aux_loss(model)
        finally:
            model.train(was_training)
        total = loss if aux is None else loss + aux
        self.loss = total.detach()
        grads = torch.autograd.grad(total, self.params, create_graph=True, allow_unused=True,
                                    materialize_grads=True)
        self._grad = torch.cat([g.reshape(-1) for g in grads])
        self.dim = self._grad.numel()
        self.dtype, self.device = self._grad.dtype, self._grad.device
        self.products = 0

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """``H·vector`` for a flat vector of length :attr:`dim`."""
        hv = torch.autograd.grad(self._grad, self.params, grad_outputs=vector, retain_graph=True,
                                 allow_unused=True, materialize_grads=True)
        self.products += 1
        return torch.cat([h.reshape(-1) for h in hv])


def probe_batch(split: Split, samples: int, *, seed: int = 0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of ``samples`` examples of ``split`` (a seeded random subset) for HVPs."""
    rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:samples]
    return split.x[rows].to(device), split.y[rows].to(device)


def power_iteration(
    hvp: HessianOperator, *, iterations: int = 100, tol: float = 1e-4, seed: int = 0,
) -> tuple[float, torch.Tensor]:
    """The dominant eigenpair ``(λ, v)`` by power iteration; ``λ`` is the Rayleigh quotient.

    Stops when ``λ`` changes by less than ``tol·|λ|`` between iterations, or after
    ``iterations`` products. The start vector is drawn from a generator seeded by ``seed``.
    """
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(hvp.dim, generator=generator, dtype=torch.float64).to(hvp.device, hvp.dtype)
    vector /= vector.norm()
    eigenvalue = 0.0
    for _ in range(iterations):
        product = hvp(vector)
        previous, eigenvalue = eigenvalue, float(vector @ product)
        norm = product.norm()
        if norm == 0:
            return 0.0, vector
        vector = product / norm
        if abs(eigenvalue - previous) <= tol * abs(eigenvalue):
            break
    return eigenvalue, vector


def lanczos_top_eigenvalues(
    hvp: HessianOperator, k: int, *, tol: float = 1e-6, seed: int = 0, max_products: int | None = None,
) -> np.ndarray:
    """The ``k`` largest eigenvalues, in descending order, by ARPACK's restarted Lanczos.

    Products are computed in the parameters' dtype and handed to ARPACK in float64.
    """
    if not 1 <= k < hvp.dim:
        raise ValueError(f"k: got {k}; allowed: 1 <= k < number of parameters ({hvp.dim})")

    def matvec(vector: np.ndarray) -> np.ndarray:
        product = hvp(torch.from_numpy(np.ascontiguousarray(vector).reshape(-1)).to(hvp.device, hvp.dtype))
        return product.detach().to("cpu", torch.float64).numpy()

    operator = LinearOperator((hvp.dim, hvp.dim), matvec=matvec, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(hvp.dim)
    values = eigsh(operator, k=k, which="LA", tol=tol, v0=start, maxiter=max_products,
                   return_eigenvectors=False)
    return np.sort(values)[::-1].copy()


def top_eigenvalues(
    hvp: HessianOperator, k: int = 1, *, method: str = "power", iterations: int = 100,
    tol: float = 1e-4, seed: int = 0,
) -> list[float]:
    """The top ``k`` eigenvalues by ``method``: ``power`` (``k`` must be 1) or ``lanczos``."""
    if method not in METHODS:
        raise ValueError(f"method: got {method!r}; allowed: {', '.join(METHODS)}")
    if method == "power":
        if k != 1:
            raise ValueError(f"k: got {k} with method 'power'; allowed: 1 (use method 'lanczos' for k > 1)")
        return [power_iteration(hvp, iterations=iterations, tol=tol, seed=seed)[0]]
    return lanczos_top_eigenvalues(hvp, k, tol=tol, seed=seed).tolist()


@register_plugin(
    "hessian-spectrum",
    "top Hessian eigenvalues (power iteration or Lanczos on HVPs) at every evaluation, on a fixed probe batch",
)
class HessianSpectrumTracker(TrainingPlugin):
    """Adds ``hessian_eig1`` (… ``hessian_eig{k}``) to every evaluation row.

    Args:
        k: how many top eigenvalues (``k > 1`` needs ``method: lanczos``).
        method: ``power`` or ``lanczos``.
        samples: size of the fixed probe batch, drawn once from the training split.
        iterations: most power iterations.
        tol: relative tolerance of the eigenvalue.
        seed: seeds the probe batch and the start vectors (not the run's random stream).
    """

    def __init__(self, k: int = 1, method: str = "power", samples: int = 512, iterations: int = 50,
                 tol: float = 1e-3, seed: int = 0):
        if method not in METHODS:
            raise ValueError(f"train.plugins.hessian-spectrum option method: got {method!r}; "
                             f"allowed: {', '.join(METHODS)}")
        if not (isinstance(k, int) and k >= 1) or (method == "power" and k != 1):
            raise ValueError(
                f"train.plugins.hessian-spectrum option k: got {k!r}; allowed: 1 with method 'power', "
                "a positive integer with method 'lanczos'"
            )
        if not (isinstance(samples, int) and samples >= 1):
            raise ValueError(f"train.plugins.hessian-spectrum option samples: got {samples!r}; "
                             "allowed: a positive integer")
        self.k, self.method, self.samples = k, method, samples
        self.iterations, self.tol, self.seed = iterations, tol, seed

    def attach(self, parts) -> None:
        self._model = parts.model
        self._x, self._y = probe_batch(parts.dataset.train, self.samples, seed=self.seed, device=parts.device)
        self._loss_fn = task_loss(parts.dataset.task)

    def measure(self) -> list[float]:
        """The top eigenvalues at the model's current weights."""
        hvp = HessianOperator(self._model, self._loss_fn, self._x, self._y)
        return top_eigenvalues(hvp, self.k, method=self.method, iterations=self.iterations,
                               tol=self.tol, seed=self.seed)

    def metrics(self) -> dict[str, float]:
        return {f"hessian_eig{i}": value for i, value in enumerate(self.measure(), start=1)}
