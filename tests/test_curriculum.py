"""Curriculum learning and data order: pacing functions, difficulty scores, samplers."""

from __future__ import annotations

import math

import pytest
import torch

from ribbed.curriculum import (
    PacedSampler,
    build_pacing,
    difficulty_order,
    difficulty_scores,
    list_pacings,
    per_example_loss,
    per_example_margin,
)
from ribbed.data import Split, load_dataset
from ribbed.train import build_run, build_sampler, train
from tests.conftest import StopAfter

PACING_NAMES = ["linear", "quadratic", "root", "geometric", "exponential", "logarithmic", "step"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def tokens():
    """A small language-modelling split: windows of a repetitive 'text' with rare tokens."""
    generator = torch.Generator().manual_seed(0)
    common = torch.randint(0, 3, (60, 9), generator=generator)
    rare = torch.randint(3, 8, (20, 9), generator=generator)
    rows = torch.arange(60)
    common[:, :4] = torch.stack([rows // 27, rows // 9 % 3, rows // 3 % 3, rows % 3], 1)  # distinct rows
    rows = torch.arange(20)
    rare[:, :2] = 3 + torch.stack([rows // 5, rows % 5], 1)
    ids = torch.cat([common, rare])
    return Split(ids[:, :-1].clone(), ids[:, 1:].clone())


def test_every_registered_pacing_is_tested():
    assert sorted(list_pacings()) == sorted(PACING_NAMES)


@pytest.mark.parametrize("name", PACING_NAMES)
@pytest.mark.parametrize("start", [0.05, 0.3])
def test_pacing_is_monotone_starts_at_start_and_is_full_at_its_step(name, start):
    full_at = 37
    pacing = build_pacing(name, start=start, full_at=full_at)
    fractions = pacing.fractions(torch.arange(0, 3 * full_at))
    assert fractions[0] == pytest.approx(start)
    assert bool((fractions.diff() >= 0).all()), "pacing must never shrink the data"
    assert bool((fractions[full_at:] == 1.0).all()), "the full set must be available from full_at on"
    assert fractions[full_at - 1] < 1.0 or name == "logarithmic"
    assert bool(((fractions >= start) & (fractions <= 1)).all())


def test_pacing_shapes_differ_as_documented():
    linear, root, quadratic, geometric = (
        build_pacing(name, start=0.1, full_at=100) for name in ("linear", "root", "quadratic", "geometric")
    )
    assert linear(50) == pytest.approx(0.55)
    assert root(25) == pytest.approx(0.1 + 0.9 * 0.5)
    assert quadratic(50) == pytest.approx(0.1 + 0.9 * 0.25)
    assert geometric(50) == pytest.approx(math.sqrt(0.1))  # constant growth factor per step
    assert geometric(30) / geometric(20) == pytest.approx(geometric(80) / geometric(70))
    step = build_pacing("step", start=0.2, full_at=100, levels=4)
    assert sorted({round(step(t), 6) for t in range(101)}) == [0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "cubic"}, r"data.sampler.options.pacing: unknown pacing function 'cubic'; allowed: .*linear"),
    ({"start": 0.0}, r"start_fraction: got 0.0; allowed: 0 < start_fraction <= 1"),
    ({"full_at": 0}, r"full_at: got 0; allowed: an integer >= 1"),
    ({"levels": 3}, r"unknown option\(s\) \['levels'\] for 'linear'; allowed: \(none\)"),
    ({"name": "root", "degree": 0.5}, r"degree: got 0.5; allowed: a number >= 1"),
])
def test_bad_pacing_settings_name_the_field(kwargs, message):
    settings = {"name": "linear", "start": 0.1, "full_at": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_pacing(settings.pop("name"), **settings)


def test_per_example_loss_and_margin_match_a_per_row_reference():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 7, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (5, 7), generator=generator)
    expected_loss = torch.stack([torch.nn.functional.cross_entropy(logits[i], y[i]) for i in range(5)])
    torch.testing.assert_close(per_example_loss(logits, y), expected_loss)
    top2 = logits.topk(2, dim=-1).values
    true = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    other = torch.where(true == top2[..., 0], top2[..., 1], top2[..., 0])
    torch.testing.assert_close(per_example_margin(logits, y), (true - other).mean(1))


def test_rarity_ranks_windows_of_rare_tokens_hardest(tokens):
    scores = difficulty_scores(tokens, "rarity")
    assert scores[60:].min() > scores[:60].max()


def test_reference_scores_rank_mislabelled_examples_hardest(digits):
    generator = torch.Generator().manual_seed(0)
    y = digits.train.y.clone()
    flipped = torch.randperm(len(y), generator=generator)[:40]
    y[flipped] = (y[flipped] + 1 + torch.randint(0, 9, (40,), generator=generator)) % 10
    noisy = Split(digits.train.x, y)
    for measure in ("loss", "margin"):
        scores = difficulty_scores(noisy, "reference", measure=measure, steps=120, lr=1e-2)
        hardest = set(scores.argsort(descending=True)[:80].tolist())
        assert len(hardest & set(flipped.tolist())) >= 30, measure  # 40 of 1437 examples are noise


def test_reference_scores_are_deterministic_cached_and_leave_the_rng_alone(digits):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = difficulty_scores(digits.train, "reference", steps=20)
    torch.testing.assert_close(torch.rand(3), expected_next)
    assert difficulty_scores(digits.train, "reference", steps=20) is first
    copy = Split(digits.train.x.clone(), digits.train.y.clone())
    torch.testing.assert_close(difficulty_scores(copy, "reference", steps=20), first)


def test_bad_difficulty_settings_name_the_field(digits, tokens):
    with pytest.raises(ValueError, match=r"data.sampler.options.difficulty: unknown difficulty score 'size'"):
        difficulty_scores(tokens, "size")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['epochs'\] for 'reference'; allowed: measure"):
        difficulty_scores(tokens, "reference", epochs=3)
    with pytest.raises(ValueError, match=r"measure: got 'entropy'; allowed: loss, margin"):
        difficulty_scores(tokens, "reference", measure="entropy")
    with pytest.raises(ValueError, match=r"'rarity'.*needs a language-modelling split"):
        difficulty_scores(digits.train, "rarity")


def _sampler(name, split, **options):
    return build_sampler(name, split, batch_size=8, seed=3, device=torch.device("cpu"), **options)


def test_paced_batches_come_from_the_allowed_prefix(tokens):
    sampler = _sampler("curriculum", tokens, difficulty="rarity", pacing="linear",
                       start_fraction=0.25, full_at=40)
    order = difficulty_order(tokens, "rarity")
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    rows_of = {tuple(x.tolist()): i for i, x in enumerate(tokens.x)}
    for step in (0, 10, 20, 39, 40, 100):
        x, _ = sampler.batch(step)
        rows = torch.tensor([rows_of[tuple(r.tolist())] for r in x])
        allowed = sampler.available(step)
        assert allowed == min(80, max(8, math.ceil(80 * sampler.pacing(step))))
        assert int(position[rows].max()) < allowed
        assert len(set(rows.tolist())) == 8, "no repeats within a batch"
    assert sampler.available(0) == 20 and sampler.available(40) == 80


def test_anti_curriculum_and_random_control_orders(tokens):
    easy = _sampler("curriculum", tokens, difficulty="rarity", pacing="step", full_at=100)
    hard = _sampler("anti-curriculum", tokens, difficulty="rarity", pacing="step", full_at=100)
    control = _sampler("random-curriculum", tokens, pacing="step", full_at=100)
    torch.testing.assert_close(hard.order, difficulty_order(tokens, "rarity", hardest_first=True))
    scores = difficulty_scores(tokens, "rarity")
    assert scores[easy.order[:20]].mean() < scores[control.order[:20]].mean() < scores[hard.order[:20]].mean()
    assert [control.available(t) for t in (0, 30, 99)] == [easy.available(t) for t in (0, 30, 99)]
    assert sorted(control.order.tolist()) == list(range(80))


@pytest.mark.parametrize(("name", "options"), [
    ("curriculum", {"difficulty": "rarity", "full_at": 20}),
    ("random-curriculum", {"full_at": 20}),
    ("fixed-order", {}),
    ("difficulty-order", {"difficulty": "rarity"}),
])
def test_batches_are_a_pure_function_of_seed_and_step(tokens, name, options):
    first = _sampler(name, tokens, **options)
    later = [first.batch(step) for step in (17, 3, 25)]
    fresh = _sampler(name, tokens, **options)
    for step, (x, y) in zip((17, 3, 25), later, strict=True):
        x2, y2 = fresh.batch(step)
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_fixed_order_repeats_each_epoch_and_shuffle_does_not(tokens):
    fixed, shuffle = _sampler("fixed-order", tokens), _sampler("shuffle", tokens)
    epoch = fixed.steps_per_epoch
    assert torch.equal(fixed.batch(1)[0], fixed.batch(1 + epoch)[0])
    assert torch.equal(fixed.batch(1)[0], shuffle.batch(1)[0]), "shuffle's first epoch, kept"
    assert not torch.equal(shuffle.batch(1)[0], shuffle.batch(1 + epoch)[0])
    seen = torch.cat([fixed.batch(s)[0] for s in range(epoch)])
    assert len({tuple(r.tolist()) for r in seen}) == epoch * 8, "one epoch visits each row once"


def test_difficulty_order_walks_easiest_to_hardest(tokens):
    sampler = _sampler("difficulty-order", tokens, difficulty="rarity")
    scores = difficulty_scores(tokens, "rarity")
    rows_of = {tuple(x.tolist()): i for i, x in enumerate(tokens.x)}
    batch_means = [scores[[rows_of[tuple(r.tolist())] for r in sampler.batch(s)[0]]].mean()
                   for s in range(sampler.steps_per_epoch)]
    assert batch_means == sorted(batch_means) and batch_means[0] < batch_means[-1]
    hardest = _sampler("difficulty-order", tokens, difficulty="rarity", hardest_first=True)
    torch.testing.assert_close(scores[hardest.order], scores[sampler.order].flip(0))


@pytest.mark.parametrize(("name", "options", "message"), [
    ("curriculum", {"order": "hard-first"}, r"unknown option\(s\) \['order'\] for 'curriculum'"),
    ("random-curriculum", {"difficulty": "rarity"}, r"unknown option\(s\) \['difficulty'\]"),
    ("curriculum", {"difficulty": "rarity", "pacing_options": [2]}, r"pacing_options: got \[2\]; allowed: a mapping"),
    ("difficulty-order", {"difficulty": "rarity", "hardest_first": "yes"}, r"hardest_first: got 'yes'"),
])
def test_bad_sampler_options_name_the_field(tokens, name, options, message):
    with pytest.raises(ValueError, match=message):
        _sampler(name, tokens, **options)
    with pytest.raises(ValueError, match=r"data.batch_size: got 81"):
        PacedSampler(tokens, batch_size=81, seed=0, device=torch.device("cpu"))


def test_a_curriculum_run_trains_and_resumes_exactly(tiny_config, digits, tmp_path):
    from ribbed.runs import create_run

    sampler = {"name": "curriculum", "options": {"pacing": "root", "full_at": 20,
                                                 "difficulty_options": {"steps": 20}}}
    config = tiny_config(data={"sampler": sampler}, train={"steps": 30, "eval_every": 10, "checkpoint_every": 10})
    straight = train(build_run(config, digits))
    assert straight.final["val_acc"] > 0.6
    record = create_run(tmp_path, name="c", config=config.model_dump(mode="json"))
    with pytest.raises(KeyboardInterrupt):
        train(build_run(config, digits), record=record, callbacks=[StopAfter(20)])
    resumed = train(build_run(config, digits), record=record, resume=True)
    assert resumed.final == straight.final
    assert [row["val_loss"] for row in resumed.history] == [row["val_loss"] for row in straight.history]
