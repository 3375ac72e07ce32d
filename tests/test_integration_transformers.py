"""Hugging Face transformers, for every optimiser of the integration table.

A tiny GPT-2 built from a config (nothing is downloaded): its attention and MLP projections are
transformers' ``Conv1D`` (a ``Linear`` stored transposed) and its ``lm_head`` is tied to the
token embedding. RIBBED, K-FAC and Adam-HD treat each ``Conv1D`` exactly as the equivalent
``Linear`` (a twin network with ``Linear`` layers takes the same steps), leave the tied head to
the base, and report the share of parameters they cover. ``Trainer(optimizers=(opt, None))``
trains, and a run resumed with ``train(resume_from_checkpoint=...)`` ends on exactly the
weights of the uninterrupted run.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

from ribbed import RIBBED
from ribbed.core import AdamHD
from tests.integration_table import CASES, assert_same_parameters, table

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """2 layers, 2 heads, width 32, a 64-token vocabulary: 8 Conv1D layers and a tied head."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


class TwoLayers(nn.Module):
    """``Conv1D -> tanh -> Conv1D``, or its twin with each ``Conv1D`` as the equivalent ``Linear``."""

    def __init__(self, linear: bool):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = Conv1D(12, 6), Conv1D(3, 12)
        if linear:
            twins = []
            for layer in (self.a, self.b):
                twin = nn.Linear(*layer.weight.shape)
                with torch.no_grad():
                    twin.weight.copy_(layer.weight.t())
                    twin.bias.copy_(layer.bias)
                twins.append(twin)
            self.a, self.b = twins

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


@table
def test_conv1d_steps_exactly_like_the_equivalent_linear_in_float64(case):
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=generator, dtype=torch.float64),
                torch.randint(0, 3, (16,), generator=generator))
               for _ in range(10)]
    trained = []
    for linear in (False, True):
        model = TwoLayers(linear).double()
        optimizer = case.build(model)
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        flip = (lambda t: t.t()) if linear else (lambda t: t)
        trained.append([flip(model.a.weight), flip(model.b.weight), model.a.bias, model.b.bias])
    start = TwoLayers(False).double()
    assert not torch.equal(trained[0][0], start.a.weight.double())
    for conv, twin in zip(*trained, strict=True):
        torch.testing.assert_close(conv, twin, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("ribbed", "kfac", "adam-hd")], ids=str)
def test_gpt2s_conv1d_layers_are_neurons_and_the_tied_head_is_not(case):
    model = tiny_gpt2()
    optimizer = case.build(model)
    head = model.lm_head.weight
    assert head is model.transformer.wte.weight
    if case.name == "ribbed":
        names = [layer.name for layer in optimizer.layers]
        assert len(names) == 8 and all(".attn.c_" in name or ".mlp.c_" in name for name in names)
        assert all(layer.transposed and layer.n == layer.weight.shape[1] for layer in optimizer.layers)
    elif case.name == "kfac":
        assert len(optimizer.layers) == 8 and all(isinstance(m, Conv1D) for m in optimizer.layers)
    else:
        assert head not in optimizer._neuron_dim and all(
            optimizer._neuron_dim[m.weight] == 1 for m in model.modules() if isinstance(m, Conv1D))
    covered = sum(p.numel() for m in model.modules() if isinstance(m, Conv1D) for p in m.parameters())
    share = covered / sum(p.numel() for p in model.parameters())
    assert f"{share:.1%} of the" in optimizer.neuron_report


def test_a_model_with_few_neuron_parameters_is_reported_with_a_warning():
    model = nn.Sequential(nn.Embedding(1000, 32), nn.Linear(32, 4))
    with pytest.warns(UserWarning, match=r"RIBBED: 0.4% of the 32,132 optimised parameters are in neuron layers"):
        CASES[0].build(model)


def _dataset(n: int = 24) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 64, (n, 12), generator=generator)
    return [{"input_ids": row, "labels": row} for row in tokens]


def _train(case, seed: int, root, max_steps: int, resume=None) -> GPT2LMHeadModel:
    model = tiny_gpt2(seed)
    arguments = TrainingArguments(
        output_dir=str(root), max_steps=max_steps, per_device_train_batch_size=4, save_strategy="steps",
        save_steps=3, logging_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=_dataset(), optimizers=(case.build(model), None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return model


@table
def test_trainer_trains_and_resumes_exactly(case, tmp_path):
    start = tiny_gpt2(0)
    whole = _train(case, 0, tmp_path / "whole", 6)
    resumed = _train(case, 5, tmp_path / "resumed", 6, resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert_same_parameters(whole, resumed)
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), whole.parameters(), strict=True))


@pytest.mark.parametrize("option, value", [("chiral_gamma", 0.01), ("reset_rate", 1e-3),
                                           ("controller_training", "unrolled"), ("norm_projection", "all")])
def test_ribbeds_row_by_row_pieces_refuse_conv1d_layers_by_name(option, value):
    with pytest.raises(ValueError, match=rf"{option}: got {value!r} on a model with transformers Conv1D layers "
                                         r"\(a, b\); allowed: .* does not handle Conv1D's transposed weight"):
        RIBBED(TwoLayers(False), **{option: value})


@pytest.mark.parametrize("optimizer_class", [RIBBED, AdamHD], ids=lambda cls: cls.__name__)
def test_optimizer_cls_and_kwargs_gets_a_refusal_that_says_what_to_pass(optimizer_class, tmp_path):
    """The Trainer builds ``optimizer_cls(param_groups, **kwargs)``; these need the model."""
    arguments = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=tiny_gpt2(), args=arguments, train_dataset=_dataset(),
                      optimizer_cls_and_kwargs=(optimizer_class, {"lr": 1e-3}))
    with pytest.raises(ValueError, match=r"model: got a? ?list; allowed: the torch.nn.Module .* optimizers=\("):
        trainer.create_optimizer()
