"""Feedback alignment and direct feedback alignment: parity with backprop where the theory
says they coincide, and alignment with the true gradient during training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ribbed.alternatives import DirectFeedbackAlignment, FeedbackAlignment
from ribbed.nn import build_model
from ribbed.train import Backprop
from ribbed.train.precision import Precision

FP32 = Precision("fp32", "cpu")


def _gradients(model, method, x, y) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    method.accumulate(model, x, y, F.cross_entropy, FP32, 1.0)
    return [p.grad.clone() for p in model.parameters()]


def _model(name: str, **options):
    torch.manual_seed(0)
    return build_model(name, input_shape=(24,), num_classes=5, **options).double()


def _batch():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(16, 24, generator=generator, dtype=torch.float64),
            torch.randint(0, 5, (16,), generator=generator))


@pytest.mark.parametrize("name, options", [("mlp", {"hidden": (12, 8)}), ("cnn1d", {"channels": 4})])
def test_feedback_alignment_with_the_forward_weights_as_feedback_is_backprop(name, options):
    model, (x, y) = _model(name, **options), _batch()
    method = FeedbackAlignment()
    method.attach(model)
    for layer in method.feedback:
        method.feedback[layer] = layer.weight.detach().clone()
    for aligned, exact in zip(_gradients(model, method, x, y), _gradients(model, Backprop(), x, y), strict=True):
        torch.testing.assert_close(aligned, exact, rtol=1e-10, atol=1e-12)


def test_feedback_alignment_with_random_feedback_changes_only_the_hidden_layers():
    model, (x, y) = _model("mlp", hidden=(12, 8)), _batch()
    method = FeedbackAlignment()
    method.attach(model)
    aligned, exact = _gradients(model, method, x, y), _gradients(model, Backprop(), x, y)
    names = [name for name, _ in model.named_parameters()]
    for name, a, e in zip(names, aligned, exact, strict=True):
        if name.startswith("head"):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)  # nothing transported into it
        else:
            assert not torch.allclose(a, e), f"{name}: random feedback left the gradient unchanged"


def test_direct_feedback_alignment_with_the_head_as_feedback_is_backprop_for_one_hidden_layer():
    model, (x, y) = _model("mlp", hidden=(12,)), _batch()
    method = DirectFeedbackAlignment()
    method.attach(model)
    random_feedback = _gradients(model, method, x, y)
    method.feedback[0] = model.head.weight.detach().clone()
    exact = _gradients(model, Backprop(), x, y)
    for aligned, truth in zip(_gradients(model, method, x, y), exact, strict=True):
        torch.testing.assert_close(aligned, truth, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(random_feedback[0], exact[0])


def test_direct_feedback_matrices_are_drawn_once_and_reproducibly():
    grads = []
    for _ in range(2):
        model, (x, y) = _model("mlp", hidden=(12, 8)), _batch()
        torch.manual_seed(3)
        method = DirectFeedbackAlignment()
        method.attach(model)
        first = _gradients(model, method, x, y)
        assert all(torch.equal(a, b) for a, b in zip(first, _gradients(model, method, x, y), strict=True))
        grads.append(first)
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("options, message", [
    ({"feedback_scale": 0}, "train.gradient_options.feedback_scale: got 0"),
    ({"feedback_scale": "big"}, "allowed: a positive number"),
])
def test_bad_feedback_scale_is_named(options, message):
    for method in (FeedbackAlignment, DirectFeedbackAlignment):
        with pytest.raises(ValueError, match=message):
            method(**options)


def test_direct_feedback_alignment_rejects_models_without_single_tensor_blocks():
    gru = build_model("gru", input_shape=(16,), num_classes=5, hidden_size=8)
    method = DirectFeedbackAlignment()
    method.attach(gru)
    with pytest.raises(ValueError, match="needs blocks that take and return one tensor"):
        method.accumulate(gru, torch.randn(4, 16), torch.zeros(4, dtype=torch.long), F.cross_entropy, FP32, 1.0)
    with pytest.raises(ValueError, match="needs a feed-forward model with `blocks` and a `head`"):
        method.attach(torch.nn.Linear(3, 2))
