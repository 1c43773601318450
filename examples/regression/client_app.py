"""The user's ClientApp: own model, own rows, own loss, AdamW with a cosine schedule and
gradient clipping, R² as its metric. fedsms appears only through its client toolkit."""

import torch
import torch.nn.functional as F
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from regression_task import FeatureTransformer, client_rows, client_test_rows, r2
from torch.utils.data import DataLoader, TensorDataset

from fedsms_client import toolkit

torch.set_num_threads(1)  # several simulated clients share the machine's cores
app = ClientApp()
app.query("identity")(toolkit.identity)  # the server then draws the same clients in every run


def my_model(context: Context) -> FeatureTransformer:
    cfg = context.run_config  # this app's own keys, beside fedsms's
    return FeatureTransformer(int(cfg["hidden"]), int(cfg["heads"]))


@app.train()
def train(message: Message, context: Context) -> Message:
    model = my_model(context)
    soup = toolkit.receive(message, model)
    hp = soup.hyperparameters  # lr, weight-decay, local-epochs, batch-size, seed, ...
    torch.manual_seed(hp["seed"])
    rows = client_rows(
        int(context.run_config["seed"]),
        int(context.node_config["partition-id"]),
        int(context.run_config["rows-per-client"]),
    )
    loader = DataLoader(TensorDataset(rows.images, rows.labels), batch_size=hp["batch-size"], shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight-decay"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp["local-epochs"] * len(loader))
    soup.enforce(optimizer, model)  # pruned weights stay exactly zero after every step
    model.train()
    for _ in range(hp["local-epochs"]):
        loss_sum = 0.0
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(y)
    return soup.reply(model, len(rows), {"train_loss": loss_sum / len(rows)})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    model = my_model(context).eval()
    soup = toolkit.receive(message, model)
    rows = client_test_rows(int(context.run_config["seed"]), int(context.node_config["partition-id"]), 200)
    with torch.no_grad():
        predicted = model(rows.images)
    return soup.reply(
        model, len(rows), {"r2": r2(predicted, rows.labels), "mse": F.mse_loss(predicted, rows.labels).item()}
    )
