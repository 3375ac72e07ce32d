"""Truncated BPTT: with the full length it is full BPTT; shorter chunks cut long dependencies."""

from __future__ import annotations

import pytest
import torch

from ribbed.alternatives import TruncatedBPTT
from ribbed.nn import build_model
from ribbed.train import Backprop, task_loss
from ribbed.train.precision import Precision

LOSS = task_loss("language-modeling")


def _language_model():
    torch.manual_seed(0)
    model = build_model("gru", input_shape=(12,), num_classes=11, task="language-modeling",
                        embed_dim=6, hidden_size=8).double()
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (4, 13), generator=generator)
    return model, tokens[:, :-1], tokens[:, 1:]


def _run(model, method, x, y):
    model.zero_grad(set_to_none=True)
    loss = method.accumulate(model, x, y, LOSS, Precision("fp32", "cpu"), 1.0)
    return loss, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("truncation", [12, 50])
def test_truncation_at_the_full_length_is_full_bptt(truncation):
    model, x, y = _language_model()
    full_loss, full = _run(model, Backprop(), x, y)
    method = TruncatedBPTT(truncation=truncation)
    method.attach(model)
    loss, truncated = _run(model, method, x, y)
    torch.testing.assert_close(loss.double(), full_loss.double())
    for a, b in zip(truncated, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_shorter_chunks_keep_the_loss_but_cut_the_gradient():
    model, x, y = _language_model()
    full_loss, full = _run(model, Backprop(), x, y)
    loss, truncated = _run(model, TruncatedBPTT(truncation=5), x, y)  # chunks of 5, 5 and 2 steps
    torch.testing.assert_close(loss.double(), full_loss.double())
    names = [name for name, _ in model.named_parameters()]
    recurrent = [i for i, name in enumerate(names) if "weight_hh" in name]
    assert all(not torch.allclose(truncated[i], full[i]) for i in recurrent)
    head = names.index("head.weight")
    torch.testing.assert_close(truncated[head], full[head])  # the read-out needs no time steps


def test_tbptt_needs_a_recurrent_language_model():
    with pytest.raises(ValueError, match="needs a recurrent model whose forward takes `hidden`"):
        TruncatedBPTT().attach(build_model("mlp", input_shape=(4,), num_classes=2))
    gru = build_model("gru", input_shape=(8,), num_classes=3, hidden_size=4)
    with pytest.raises(ValueError, match="needs language-modelling batches"):
        TruncatedBPTT().accumulate(gru, torch.randn(2, 8), torch.zeros(2, dtype=torch.long), LOSS,
                                   Precision("fp32", "cpu"), 1.0)
    with pytest.raises(ValueError, match=r"train.gradient_options.truncation: got 0"):
        TruncatedBPTT(truncation=0)
