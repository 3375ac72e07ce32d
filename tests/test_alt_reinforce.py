"""REINFORCE with a leave-one-out baseline: unbiased on a problem with a known gradient; the
estimators for discrete choices reach the policy, plain backprop does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ribbed.alternatives import GumbelSoftmax, Reinforce, score_function_loss
from ribbed.nn import build_model
from ribbed.train import Backprop
from ribbed.train.precision import Precision

REWARD = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)


def _estimates(loss_of, groups: int = 40, inputs: int = 500, samples: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group estimates of ``∇ E[reward]`` for a categorical policy, and the exact gradient."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.3, -0.5, 1.0, -1.2, 0.1], dtype=torch.float64, requires_grad=True)
    probabilities = torch.softmax(logits, 0).detach()
    exact = probabilities * (REWARD - probabilities @ REWARD)
    estimates = []
    for _ in range(groups):
        choices = torch.multinomial(probabilities, samples * inputs, replacement=True, generator=generator)
        choices = choices.view(samples, inputs)
        log_prob = torch.log_softmax(logits, 0)[choices]
        (gradient,) = torch.autograd.grad(-loss_of(log_prob, REWARD[choices]), logits)
        estimates.append(gradient)
    return torch.stack(estimates), exact


def test_reinforce_with_the_leave_one_out_baseline_is_unbiased():
    estimates, exact = _estimates(score_function_loss)
    mean, error = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert ((mean - exact).abs() < 4 * error).all(), f"mean {mean} vs exact {exact} (se {error})"
    assert (error < 0.1 * exact.abs().max()).all(), "guard: the test must be sharp enough to see a bias"


def test_a_baseline_that_includes_the_sample_itself_is_biased():
    """Guard for the test above: the same check catches a baseline that sees its own reward."""

    def own_mean_baseline(log_prob, reward):
        return -((reward - reward.mean(0, keepdim=True)) * log_prob).mean()

    estimates, exact = _estimates(own_mean_baseline)
    mean, error = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert ((mean - exact).abs() > 4 * error).any()
    torch.testing.assert_close(mean, exact * 3 / 4, atol=float(4 * error.max()), rtol=0)


def test_the_estimator_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        score_function_loss(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"train.gradient_options.samples: got 1 .* at least 2"):
        Reinforce(samples=1)


@pytest.mark.parametrize("method, reaches_policy", [
    (Backprop(), False),
    (Reinforce(samples=3), True),
    (GumbelSoftmax(temperature=0.5), True),
    (GumbelSoftmax(hard=True), True),
])
def test_only_the_estimators_train_the_policy(method, reaches_policy):
    torch.manual_seed(0)
    model = build_model("hard-attention", input_shape=(12,), num_classes=3, segments=4, glimpses=2,
                        hidden=(8,), policy_hidden=6)
    method.attach(model)
    method.accumulate(model, torch.randn(10, 12), torch.randint(0, 3, (10,)), F.cross_entropy,
                      Precision("fp32", "cpu"), 1.0)
    policy_grads = [p.grad for p in model.policy.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in policy_grads) == reaches_policy
    assert all(p.grad is not None for p in model.head.parameters())


def test_the_classifier_sees_only_the_chosen_segments():
    model = build_model("hard-attention", input_shape=(10,), num_classes=3, segments=5, glimpses=1, hidden=(4,))
    x = torch.randn(2, 10)
    choices = F.one_hot(torch.tensor([[1], [4]]), 5).float()
    changed = x.clone()
    changed[:, [0, 1, 4, 5, 6, 7, 8, 9]] += 10.0  # everything but segment 1
    before, after = model.classify(x, choices), model.classify(changed, choices)
    torch.testing.assert_close(after[0], before[0])  # row 0 looks at segment 1 only
    assert not torch.allclose(after[1], before[1])  # row 1 looks at segment 4, which changed


def test_estimators_need_the_hard_attention_model():
    mlp = build_model("mlp", input_shape=(4,), num_classes=2)
    for method in (Reinforce(), GumbelSoftmax()):
        with pytest.raises(ValueError, match="needs model 'hard-attention'"):
            method.attach(mlp)
