"""Forward-Forward: goodness logits, and strictly layer-local training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ribbed.alternatives import ForwardForward
from ribbed.alternatives.forward_forward import goodness
from ribbed.nn import build_model
from ribbed.train.precision import Precision


def _model():
    torch.manual_seed(0)
    return build_model("forward-forward", input_shape=(2, 5), num_classes=4, hidden=(12, 9, 7)).double()


def test_logits_are_the_goodness_of_each_candidate_label_summed_over_layers():
    model = _model()
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    logits = model(x)
    for b in range(3):
        for label in range(4):
            layers = model.activities(model.embed(x[b : b + 1], torch.tensor([label])))
            torch.testing.assert_close(logits[b, label], sum(goodness(h) for h in layers)[0])


def test_each_layer_learns_only_from_its_own_goodness():
    """Changing a layer's weights changes no other layer's gradient below it, and the
    gradient of layer 0 equals that of layer 0's loss alone."""
    model = _model()
    x, y = torch.randn(16, 2, 5, dtype=torch.float64), torch.randint(0, 4, (16,))
    method = ForwardForward(threshold=1.0, negatives="random")
    method.attach(model)

    def first_layer_gradient():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        method.accumulate(model, x, y, F.cross_entropy, Precision("fp32", "cpu"), 1.0)
        return model.blocks[0].weight.grad.clone(), model.blocks[2].weight.grad.clone()

    before, top_before = first_layer_gradient()
    with torch.no_grad():
        model.blocks[1].weight.mul_(-2.0)
    after, top_after = first_layer_gradient()
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not torch.allclose(top_after, top_before), "guard: the change reached the layers above"

    torch.manual_seed(5)
    negative = method._negative_labels(model(x), y)
    g = goodness(model.activities(model.embed(torch.cat([x, x]), torch.cat([y, negative])))[0]) - 1.0
    local = F.softplus(-g[:16]).mean() + F.softplus(g[16:]).mean()
    (expected,) = torch.autograd.grad(local, model.blocks[0].weight)
    torch.testing.assert_close(after, expected)


def test_negatives_are_never_the_true_label():
    model = _model()
    y = torch.randint(0, 4, (500,))
    for negatives in ("hard", "random"):
        labels = ForwardForward(negatives=negatives)._negative_labels(
            model(torch.randn(500, 2, 5, dtype=torch.float64)), y)
        assert (labels != y).all()
        assert len(labels.unique()) == 4


@pytest.mark.parametrize("options, message", [
    ({"threshold": 0}, r"train.gradient_options.threshold: got 0"),
    ({"negatives": "easy"}, r"train.gradient_options.negatives: got 'easy' .* allowed: hard, random"),
])
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        ForwardForward(**options)


def test_forward_forward_needs_its_model():
    with pytest.raises(ValueError, match="needs model 'forward-forward'"):
        ForwardForward().attach(build_model("mlp", input_shape=(4,), num_classes=2))
