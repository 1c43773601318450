"""Norm recalibration does what it claims: after averaging candidates whose BatchNorm
statistics differ, the soup's running mean and variance are the ones measured here, directly,
on the recalibration data, not the averaged ones; the same for the federated pooling of the
clients' statistics (against one pass over the union of their data), for its fallback when
no client returns statistics, and for ``fedsms soup --recalibrate``."""

from dataclasses import replace

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from helpers import RecordingGrid, digits, make_strategy, payloads, train_replies

from fedsms import codec
from fedsms.checkpoint import load_checkpoint, save_checkpoint
from fedsms.cli import main
from fedsms.data import ArrayData
from fedsms.engine import SoupEngine, data_hooks, values_under_mask
from fedsms.masks import compute_mask, dense_mask, prunable_names
from fedsms.models import build_for
from fedsms.norms import norm_layers, norm_stat_names, recalibrate_norms
from fedsms_client.app import make_client_app

pytestmark = pytest.mark.usefixtures("one_thread")


def bn_names(model) -> list[str]:
    return sorted({n.rpartition(".")[0] for n in norm_stat_names(model)})


@torch.no_grad()
def measured_statistics(model, state, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean and unbiased variance of what each BatchNorm layer receives when
    ``state``'s weights see ``inputs`` in one training-mode batch, measured by hooks."""
    model.load_state_dict(state)
    seen = {}
    names = {id(m): n for n, m in model.named_modules()}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args: seen.__setitem__(names[id(m)], args[0].detach().clone()))
        for layer in norm_layers(model)
    ]
    model.train()
    model(inputs)
    for hook in hooks:
        hook.remove()
    out = {}
    for name, x in seen.items():
        channels = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        out[f"{name}.running_mean"] = channels.mean(1).float()
        out[f"{name}.running_var"] = channels.var(1, unbiased=True).float()
    return out


def two_candidates(model):
    """Two pruned cnn states whose weights and BatchNorm statistics differ, with their mask."""
    torch.manual_seed(0)
    a = {k: v.clone() for k, v in build_for("cnn", digits()).state_dict().items()}
    mask = compute_mask(a, dense_mask(model, prunable_names(model)), 0.5)
    generator = torch.Generator().manual_seed(1)
    b = {
        k: (v + 0.05 * torch.randn(v.shape, generator=generator)) if v.is_floating_point() else v for k, v in a.items()
    }
    for name in norm_stat_names(model):
        if name.endswith("running_mean"):
            a[name], b[name] = torch.full_like(a[name], 2.0), torch.full_like(b[name], -1.0)
        elif name.endswith("running_var"):
            a[name], b[name] = torch.full_like(a[name], 5.0), torch.full_like(b[name], 0.5)
        else:  # as after training: re-estimating must not blend in what came before
            a[name], b[name] = torch.tensor(40), torch.tensor(60)
    a = {k: v * mask[k] if k in mask else v for k, v in a.items()}
    b = {k: v * mask[k] if k in mask else v for k, v in b.items()}
    return a, b, mask


def averaged(states):
    return {
        k: torch.stack([s[k].double() for s in states]).mean(0).float()
        if states[0][k].is_floating_point()
        else states[0][k]
        for k in states[0]
    }


def assert_statistics(state, expected, names, rtol=1e-4, atol=1e-5):
    for name in names:
        for stat in ("running_mean", "running_var"):
            key = f"{name}.{stat}"
            torch.testing.assert_close(state[key], expected[key], rtol=rtol, atol=atol, msg=key)


def test_a_recalibrated_soup_has_the_statistics_of_its_recalibration_data():
    model = build_for("cnn", digits())
    a, b, mask = two_candidates(model)
    splits = replace(digits(), train=digits().train.head(200))  # one recalibration batch: exact moments
    engine = SoupEngine(a, mask, hooks=data_hooks(model, splits, fraction=1.0, seed=0))
    merge = engine.merge("uniform")
    for state in (a, b):
        merge.add(values_under_mask(state, mask), 100)
    engine.end_round(merge)
    engine.end_phase(1, merge)

    mean = averaged([a, b])
    expected = measured_statistics(build_for("cnn", digits()), mean, splits.train.inputs())
    assert_statistics(engine.state, expected, bn_names(model))
    for key in expected:  # and they are not the averaged statistics
        assert not torch.allclose(engine.state[key], mean[key], rtol=0.05), key
    for name in model.state_dict():  # the weights stay the average
        if name not in expected and mean[name].is_floating_point():
            torch.testing.assert_close(engine.state[name], mean[name], msg=name)


def test_recalibration_re_estimates_from_scratch_whatever_the_statistics_were():
    model = build_for("cnn", digits())
    a, _, _ = two_candidates(model)
    data = digits().train.head(200)
    results = []
    for start in (a, {k: v * 3 if "running" in k else v for k, v in a.items()}):
        model.load_state_dict(start)
        model.eval()
        assert recalibrate_norms(model, data, fraction=1.0) == 200 and not model.training
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert_statistics(results[0], measured_statistics(build_for("cnn", digits()), a, data.inputs()), bn_names(model))


# ---- federated: clients estimate, the server pools ----------------------------------------


def two_clients_data():
    """Client "low" holds digits 0-4, client "high" 5-9 (so their input means differ), of unequal size."""
    train = digits().train
    low = torch.nonzero(train.labels < 5).flatten()[:120]
    high = torch.nonzero(train.labels >= 5).flatten()[:90]
    return {"low": train.subset(low), "high": train.subset(high)}


def federated_job(tmp_path, client_app, log=None):
    shards = two_clients_data()

    def data_fn(run, data_dir):
        return replace(digits(), train=shards[data_dir])

    strategy = make_strategy(
        tmp_path,
        model="cnn",
        log=log,
        run=dict(phases=1, recalibration_fraction=1.0),
        mode="data",
        recalibration="federated",
        pretrain_rounds=0,
    )
    nodes = [{"partition-id": 0, "num-partitions": 1, "data-dir": name} for name in shards]
    grid = RecordingGrid(client_app(data_fn), nodes)
    strategy.start(grid, num_rounds=1)  # round 1 ends phase 1: train, then recalibrate
    union = ArrayData(torch.cat([s.images for s in shards.values()]), torch.cat([s.labels for s in shards.values()]))
    replies = [
        codec.decode(p, expected_mask=strategy.mask, expected_digest=None, template=strategy.soup).to_state_dict(
            strategy.soup
        )
        for p in payloads(train_replies(grid, 1))
    ]
    return strategy, union, replies


def test_federated_recalibration_pools_to_the_statistics_of_the_union_of_the_clients_data(tmp_path):
    lines = []
    strategy, union, replies = federated_job(tmp_path, lambda data_fn: make_client_app(data_fn=data_fn), lines.append)
    assert len(replies) == 2 and any("recalibrated by 2 clients" in line for line in lines)
    model = build_for("cnn", digits())
    direct = measured_statistics(model, strategy.soup, union.inputs())
    # The first layer sees the inputs through a convolution only: the pooled moments are exact.
    # Deeper layers see inputs normalised with each client's own batch statistics: close only.
    first, *deeper = [n for n in (name for name, _ in model.named_modules()) if n in bn_names(model)]
    assert_statistics(strategy.soup, direct, [first])
    assert_statistics(strategy.soup, direct, deeper, rtol=0.15, atol=0.05)
    mean = averaged(replies)
    for stat in ("running_mean", "running_var"):
        assert not torch.allclose(strategy.soup[f"{first}.{stat}"], mean[f"{first}.{stat}"], rtol=0.05)


def test_without_client_statistics_the_averaged_statistics_are_kept(tmp_path):
    def without_statistics(data_fn) -> ClientApp:
        fedsms_app, app = make_client_app(data_fn=data_fn), ClientApp()

        @app.train()
        def train(message: Message, context: Context) -> Message:
            return fedsms_app(message, context)

        @app.query("norm_stats")
        def refuse(message: Message, context: Context) -> Message:
            raise RuntimeError("no data left for statistics")

        return app

    lines = []
    strategy, _, replies = federated_job(tmp_path, without_statistics, lines.append)
    assert any("no client returned norm statistics; keeping the averaged statistics" in line for line in lines)
    assert any("no data left for statistics" in line for line in lines)
    mean = averaged(replies)
    for name in norm_stat_names(strategy.model):
        if "running" in name:
            torch.testing.assert_close(strategy.soup[name], mean[name], msg=name)


# ---- fedsms soup --recalibrate ------------------------------------------------------------


def test_soup_command_recalibrates_on_the_data_its_checkpoints_name(tmp_path, capsys):
    model = build_for("cnn", digits())
    a, b, mask = two_candidates(model)
    metadata = {"model": "cnn", "dataset": "digits", "phase": 1}
    save_checkpoint(tmp_path / "a", a, mask, metadata)
    save_checkpoint(tmp_path / "b", b, mask, metadata)
    for flags in ([], ["--recalibrate"]):
        assert (
            main(["soup", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / f"soup{len(flags)}"), *flags])
            == 0
        )
    plain, recalibrated = (load_checkpoint(tmp_path / f"soup{i}").state for i in (0, 1))
    mean = averaged([a, b])
    stats = [n for n in norm_stat_names(model) if "running" in n]
    for name in stats:
        torch.testing.assert_close(plain[name], mean[name], msg=name)  # no flag: the averaged statistics
    model.load_state_dict(mean)
    # the documented subset: 20 % of the checkpoints' training data, seeded with the phase
    recalibrate_norms(model, digits().train, fraction=0.2, seed=1)
    for name in stats:
        torch.testing.assert_close(recalibrated[name], model.state_dict()[name], msg=name)
        assert not torch.allclose(recalibrated[name], mean[name], rtol=0.05), name
    for name in mask:
        assert torch.equal(recalibrated[name], plain[name])
