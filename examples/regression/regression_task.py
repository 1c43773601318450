"""The user's task: predict a value from 8 tabular features with a small Transformer encoder.

Each feature becomes a token (its value through a ``Linear``, plus an ``Embedding`` of which
feature it is); one ``nn.TransformerEncoderLayer`` mixes them, a ``LayerNorm`` and a mean
pool follow, and a ``Linear`` head gives the value. The data are synthetic rows drawn from a
seed, so every client (and the server) makes its own without a download.
"""

import torch
from torch import nn

from fedsms.data import ArrayData, DatasetSplits, make_splits

FEATURES = 8


class FeatureTransformer(nn.Module):
    """Tabular rows (N, FEATURES) to one value per row (N,)."""

    def __init__(self, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.value = nn.Linear(1, hidden)
        self.feature = nn.Embedding(FEATURES, hidden)
        self.encoder = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        tokens = self.value(rows.unsqueeze(-1)) + self.feature.weight  # (N, FEATURES, hidden)
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1)).squeeze(-1)


def make_rows(seed: int, n: int) -> ArrayData:
    """``n`` rows of standard normal features and their value (a smooth function plus noise)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=generator)
    y = 2 * torch.sin(x[:, 0]) + x[:, 1] * x[:, 2] + 0.5 * x[:, 3] ** 2 - x[:, 4] + 0.3 * x[:, 5]
    return ArrayData(x, y + 0.1 * torch.randn(n, generator=generator))


def client_rows(seed: int, partition: int, n: int) -> ArrayData:
    """Client ``partition``'s own training rows."""
    return make_rows(1000 * seed + partition + 1, n)


def client_test_rows(seed: int, partition: int, n: int) -> ArrayData:
    """Client ``partition``'s own test rows."""
    return make_rows(1000 * seed + 500 + partition, n)


def server_splits(seed: int, n: int, heldout_fraction: float) -> DatasetSplits:
    """The server's rows: a held-out split for the greedy soup, and a test split."""
    train, test = make_rows(10**6 + seed, n), make_rows(2 * 10**6 + seed, n)
    return make_splits("synthetic-rows", train, test, heldout_fraction=heldout_fraction, seed=seed)


def r2(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 − SSE / SST: 1 is perfect, 0 is predicting the mean."""
    return float(1 - (predicted - target).square().sum() / (target - target.mean()).square().sum())
