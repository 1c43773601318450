"""The user's ClientApp: own model, own DataLoader, own AdamW loop and loss.

fedsms appears only through its client toolkit: ``receive`` (soup and mask into the
model), ``enforce`` (pruned weights stay zero through AdamW), ``hyperparameters`` (what the
server chose for this client's candidate) and ``reply``.
"""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from tokens_task import TokenNet, client_data, test_data
from torch import nn
from torch.utils.data import DataLoader

from fedsms_client import toolkit

torch.set_num_threads(1)  # several simulated clients share the machine's cores
app = ClientApp()
app.query("identity")(toolkit.identity)  # the server then draws the same clients in every run


@app.train()
def train(message: Message, context: Context) -> Message:
    cfg = context.run_config
    model = TokenNet(int(cfg["hidden"]))
    soup = toolkit.receive(message, model)
    hp = soup.hyperparameters  # lr, weight-decay, label-smoothing, local-epochs, batch-size, seed, ...
    torch.manual_seed(hp["seed"])
    data = client_data(int(cfg["seed"]), int(context.node_config["partition-id"]), int(cfg["examples-per-client"]))
    loader = DataLoader(data, batch_size=hp["batch-size"], shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight-decay"])
    soup.enforce(optimizer, model)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=hp["label-smoothing"])
    model.train()
    total, correct, loss_sum = 0, 0, 0.0
    for _ in range(hp["local-epochs"]):
        total, correct, loss_sum = 0, 0, 0.0
        for tokens, labels in loader:
            optimizer.zero_grad()
            logits = model(tokens)
            loss = loss_fn(logits, labels)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            loss_sum += loss.item() * len(labels)
    return soup.reply(model, len(data), {"train_loss": loss_sum / total, "train_accuracy": correct / total})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    cfg = context.run_config
    model = TokenNet(int(cfg["hidden"])).eval()
    soup = toolkit.receive(message, model)
    data = test_data(int(cfg["seed"]), int(cfg["test-examples"]))
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(data, batch_size=256))
    return soup.reply(model, len(data), {"accuracy": correct / len(data)})
