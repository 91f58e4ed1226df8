"""The training loop every stage shares: epochs, validation, keep the best state."""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm


def fit(modules: list[nn.Module], epochs: int, train_epoch: Callable[[int], None], validate: Callable[[], float],
        desc: str) -> tuple[float, int]:
    """Train for `epochs`, keep the state with the best validation score; returns (score, epoch)."""
    best, best_epoch, best_state = -np.inf, 0, None
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", file=sys.stderr, leave=False):
        for module in modules:
            module.train()
        train_epoch(epoch)
        for module in modules:
            module.eval()
        with torch.no_grad():
            value = validate()
        if value > best:
            best, best_epoch = value, epoch + 1
            best_state = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    for module, state in zip(modules, best_state):
        module.load_state_dict(state)
        module.eval()
    return best, best_epoch
