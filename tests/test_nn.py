"""Tests for ribbed.nn: one table of models drives the shape, gradient, determinism and
checkpointing tests, so adding a model is one line in ``CASES``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ribbed.nn import (
    CHECKPOINT_POLICIES,
    ModelError,
    build_model,
    list_models,
    set_checkpointing,
)

BATCH = 3
LM = "language-modeling"
SMALL_GPT = {"n_layer": 2, "n_head": 2, "n_embd": 16}


@dataclass(frozen=True)
class Case:
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name}-{'x'.join(map(str, self.input_shape))}-{self.task}"

    def build(self, seed: int = 0) -> torch.nn.Module:
        torch.manual_seed(seed)
        return build_model(
            self.name,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            task=self.task,
            **self.options,
        )

    def batch(self, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded ``(inputs, targets)`` batch; ``steps`` shortens a language-model sequence."""
        generator = torch.Generator().manual_seed(1)
        if self.task == LM:
            shape = (BATCH, steps or self.input_shape[0])
            tokens = torch.randint(0, self.num_classes, shape, generator=generator)
            return tokens, tokens.roll(-1, dims=1)
        inputs = torch.randn(BATCH, *self.input_shape, generator=generator)
        return inputs, torch.randint(0, self.num_classes, (BATCH,), generator=generator)

    def output_shape(self, steps: int | None = None) -> tuple[int, ...]:
        if self.task == LM:
            return (BATCH, steps or self.input_shape[0], self.num_classes)
        return (BATCH, self.num_classes)


CASES = [
    Case("mlp", (40,), 10, options={"hidden": (32, 32)}),
    Case("mlp", (1, 8, 8), 10, options={"hidden": [16, 16, 16], "activation": "gelu"}),
    Case("cnn1d", (40,), 10, options={"channels": 8}),
    Case("cnn1d", (2, 40), 10, options={"channels": 8, "kernel_size": 3}),
    Case("cnn2d", (1, 8, 8), 10, options={"channels": (4, 8, 8, 8)}),
    Case("cnn2d", (1, 28, 28), 10, options={"channels": (4, 8)}),
    Case("cnn2d", (3, 32, 32), 10, options={"channels": (4, 8)}),
    Case("gpt", (12,), 50, LM, SMALL_GPT),
    Case("gpt", (12,), 50, LM, {**SMALL_GPT, "attention": "naive", "bias": False}),
    Case("gru", (40,), 10, options={"hidden_size": 16}),
    Case("gru", (2, 40), 10, options={"hidden_size": 16, "num_layers": 2}),
    Case("gru", (12,), 50, LM, {"embed_dim": 8, "hidden_size": 16}),
]
case_params = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def loss_of(model: torch.nn.Module, case: Case, steps: int | None = None) -> torch.Tensor:
    inputs, targets = case.batch(steps)
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, case.num_classes), targets.reshape(-1))


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_every_core_model_is_in_the_table():
    """Models of ``ribbed.nn`` itself; extension packages test the models they register."""
    import ribbed.nn.registry as registry

    core = {name for name, cls in registry._MODELS.items() if cls.__module__.startswith("ribbed.nn.")}
    assert core == {case.name for case in CASES}
    assert core <= set(list_models())


@case_params
def test_output_shape(case):
    model = case.build()
    inputs, _ = case.batch()
    assert model(inputs).shape == case.output_shape()


@case_params
def test_every_parameter_gets_a_finite_gradient(case):
    model = case.build()
    loss_of(model, case).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


@case_params
def test_same_seed_builds_identical_parameters(case):
    first, second = case.build(seed=3).state_dict(), case.build(seed=3).state_dict()
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    different = case.build(seed=4).state_dict()
    assert any(not torch.equal(first[name], different[name]) for name in first)


@case_params
def test_checkpointing_every_block_matches_no_checkpointing(case):
    model = case.build()
    plain_loss = loss_of(model, case)
    plain_loss.backward()
    plain_grads = gradients(model)
    model.zero_grad()
    set_checkpointing(model, "every")
    checkpointed_loss = loss_of(model, case)
    checkpointed_loss.backward()
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=0, atol=1e-6)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=1e-6, msg=name)


def saved_activation_bytes(model: torch.nn.Module, inputs: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward outside checkpointed regions."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs).sum().backward()
    return total


DEEP_MLP = Case("mlp", (256,), 10, options={"hidden": (256,) * 8})


def test_checkpointing_saves_fewer_activations():
    model = DEEP_MLP.build()
    inputs, _ = DEEP_MLP.batch()
    plain = saved_activation_bytes(model, inputs)
    checkpointed = saved_activation_bytes(set_checkpointing(model, "every"), inputs)
    assert checkpointed < plain / 4


def test_checkpointing_is_off_in_evaluation():
    model = DEEP_MLP.build().eval()
    inputs, _ = DEEP_MLP.batch()
    plain = saved_activation_bytes(model, inputs)
    assert saved_activation_bytes(set_checkpointing(model, "every"), inputs) == plain


def test_set_checkpointing_validates_the_policy():
    model = CASES[0].build()
    assert model.checkpoint_policy == "none"
    assert set(CHECKPOINT_POLICIES) >= {"none", "every"}
    with pytest.raises(ModelError, match="'sometimes'"):
        set_checkpointing(model, "sometimes")
    with pytest.raises(ModelError, match="blocks"):
        set_checkpointing(torch.nn.Linear(2, 2), "every")


GPT_CASE = Case("gpt", (12,), 50, LM, SMALL_GPT)


def test_gpt_is_causal():
    model = GPT_CASE.build().eval()
    tokens, _ = GPT_CASE.batch()
    changed = tokens.clone()
    position = 5
    changed[:, position] = (changed[:, position] + 1) % GPT_CASE.num_classes
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :position], before[:, :position], rtol=0, atol=0)
    assert not torch.allclose(after[:, position], before[:, position])


def test_sdpa_and_naive_attention_agree_forward_and_backward():
    fused = GPT_CASE.build()
    naive_case = Case("gpt", (12,), 50, LM, {**SMALL_GPT, "attention": "naive"})
    naive = naive_case.build(seed=99)
    naive.load_state_dict(fused.state_dict())
    fused_loss, naive_loss = loss_of(fused, GPT_CASE), loss_of(naive, naive_case)
    fused_loss.backward()
    naive_loss.backward()
    torch.testing.assert_close(fused_loss, naive_loss, rtol=0, atol=1e-5)
    naive_grads = gradients(naive)
    for name, grad in gradients(fused).items():
        torch.testing.assert_close(grad, naive_grads[name], rtol=0, atol=1e-5, msg=name)


def test_gpt_ties_embedding_and_head():
    model = GPT_CASE.build()
    assert model.lm_head.weight is model.wte.weight


def test_gpt_accepts_shorter_sequences_and_rejects_longer():
    model = GPT_CASE.build()
    tokens, _ = GPT_CASE.batch(steps=5)
    assert model(tokens).shape == GPT_CASE.output_shape(steps=5)
    too_long = torch.zeros(BATCH, GPT_CASE.input_shape[0] + 1, dtype=torch.long)
    with pytest.raises(ModelError, match="block_size=12"):
        model(too_long)


GRU_LM = Case("gru", (12,), 50, LM, {"embed_dim": 8, "hidden_size": 16})


def test_gru_hidden_state_continues_a_sequence():
    model = GRU_LM.build()
    tokens, _ = GRU_LM.batch()
    whole, whole_hidden = model(tokens, return_hidden=True)
    first, hidden = model(tokens[:, :5], return_hidden=True)
    second, final = model(tokens[:, 5:], hidden=hidden, return_hidden=True)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole)
    torch.testing.assert_close(final, whole_hidden)


ERRORS = [
    ("unknown model", dict(name="resnet"), "'resnet'.*available.*mlp"),
    ("unknown option", dict(width=3), "'width'.*allowed.*hidden"),
    ("unsupported task", dict(name="gpt"), "supports tasks.*language-modeling"),
    ("unknown task", dict(task="regression"), "task='regression'"),
    (
        "n_embd % n_head",
        dict(name="gpt", task=LM, n_embd=30, n_head=4),
        "n_embd=30.*multiple of n_head=4",
    ),
    ("non-positive size", dict(hidden=(32, 0)), r"hidden=\(32, 0\).*positive"),
    ("bad activation", dict(activation="swish"), "activation='swish'.*relu"),
    ("bad dropout", dict(dropout=1.0), "dropout=1.0"),
    ("bad attention", dict(name="gpt", task=LM, attention="flash"), "attention='flash'.*naive"),
    (
        "bad input_shape",
        dict(name="cnn2d", input_shape=(784,)),
        r"input_shape=\(784,\).*\(C, H, W\)",
    ),
    ("too short signal", dict(name="cnn1d", input_shape=(2,)), "input_shape.*too short"),
    ("bad num_classes", dict(num_classes=0), "num_classes=0"),
]


@pytest.mark.parametrize("overrides, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_build_errors_name_the_bad_value(overrides, message):
    arguments = {"name": "mlp", "input_shape": (16,), "num_classes": 10, **overrides}
    with pytest.raises(ModelError, match=message):
        build_model(arguments.pop("name"), **arguments)
