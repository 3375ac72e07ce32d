"""PyTorch Lightning, for every optimiser of the integration table.

Each optimiser is returned from ``configure_optimizers`` as the README shows; ``Trainer.fit``
trains, and a run resumed from a checkpoint with ``fit(ckpt_path=...)`` (model, optimiser, loop
state through Lightning's own checkpoint) ends on exactly the weights of the uninterrupted run.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.integration_table import assert_same_parameters, table
from tests.ribbed_helpers import mlp

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]


class Classifier(L.LightningModule):
    """The tests' MLP, trained with the case's optimiser from ``configure_optimizers``."""

    def __init__(self, case, seed: int):
        super().__init__()
        self.case, self.model = case, mlp(seed)

    def training_step(self, batch, batch_index):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return self.case.build(self.model)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 8, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=False)  # 2 steps per epoch


def _fit(module: Classifier, epochs: int, root, ckpt_path=None) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer


@table
def test_fit_and_resume_from_a_checkpoint_is_exact(case, tmp_path):
    whole = Classifier(case, 0)
    _fit(whole, 4, tmp_path)

    first = Classifier(case, 0)
    trainer = _fit(first, 2, tmp_path)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    moved = [p.detach().clone() for p in first.model.parameters()]

    resumed = Classifier(case, 7)
    _fit(resumed, 4, tmp_path, ckpt_path=tmp_path / "half.ckpt")
    assert_same_parameters(whole.model, resumed.model)
    assert any(not torch.equal(a, b) for a, b in zip(moved, resumed.model.parameters(), strict=True))
    assert type(resumed.trainer.optimizers[0]) is type(case.build(mlp(0)))
