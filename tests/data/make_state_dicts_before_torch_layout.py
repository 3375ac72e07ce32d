"""Writes ``state_dicts_before_torch_layout.pt`` with the code of commit 891b043, the last one
whose RIBBED and K-FAC saved ``{"base": ..., ...}`` instead of torch's state-dict layout:

    git archive 891b043 src tests/ribbed_helpers.py tests/__init__.py | tar -x -C /tmp/old
    cd /tmp/old && PYTHONPATH=/tmp/old/src:/tmp/old python /path/to/this/file OUT.pt

Per case (the ids and options of ``tests/integration_table.py``): the model and a copy of the
optimiser's state dict after 4 steps of ``random_batches(8)``, and the model after the other 4.
"""

import copy
import sys

import torch
from tests.ribbed_helpers import mlp, random_batches, train_steps

import ribbed
from ribbed.extensions import load_extensions
from ribbed.optim import build_optimizer

CASES = {
    "ribbed": ("ribbed", 1e-2, {"feature_every": 2, "routing_every": 4}),
    "ribbed-sgd": ("ribbed", 5e-2, {"feature_every": 2, "routing_every": 4, "base": "sgd",
                                    "base_options": {"momentum": 0.9}}),
    "kfac": ("kfac", 5e-2, {"base_options": {"momentum": 0.9}, "inverse_every": 2}),
}

if __name__ == "__main__":
    print("ribbed from", ribbed.__file__)
    load_extensions()
    saved = {}
    batches = random_batches(8)
    for key, (name, lr, options) in CASES.items():
        model = mlp(0)
        optimizer = build_optimizer(name, model, lr=lr, **options)
        train_steps(model, optimizer, batches[:4])
        saved[key] = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
        train_steps(model, optimizer, batches[4:])
        saved[key]["final"] = copy.deepcopy(model.state_dict())
    torch.save(saved, sys.argv[1])
