"""Memory measurement and checkpointing policies: exact saved-tensor accounting, identical
gradients under every policy, the memory each policy keeps, peak memory, and the studies."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ribbed.config import StudyConfig
from ribbed.memory import profile_training, track_peak_memory, track_saved_tensors
from ribbed.nn import ModelError, build_model, set_checkpointing
from ribbed.nn.checkpointing import CHECKPOINT_POLICIES, checkpoint_segments

POLICIES = ["none", "every", "every-2", "every-3", "sqrt", "selective"]
LM = "language-modeling"


def deep_mlp(blocks: int = 8, width: int = 32):
    torch.manual_seed(0)
    return build_model("mlp", input_shape=(width,), num_classes=10, hidden=(width,) * blocks)


def small_gpt(**options):
    torch.manual_seed(0)
    return build_model("gpt", input_shape=(16,), num_classes=30, task=LM, n_layer=4, n_head=2,
                       n_embd=16, **options)


def batch(model):
    generator = torch.Generator().manual_seed(1)
    if hasattr(model, "wte"):
        tokens = torch.randint(0, 30, (3, 16), generator=generator)
        return tokens, tokens.roll(-1, dims=1)
    width = model.blocks[0][0].in_features
    return torch.randn(8, width, generator=generator), torch.randint(0, 10, (8,), generator=generator)


def loss_of(model, inputs, targets):
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def activation_bytes(model, policy: str) -> int:
    set_checkpointing(model, policy)
    inputs, targets = batch(model)
    with track_saved_tensors(exclude=model.parameters()) as saved:
        loss = loss_of(model, inputs, targets)
    loss.backward()
    return saved.bytes


# ---------------------------------------------------------------------- saved tensors


def test_saved_tensors_are_counted_once_per_storage_without_parameters():
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with track_saved_tensors(exclude=layer.parameters()) as saved:
        hidden = torch.relu(layer(x))
        out = layer(hidden)  # the ReLU output is saved again by the matmul: same storage
    out.sum().backward()
    assert saved.count == 2  # x and the ReLU output; the weight is excluded
    assert saved.bytes == 2 * 4 * 8 * 4


def test_excluded_inputs_and_parameters_are_not_counted():
    q = torch.randn(2, 5, requires_grad=True)
    with track_saved_tensors(exclude=[q]) as saved:
        (q * q).sum()
    assert saved.bytes == 0
    with track_saved_tensors() as saved:
        (q * q).sum()
    assert saved.bytes == q.numel() * 4


# ---------------------------------------------------------------------- policies


@pytest.mark.parametrize("make", [deep_mlp, small_gpt, lambda: small_gpt(feed_forward="moe")],
                         ids=["mlp", "gpt", "gpt-moe"])
@pytest.mark.parametrize("policy", POLICIES[1:])
def test_every_policy_gives_the_plain_gradients(make, policy):
    plain, checkpointed = make(), make()
    losses = []
    for model, name in ((plain, "none"), (checkpointed, policy)):
        set_checkpointing(model, name)
        loss = loss_of(model, *batch(model))
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_every_policy_trains_like_no_checkpointing(tiny_config, policy):
    from ribbed.train import build_run, train

    def trained(name):
        config = tiny_config(model={"name": "mlp", "options": {"hidden": [32, 32, 32, 32]}},
                             train={"steps": 5, "checkpointing": name})
        return train(build_run(config), evaluate_test=False).model.state_dict()

    plain, checkpointed = trained("none"), trained(policy)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, rtol=0, atol=1e-6, msg=name)


def test_segments_follow_the_policy():
    def shape(policy, blocks):
        return [(s.start, s.stop, s.checkpointed) for s in checkpoint_segments(policy, blocks)]

    assert shape("none", 4) == [(0, 4, False)]
    assert shape("every", 3) == [(0, 1, True), (1, 2, True), (2, 3, True)]
    assert shape("every-3", 7) == [(0, 3, True), (3, 6, True), (6, 7, True)]
    assert shape("sqrt", 16) == [(0, 4, True), (4, 8, True), (8, 12, True), (12, 16, True)]
    assert shape("sqrt", 10) == [(0, 4, True), (4, 8, True), (8, 10, True)]
    assert set(CHECKPOINT_POLICIES) == {"none", "every", "sqrt", "selective"}


@pytest.mark.parametrize("policy", ["every-0", "every-x", "every-", "sometimes", "Every"])
def test_bad_policies_name_what_is_allowed(policy):
    with pytest.raises(ModelError, match=f"'{policy}'.*allowed: none, every, sqrt, selective, or every-<k>"):
        set_checkpointing(deep_mlp(), policy)


def test_segments_of_sqrt_size_keep_about_sqrt_of_the_activations():
    """16 equal blocks: ``none`` keeps the input and 16 block outputs, ``sqrt`` keeps the
    inputs of its 4 segments and the last output: (sqrt(L) + 1) / (L + 1)."""
    model = deep_mlp(blocks=16, width=256)
    plain, sqrt = activation_bytes(model, "none"), activation_bytes(model, "sqrt")
    assert sqrt / plain == pytest.approx(5 / 17, rel=0.02)
    assert activation_bytes(model, "every-2") / plain == pytest.approx(9 / 17, rel=0.02)


def test_single_block_checkpoints_save_nothing_on_a_relu_mlp():
    """A Linear + ReLU block keeps only its input (the previous ReLU output): storing block
    inputs instead is the same memory. Segments are what help."""
    model = deep_mlp()
    assert activation_bytes(model, "every") == activation_bytes(model, "none")


def test_selective_checkpointing_of_a_transformer_sits_between_none_and_every():
    model = small_gpt()
    plain, every, selective = (activation_bytes(model, p) for p in ("none", "every", "selective"))
    assert every < selective < plain


def test_selective_saves_are_counted():
    """The matmul outputs selective checkpointing caches are outside the autograd hooks;
    without counting them, ``selective`` would look as small as ``every``."""
    model = small_gpt()
    assert activation_bytes(model, "selective") > activation_bytes(model, "every") * 1.5


# ---------------------------------------------------------------------- peak memory and profile


def test_peak_process_memory_sees_a_large_temporary():
    size = 64 * 2**20
    with track_peak_memory() as peak:
        buffer = torch.ones(size // 4)
        del buffer
    assert peak.process_bytes is not None and peak.process_bytes >= 0.9 * size
    assert peak.cuda_bytes is None or not torch.cuda.is_available()
    with track_peak_memory() as quiet:
        pass
    assert quiet.process_bytes < 0.2 * size


def test_profile_of_a_run_reports_bytes_peak_and_time(tiny_config):
    config = tiny_config(model={"name": "mlp", "options": {"hidden": [64] * 8}})
    plain = profile_training(config, steps=3)
    checkpointed = profile_training(config.model_copy(update={"train": config.train.model_copy(
        update={"checkpointing": "sqrt"})}), steps=3)
    assert checkpointed.activation_bytes < plain.activation_bytes
    assert plain.step_seconds > 0 and plain.steps == 3
    assert plain.peak_process_bytes is not None
    with pytest.raises(ValueError, match="steps: got 2; allowed: an integer >= 3"):
        profile_training(config, steps=2)


# ---------------------------------------------------------------------- studies


def test_checkpoint_sparse_study_runs_end_to_end(tmp_path):
    from ribbed.experiments.studies import run_study

    config = StudyConfig(name="cs", study="checkpoint-sparse", options={
        "dataset": "digits", "depths": [2, 4], "width": 16, "batch_size": 8, "policies": ["none", "sqrt"],
        "sparsities": [0.0, 0.9], "steps": 3,
        "comparison": {
            "name": "cs-accuracy", "baseline": "dense", "seeds": 2, "metric": "test_acc",
            "base": {"data": {"name": "digits", "batch_size": 32},
                     "model": {"name": "mlp", "options": {"hidden": [16]}},
                     "schedule": {"kind": "constant"}, "train": {"steps": 8, "eval_every": 4}},
            "methods": {"dense": {"optimizer": {"name": "adamw", "lr": 0.01}},
                        "topk-90": {"optimizer": {"name": "adamw", "lr": 0.01},
                                    "overrides": {"train": {"plugins": [
                                        {"name": "topk-grad", "options": {"sparsity": 0.9}}]}}}},
        },
    })
    outcome = run_study(config, runs_dir=tmp_path)
    summary = outcome.summary
    titles = [table["title"] for table in summary["tables"]]
    assert any("activation" in title.lower() for title in titles)
    measured = summary["data"]["measurements"]
    assert len(measured) == 2 * 2 * 2
    by_key = {(m["depth"], m["policy"], m["sparsity"]): m for m in measured}
    assert by_key[4, "sqrt", 0.0]["activation_bytes"] < by_key[4, "none", 0.0]["activation_bytes"]
    assert by_key[4, "none", 0.9]["activation_bytes"] == by_key[4, "none", 0.0]["activation_bytes"]
    assert summary["data"]["comparison"]["id"]
    assert outcome.report_md.read_text().count("|") > 10
    assert all((outcome.record.path / figure["file"]).is_file() for figure in summary["figures"])


def test_moe_attention_study_runs_end_to_end(tmp_path):
    from ribbed.experiments.studies import run_study

    config = StudyConfig(name="ma", study="moe-attention", options={
        "lengths": [16, 32], "attentions": ["naive", "linear"], "feed_forwards": ["mlp", "moe"],
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16}, "repeats": 1,
        "comparison": {
            "name": "ma-training", "baseline": "dense-sdpa", "seeds": 1, "metric": "val_loss",
            "mode": "min",
            "base": {"data": {"name": "text-char", "batch_size": 4, "options": {"block_size": 16}},
                     "model": {"name": "gpt", "options": {"n_layer": 1, "n_head": 2, "n_embd": 16}},
                     "train": {"steps": 4, "eval_every": 2}},
            "methods": {
                "dense-sdpa": {"optimizer": {"name": "adamw", "lr": 0.003}},
                "moe-linear": {"optimizer": {"name": "adamw", "lr": 0.003}, "overrides": {
                    "model": {"options": {"attention": "linear", "feed_forward": "moe"}},
                    "train": {"plugins": [{"name": "moe-load"}]}}},
            },
        },
    })
    summary = run_study(config, runs_dir=tmp_path).summary
    sweep = summary["data"]["sweep"]
    assert len(sweep) == 2 * 2 * 2
    by_key = {(m["attention"], m["feed_forward"], m["length"]): m for m in sweep}
    naive_growth = by_key["naive", "mlp", 32]["activation_bytes"] / by_key["naive", "mlp", 16]["activation_bytes"]
    linear_growth = by_key["linear", "mlp", 32]["activation_bytes"] / by_key["linear", "mlp", 16]["activation_bytes"]
    assert naive_growth > linear_growth
    assert math.isfinite(summary["data"]["training"][0]["tokens_per_second"])
