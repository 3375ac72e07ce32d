"""K-FAC against its definition, in float64: the factors, their accumulation over
micro-batches, and the preconditioned step as a dense solve with the Kronecker product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ribbed.optim import KFAC, OptimizerError, build_optimizer


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


class TinyConvNet(nn.Module):
    """A strided, padded Conv1d and a Linear head: both kinds of layer K-FAC covers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(3 * 4, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def conv_patches(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """``[N, T, C*k]`` input patches by slicing the zero-padded input (no unfold)."""
    (k,), (stride,), (pad,) = conv.kernel_size, conv.stride, conv.padding
    padded = F.pad(x, (pad, pad))
    positions = range(0, padded.shape[-1] - k + 1, stride)
    return torch.stack([padded[:, :, t:t + k].reshape(len(x), -1) for t in positions], dim=1)


def explicit_factors(model: TinyConvNet, x: torch.Tensor, y: torch.Tensor) -> dict[nn.Module, tuple]:
    """``A = E_i[(1/T) Σ_t ā ā^T]`` and ``G = E_i[Σ_t δ δ^T]``, sample by sample and position by position.

    ``δ`` is the gradient of the per-sample loss, taken from a sum-reduced loss (so no
    batch-size scaling is shared with the implementation).
    """
    outputs = {}

    def keep(module, args, out):
        out.retain_grad()
        outputs[module] = (args[0], out)

    handles = [m.register_forward_hook(keep) for m in (model.conv, model.head)]
    F.cross_entropy(model(x), y, reduction="sum").backward()
    for handle in handles:
        handle.remove()
    n = len(x)
    factors = {}
    for module, (inputs, out) in outputs.items():
        if module is model.conv:
            rows, deltas = conv_patches(module, inputs.detach()), out.grad.transpose(1, 2)
        else:
            rows, deltas = inputs.detach().unsqueeze(1), out.grad.unsqueeze(1)
        rows = torch.cat([rows, torch.ones(*rows.shape[:2], 1)], dim=-1)
        positions = rows.shape[1]
        a = sum(torch.outer(rows[i, t], rows[i, t]) for i in range(n) for t in range(positions)) / (n * positions)
        g = sum(torch.outer(deltas[i, t], deltas[i, t]) for i in range(n) for t in range(deltas.shape[1])) / n
        factors[module] = (a, g)
    model.zero_grad()
    return factors


def kfac_for(model, lr=0.0, **options):
    options = {"factor_decay": 0.0, "kl_clip": None, **options}
    return KFAC(model, torch.optim.SGD(model.parameters(), lr=lr), **options)


def batch(n=6):
    return torch.randn(n, 2, 8), torch.randint(0, 5, (n,))


def test_factors_equal_their_definition_for_linear_and_conv_layers():
    model, (x, y) = TinyConvNet(), batch()
    expected = explicit_factors(model, x, y)
    optimizer = kfac_for(model)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for module, (a, g) in expected.items():
        state = optimizer.state[module.weight]
        torch.testing.assert_close(state["A"], a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(state["G"], g, rtol=1e-10, atol=1e-12)


def test_micro_batches_give_the_full_batch_factors():
    """Two halves with their losses averaged (as the training loop accumulates) = one batch."""
    x, y = batch(8)
    full, halves = TinyConvNet(), TinyConvNet()
    halves.load_state_dict(full.state_dict())
    one, two = kfac_for(full), kfac_for(halves)
    F.cross_entropy(full(x), y).backward()
    for rows in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(halves(x[rows]), y[rows]) / 2).backward()
    one.step()
    two.step()
    for a, b in zip(one.layers, two.layers, strict=True):
        for key in ("A", "G"):
            torch.testing.assert_close(two.state[b.weight][key], one.state[a.weight][key], rtol=1e-10, atol=1e-12)


def test_running_average_mixes_old_and_new_factors():
    model = TinyConvNet()
    optimizer = kfac_for(model, factor_decay=0.75)
    batches = [batch(), batch()]
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    first, second = (explicit_factors(model, x, y)[model.head] for x, y in batches)
    torch.testing.assert_close(optimizer.state[model.head.weight]["A"], 0.75 * first[0] + 0.25 * second[0])


def test_the_step_solves_the_damped_kronecker_system():
    """SGD(lr=1) moves ``[W b]`` by ``-(G ⊗ A + λI)⁻¹ vec(∇[W b])`` (row-major vec)."""
    model = nn.Linear(3, 4)
    x, y = torch.randn(10, 3), torch.randint(0, 4, (10,))
    damping = 0.05
    optimizer = kfac_for(model, lr=1.0, damping=damping)
    before = torch.cat([model.weight, model.bias[:, None]], 1).detach().clone()
    F.cross_entropy(model(x), y).backward()
    gradient = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).clone()
    optimizer.step()
    state = optimizer.state[model.weight]
    system = torch.kron(state["G"], state["A"]) + damping * torch.eye(gradient.numel())
    expected = before - torch.linalg.solve(system, gradient.reshape(-1)).reshape(gradient.shape)
    torch.testing.assert_close(torch.cat([model.weight, model.bias[:, None]], 1).detach(), expected,
                               rtol=1e-8, atol=1e-10)


def test_kl_clip_bounds_the_step():
    """The clipped step ``ν u`` has ``lr² ν² <u, g> = kl_clip`` (the KL proxy ``Δθᵀ F Δθ``)."""
    x, y = batch()
    lr, bound = 0.5, 1e-6
    steps = {}
    for clip in (None, bound):
        model = TinyConvNet()
        torch.manual_seed(1)
        model.load_state_dict(TinyConvNet().state_dict())
        optimizer = kfac_for(model, lr=lr, kl_clip=clip)
        F.cross_entropy(model(x), y).backward()
        raw = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        optimizer.step()
        steps[clip] = (before - torch.cat([p.detach().reshape(-1) for p in model.parameters()])) / lr
    nu = steps[bound].norm() / steps[None].norm()
    assert nu < 1
    torch.testing.assert_close(steps[bound], nu * steps[None])
    assert (lr * nu) ** 2 * (steps[None] @ raw) == pytest.approx(bound, rel=1e-8)


def test_inverse_is_refreshed_every_n_steps_only():
    model, (x, y) = TinyConvNet(), batch()
    optimizer = kfac_for(model, inverse_every=3)
    seen = []
    for _ in range(4):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn_like(x)), y).backward()
        optimizer.step()
        seen.append(optimizer.state[model.head.weight]["QA"].clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3])


def test_fp16_gradients_are_rejected_with_a_clear_error():
    torch.set_default_dtype(torch.float32)
    model = nn.Linear(4, 3)
    optimizer = kfac_for(model)
    with pytest.raises(RuntimeError, match="fp16.*allowed train.precision: fp32 or bf16"):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(5, 4)).float().square().mean()
        loss.backward()
    assert optimizer.layers == [model]


def test_a_model_without_supported_layers_is_an_error():
    with pytest.raises(OptimizerError, match="no Linear or Conv1d/Conv2d layer"):
        build_optimizer("kfac", nn.Sequential(nn.LayerNorm(3)), lr=0.1)


@pytest.mark.parametrize("option, value, allowed", [
    ("damping", 0.0, "> 0"), ("factor_decay", 1.0, r"in \[0, 1\)"), ("inverse_every", 0, "an integer >= 1"),
])
def test_bad_options_name_the_field_value_and_rule(option, value, allowed):
    with pytest.raises(OptimizerError, match=rf"optimizer.options.{option}: got {value!r}; allowed: {allowed}"):
        build_optimizer("kfac", nn.Linear(2, 2), lr=0.1, **{option: value})


def test_zero_grad_drops_statistics_of_an_abandoned_pass_and_hooks_can_be_removed():
    model, (x, y) = TinyConvNet(), batch()
    optimizer = kfac_for(model)
    F.cross_entropy(model(torch.randn_like(x)), y).backward()  # a pass whose step never comes
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    expected = explicit_factors(model, x, y)[model.head]
    torch.testing.assert_close(optimizer.state[model.head.weight]["A"], expected[0])
    optimizer.remove_hooks()
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert optimizer._pending == {}


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_a_copied_model_and_kfac_train_exactly_like_the_original(copier):
    """``copy.deepcopy((model, opt))`` and a pickle round trip give a working pair: the copy's
    hooks feed the copied K-FAC, and both continue to the same weights."""
    import copy
    import pickle

    model = TinyConvNet()
    optimizer = kfac_for(model, lr=0.05, factor_decay=0.9)
    batches = [batch() for _ in range(6)]

    def train(net, opt, part):
        for x, y in part:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()

    train(model, optimizer, batches[:3])
    copied_model, copied = (copy.deepcopy((model, optimizer)) if copier == "deepcopy"
                            else pickle.loads(pickle.dumps((model, optimizer))))
    train(copied_model, copied, batches[3:])
    train(model, optimizer, batches[3:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copied_model.parameters(), strict=True))
    assert copied.base is not optimizer.base


def test_kfac_given_parameters_instead_of_the_model_says_what_to_pass():
    model = TinyConvNet()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OptimizerError, match=r"model: got a generator; allowed: the torch.nn.Module whose layers"):
        KFAC(model.parameters(), base)
    with pytest.raises(OptimizerError, match=r"base optimiser: got a list; allowed: a torch.optim.Optimizer"):
        KFAC(model, list(model.parameters()))
