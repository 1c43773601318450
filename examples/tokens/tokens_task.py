"""The user's model and data: token sequences whose class is the marker token that occurs most.

Nothing here knows about fedsms or Flower; both apps import it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

VOCAB = 24  # token ids 0..23; ids 1..NUM_CLASSES are the markers
LENGTH = 24
NUM_CLASSES = 4


class TokenNet(nn.Module):
    """Embedding -> LayerNorm -> Conv1d -> mean over positions -> bias-free linear head."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size=3, padding=1)
        self.head = nn.Linear(hidden, NUM_CLASSES, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (N, LENGTH) int64 -> (N, NUM_CLASSES)
        h = self.norm(self.embed(tokens)).transpose(1, 2)
        return self.head(torch.relu(self.conv(h)).mean(dim=2))


def make_tokens(n: int, seed: int) -> TensorDataset:
    """``n`` seeded sequences of filler tokens with 0-3 copies of each marker, the label's
    marker planted 4-6 times so that it occurs most."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(NUM_CLASSES + 1, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    counts = torch.randint(0, 4, (n, NUM_CLASSES), generator=g)
    counts[torch.arange(n), labels] = torch.randint(4, 7, (n,), generator=g)
    for i in range(n):
        positions = torch.randperm(LENGTH, generator=g)
        start = 0
        for c in range(NUM_CLASSES):
            k = int(counts[i, c])
            tokens[i, positions[start : start + k]] = c + 1
            start += k
    return TensorDataset(tokens, labels)


def client_data(seed: int, partition_id: int, n: int) -> TensorDataset:
    """One client's own training data."""
    return make_tokens(n, seed=1000 * seed + partition_id)


def test_data(seed: int, n: int) -> TensorDataset:
    """Held-back test data no client trains on."""
    return make_tokens(n, seed=1000 * seed + 999)
