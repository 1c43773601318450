"""``client_app.py`` through fedsms's client toolkit: three lines differ (``receive``,
``enforce``, ``reply``). The soup then travels compact both ways and the pruned weights stay
exactly zero during local training."""

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from task import Net, load_data, test, train

from fedsms_client import toolkit

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    model = Net()
    soup = toolkit.receive(msg, model)
    trainloader, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    optimizer = torch.optim.SGD(model.parameters(), lr=soup.hyperparameters["lr"], momentum=0.9)
    soup.enforce(optimizer, model)
    loss = train(model, trainloader, context.run_config["local-epochs"], optimizer)
    return soup.reply(model, len(trainloader.dataset), {"train_loss": loss})


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    model = Net()
    soup = toolkit.receive(msg, model)
    _, testloader = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss, accuracy = test(model, testloader)
    return soup.reply(model, len(testloader.dataset), {"loss": loss, "accuracy": accuracy})
