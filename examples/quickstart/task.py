"""The user's model, data and training loop, as in Flower's PyTorch quickstart: nothing here
knows fedsms. The data is synthetic (ten Gaussian classes in 20 dimensions), split by
partition id."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _samples(count: int, seed: int) -> TensorDataset:
    centers = torch.randn(10, 20, generator=torch.Generator().manual_seed(0)) * 0.7
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return TensorDataset(centers[labels] + torch.randn(count, 20, generator=generator), labels)


def load_data(partition_id: int, num_partitions: int) -> tuple[DataLoader, DataLoader]:
    """This partition's training data and the shared test data."""
    train = _samples(2000 // num_partitions, seed=1 + partition_id)
    return DataLoader(train, batch_size=32, shuffle=True), DataLoader(_samples(1000, seed=10_000), batch_size=256)


def train(model: nn.Module, loader: DataLoader, epochs: int, optimizer: torch.optim.Optimizer) -> float:
    loss_fn, total = nn.CrossEntropyLoss(), 0.0
    model.train()
    for _ in range(epochs):
        total = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
    return total / len(loader.dataset)


def test(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    loss_fn, loss, correct = nn.CrossEntropyLoss(reduction="sum"), 0.0, 0
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            loss += loss_fn(logits, y).item()
            correct += int((logits.argmax(1) == y).sum())
    return loss / len(loader.dataset), correct / len(loader.dataset)
