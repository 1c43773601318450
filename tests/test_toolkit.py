"""The client toolkit (fedsms_client.toolkit), the optimizer mask hook, and the built-in
trainer and evaluator on non-image data (token ids, tabular features)."""

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsms import FedSMSError, codec
from fedsms.data import ArrayData, Augmentation
from fedsms.evaluate import evaluate, evaluate_ood
from fedsms.masks import dense_mask, enforce_mask, mask_digest, outside_mask_nonzeros, prunable_names, prune_state
from fedsms.norms import recalibrate_norms
from fedsms.recipe import CandidateConfig
from fedsms.training import train_candidate
from fedsms_client import toolkit
from fedsms_flower.records import payload_of, record_of, wire_name

VOCAB, LENGTH, CLASSES = 12, 16, 3
MARKERS = (1, 2, 3)  # the class is which marker occurs most


class TokenNet(nn.Module):
    def __init__(self, classes: int = CLASSES, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.head = nn.Linear(dim, classes, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens)).transpose(1, 2)
        return self.head(torch.relu(self.conv(h)).mean(dim=2))


def token_data(n: int, seed: int, dtype=torch.int64) -> ArrayData:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(len(MARKERS) + 1, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    counts = torch.randint(0, 3, (n, CLASSES), generator=g)
    counts[torch.arange(n), labels] = 4  # the label's marker occurs most
    for i in range(n):
        positions = torch.randperm(LENGTH, generator=g)
        start = 0
        for c in range(CLASSES):
            k = int(counts[i, c])
            tokens[i, positions[start : start + k]] = MARKERS[c]
            start += k
    return ArrayData(tokens.to(dtype), labels)


def pruned(model: nn.Module, sparsity: float = 0.6):
    state, mask = prune_state(model.state_dict(), dense_mask(model, prunable_names(model)), sparsity)
    model.load_state_dict(state)
    return mask


# ---- the optimizer hook ---------------------------------------------------------------

OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def _steps(model, optimizer, data, steps=5):
    loss_fn = nn.CrossEntropyLoss()
    for i in range(steps):
        x, y = data.images[i * 16 : (i + 1) * 16], data.labels[i * 16 : (i + 1) * 16]
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_pruned_weights_stay_exactly_zero_with_any_optimizer(name):
    torch.manual_seed(0)
    model = TokenNet()
    mask = pruned(model)
    optimizer = OPTIMIZERS[name](model.parameters())
    data = token_data(96, seed=1)
    hook = enforce_mask(optimizer, model, mask)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _steps(model, optimizer, data)
    assert outside_mask_nonzeros(model.state_dict(), mask) == {}
    assert not torch.equal(before["head.weight"], model.head.weight)  # it did train
    hook.remove()  # detached: the optimizer's momentum now moves pruned weights again
    _steps(model, optimizer, data)
    assert outside_mask_nonzeros(model.state_dict(), mask) != {}


def test_enforce_mask_zeroes_at_once_and_checks_the_mask():
    model = TokenNet()
    mask = {n: torch.rand(p.shape) < 0.5 for n, p in model.named_parameters() if n in prunable_names(model)}
    with enforce_mask(torch.optim.SGD(model.parameters(), lr=0.1), model, mask):
        assert outside_mask_nonzeros(model.state_dict(), mask) == {}
    with pytest.raises(FedSMSError, match="head.weight"):
        enforce_mask(
            torch.optim.SGD(model.parameters(), lr=0.1), model, {"head.weight": torch.ones(4, 4, dtype=torch.bool)}
        )


# ---- the toolkit round trip ------------------------------------------------------------

HYPERPARAMETERS = {  # as the server sends them: one spelling, Flower's
    **{
        wire_name(k): v
        for k, v in CandidateConfig(lr=0.01, weight_decay=0.05, epochs=1, batch_size=16, seed=7).to_dict().items()
    },
    "phase": 2,
    "server-round": 5,
    "candidate": 1,
    "num-candidates": 3,
    "last-round": False,
}


@pytest.fixture(autouse=True)
def server_task(monkeypatch):
    """Messages are made on the server, whose task identity Flower sets when it runs one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def soup_message(model: nn.Module, mask, message_type=MessageType.TRAIN, value_dtype="fp32") -> Message:
    """What the strategy sends: the soup (mask bits + values under the mask) and a config."""
    payload = codec.encode(model.state_dict(), mask, phase=2, round=5, kind="soup", value_dtype=value_dtype)
    config = HYPERPARAMETERS if message_type == MessageType.TRAIN else {"phase": 2, "server-round": 5, "ood": False}
    return Message(
        RecordDict({"soup": record_of(payload), "config": ConfigRecord(config)}),
        dst_node_id=1,
        message_type=message_type,
    )


def test_toolkit_round_trip_through_a_user_loop():
    torch.manual_seed(0)
    server_model = TokenNet()
    mask = pruned(server_model)
    soup = {k: v.clone() for k, v in server_model.state_dict().items()}
    message = soup_message(server_model, mask)

    torch.manual_seed(1)
    client_model = TokenNet()  # other initial weights: everything comes from the soup
    received = toolkit.receive(message, client_model)
    for name, value in client_model.state_dict().items():
        assert torch.equal(value, soup[name]), name
    assert {k: torch.equal(v, mask[k]) for k, v in received.mask.items()} == {k: True for k in mask}
    assert (received.phase, received.server_round, received.candidate) == (2, 5, 1)
    hp = received.hyperparameters
    assert hp == toolkit.hyperparameters(message) == HYPERPARAMETERS
    assert isinstance(hp, dict) and type(hp["lr"]) is float and type(hp["local-epochs"]) is int
    assert {"weight-decay", "batch-size", "local-epochs"} <= set(hp) and "weight_decay" not in dict(hp)
    # the spellings earlier fedsms versions sent still read the same values
    assert (hp["weight_decay"], hp.get("batch_size"), hp["epochs"]) == (0.05, 16, 1) and "label_smoothing" in hp

    optimizer = torch.optim.AdamW(client_model.parameters(), lr=hp["lr"], weight_decay=hp["weight-decay"])
    received.enforce(optimizer, client_model)
    _steps(client_model, optimizer, token_data(64, seed=2), steps=3)
    reply = received.reply(client_model, 64, {"train_loss": 0.5})

    # the server's side: the strategy's gate
    decoded = codec.decode(
        payload_of(reply.content["update"]),
        expected_mask=mask,
        expected_digest=mask_digest(mask),
        template=soup,
        expected_phase=2,
        expected_round=5,
        expected_kind="update",
    )
    assert not decoded.mask_included and decoded.num_examples == 64
    state = decoded.to_state_dict(soup)
    for name, value in client_model.state_dict().items():
        assert torch.equal(state[name], value), name
    assert not torch.equal(state["head.weight"], soup["head.weight"])
    assert outside_mask_nonzeros(state, mask) == {}
    assert dict(reply.content["metrics"]) == {"train_loss": 0.5, "num-examples": 64}
    assert reply.metadata.dst_node_id == message.metadata.src_node_id
    assert reply.metadata.message_type == MessageType.TRAIN


def test_reply_keeps_the_servers_value_dtype_and_evaluate_replies_carry_metrics_only():
    model = TokenNet()
    mask = pruned(model)
    received = toolkit.receive(soup_message(model, mask, value_dtype="bf16"), TokenNet())
    decoded = codec.decode(
        payload_of(received.reply(model, 3).content["update"]),
        expected_mask=mask,
        expected_digest=None,
        template=model.state_dict(),
    )
    assert decoded.value_dtype == "bf16"
    evaluated = toolkit.receive(soup_message(model, mask, MessageType.EVALUATE), TokenNet())
    reply = evaluated.reply(None, 10, {"accuracy": 0.75})
    assert list(reply.content.keys()) == ["metrics"]
    assert dict(reply.content["metrics"]) == {"accuracy": 0.75, "num-examples": 10}
    with pytest.raises(FedSMSError, match="positive int"):
        received.reply(model, 0)


def test_a_model_of_other_shapes_gets_one_sentence_naming_the_tensor_and_both_shapes():
    server_model = TokenNet(classes=4)
    message = soup_message(server_model, pruned(server_model))
    with pytest.raises(toolkit.ModelMismatch) as error:
        toolkit.receive(message, TokenNet(classes=3))
    text = str(error.value)
    assert "'head.weight'" in text and "(4, 16)" in text and "(3, 16)" in text
    assert text.count(". ") == 0 and "\n" not in text


# ---- the built-in trainer and evaluator on non-image data ------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_integer_token_arrays_train_and_evaluate(dtype):
    torch.manual_seed(0)
    model = TokenNet()
    mask = pruned(model, 0.5)
    train, test = token_data(600, seed=3, dtype=dtype), token_data(300, seed=4, dtype=dtype)
    config = CandidateConfig(lr=0.05, epochs=6, batch_size=32, seed=0, weight_decay=0.0)
    result = train_candidate(
        model, mask, train, config, augmentation=Augmentation()
    )  # an identity augmentation is fine
    assert outside_mask_nonzeros(model.state_dict(), mask) == {}
    metrics = evaluate(model, test)
    assert metrics["accuracy"] > 0.6 and result["train_accuracy"] > 0.6  # chance is 1/3
    assert set(metrics) == {"accuracy", "loss", "ece"}


def test_dataset_loader_and_callable_sources_with_a_custom_loss():
    torch.manual_seed(0)
    data = token_data(256, seed=5)
    dataset = TensorDataset(data.images, data.labels)
    loader = DataLoader(dataset, batch_size=32, shuffle=True)
    calls = []

    def batches():
        calls.append(1)
        return ((data.images[i : i + 64], data.labels[i : i + 64]) for i in range(0, len(data), 64))

    config = CandidateConfig(lr=0.05, epochs=2, batch_size=32, seed=0)
    for source in (dataset, loader, batches):
        model = TokenNet()
        mask = pruned(model, 0.5)
        seen = []
        result = train_candidate(
            model,
            mask,
            source,
            config,
            loss_fn=lambda out, y, seen=seen: seen.append(out.shape) or nn.functional.cross_entropy(out, y),
        )
        assert outside_mask_nonzeros(model.state_dict(), mask) == {}
        assert result["num_examples"] == 256 and seen
        metrics = evaluate(model, source, loss_fn=nn.functional.cross_entropy)
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["loss"] > 0
    assert len(calls) == 2 + 1 + 1  # counted once, then one call per epoch, one for evaluate
    # a regression target: only the loss is reported
    regression = TensorDataset(torch.randn(40, 5), torch.randn(40, 1))
    assert set(evaluate(nn.Linear(5, 1), regression, loss_fn=nn.functional.mse_loss)) == {"loss"}


def test_image_only_parts_refuse_non_image_data_in_one_sentence():
    tabular = ArrayData(torch.randn(50, 8), torch.randint(0, 3, (50,)))
    model = nn.Sequential(nn.Linear(8, 3))
    with pytest.raises(
        FedSMSError,
        match=r"OOD evaluation applies image corruptions and needs image inputs \(N, C, H, W\)"
        r", but the inputs have shape \(50, 8\)",
    ):
        evaluate_ood(model, tabular)
    loader = DataLoader(TensorDataset(tabular.images, tabular.labels), batch_size=10)
    with pytest.raises(FedSMSError, match=r"needs image inputs .* shape \(10, 8\)"):
        evaluate_ood(model, loader, corruptions=("contrast",), severities=(1,))
    mask = dense_mask(model, prunable_names(model))
    with pytest.raises(FedSMSError, match="augmentation moves pixels and needs image inputs"):
        train_candidate(
            model, mask, tabular, CandidateConfig(epochs=1, batch_size=10), augmentation=Augmentation(crop_padding=1)
        )
    # augment off (or no augmentation) trains tabular data as it is
    train_candidate(
        model,
        mask,
        tabular,
        CandidateConfig(epochs=1, batch_size=10, augment=False),
        augmentation=Augmentation(crop_padding=1),
    )


def test_norm_recalibration_on_a_dataset_and_a_loader():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    features = torch.randn(200, 4) * 3 + 1
    dataset = TensorDataset(features, torch.zeros(200, dtype=torch.long))
    assert recalibrate_norms(model, dataset, fraction=0.5) == 100
    assert recalibrate_norms(model, DataLoader(dataset, batch_size=50), fraction=1.0) == 200
    expected = model[0](features).detach()
    assert torch.allclose(model[1].running_mean, expected.mean(0), atol=1e-4)


def _replayed(app, messages) -> list:
    """``app`` on each message in turn (one process, as a warm worker), the replies' contents."""
    from flwr.app import Context

    out = []
    for message in messages:
        context = Context(run_id=1, node_id=1000, node_config={}, state=RecordDict(), run_config={})
        reply = app(message, context)
        assert not reply.has_error(), reply.error.reason
        if "update" in reply.content:
            out.append(payload_of(reply.content["update"]))
        else:
            out.append(sorted((k, v) for k, v in reply.content["metrics"].items()))
    return out


def test_pooled_models_reuse_is_exact_and_a_new_job_gets_its_own_model(tmp_path, server_task, one_thread):
    """The built-in ClientApp keeps its model between messages of a process (``ModelPool``):
    replies equal those of a model built afresh per message, also after the pooled model
    was trained, evaluated and recalibrated; a job with another model never gets it."""
    from helpers import RecordingGrid, make_strategy, partitions

    import fedsms_client.app as client_app
    from fedsms.models import build_for

    client_app._MODELS.idle.clear()
    pooled = client_app.make_client_app()
    fresh = client_app.make_client_app(model_fn=lambda run, splits: build_for(run.model, splits))
    sent = {}
    for model in ("cnn", "mlp"):  # cnn: BatchNorm buffers; then a new job of another model
        grid = RecordingGrid(pooled, partitions(4))
        strategy = make_strategy(
            tmp_path / model,
            model=model,
            server_data=False,  # norm statistics by the clients
            run={"candidates": 2, "phases": 1, "batch_size": 128},
            mode="data",  # a quarter of the data per client
            clients_per_round=2,
            min_available_clients=4,
            fraction_evaluate=0.5,
        )
        strategy.start(grid)
        assert all(r["accepted"] == 2 for r in map(vars, strategy.rounds)), model
        kinds = {m.metadata.message_type for m in grid.sent}
        queries = {"query.identity", "query.norm_stats"} if model == "cnn" else {"query.identity"}
        assert kinds == {"train", "evaluate"} | queries
        sent[model] = [m for m in grid.sent if m.metadata.message_type not in queries]
    assert len(client_app._MODELS.idle) == 2  # a used model of each job
    for model, messages in sent.items():
        assert _replayed(pooled, messages) == _replayed(fresh, messages), model
