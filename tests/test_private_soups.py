"""Differentially private data soups (``fedsms_server.privacy``): clipping and Gaussian noise
under the mask, ε from Flower's accountant, the ε budget, and what dp refuses."""

import json

import pytest
import torch
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from helpers import LocalGrid, RecordingGrid, digits, partitions, train_replies

from fedsms import FedSMSError
from fedsms.checkpoint import load_checkpoint
from fedsms.codec import decode
from fedsms.config import FederationConfig, RunConfig
from fedsms.masks import kept_count
from fedsms.merge import Merge, state_from_values, values_under_mask
from fedsms.models import build_for
from fedsms_client import toolkit
from fedsms_client.app import make_client_app
from fedsms_flower.privacy import clip_update, private_names
from fedsms_flower.records import payload_of
from fedsms_server.privacy import PrivateMerge, check_job
from fedsms_server.strategy import SparseSoupStrategy

RUN = dict(
    model="mlp",
    phases=2,
    target_sparsity=0.8,
    pretrain_epochs=2,
    retrain_epochs=1,
    candidates=3,
    ood=False,
    diagnostics=False,
    device="cpu",
)
DP = dict(mode="data", clients_per_round=3, dp="server-fixed", dp_noise_multiplier=1.0, dp_clipping_norm=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def private_strategy(out_dir, **federation) -> SparseSoupStrategy:
    fed = FederationConfig(
        **{"min_train_clients": 2, "min_available_clients": 2, "fraction_evaluate": 0.0, **DP, **federation}
    )
    torch.manual_seed(0)
    run = RunConfig(**RUN, out_dir=str(out_dir))
    return SparseSoupStrategy(run, fed, build_for("mlp", digits()), server_data=digits(), out_dir=out_dir)


def rounds_of(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "rounds.jsonl").read_text().splitlines()]


def flower_epsilons(rounds: int, noise_multiplier: float, sample: int, population: int, replace_one=True) -> list:
    """ε at δ = 1e-5 after each of ``rounds`` releases, from Flower's own accountant."""
    method, relation = (
        (SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE)
        if replace_one
        else (SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE)
    )
    accountant = RdpAccountant(PrivacyConfig(1e-5, population, relation, method))
    out = []
    for _ in range(rounds):
        accountant.compose(GaussianPrivacyEvent(noise_multiplier, sample, population))
        out.append(accountant.get_epsilon(1e-5))
    return out


@pytest.fixture(scope="module")
def private_job(tmp_path_factory):
    """A private data soup of 3 rounds, 3 of 6 clients per round, noise multiplier 2."""
    out = tmp_path_factory.mktemp("private")
    strategy = private_strategy(out, dp_noise_multiplier=2.0)
    strategy.start(LocalGrid(make_client_app(), partitions(6)))
    return strategy, out


def test_noise_lands_only_under_the_mask_and_the_soup_stays_exactly_sparse(private_job):
    strategy, out = private_job
    soup, mask = strategy.soup, strategy.mask
    outside = sum(int(torch.count_nonzero(soup[name][~keep])) for name, keep in mask.items())
    assert outside == 0
    total = sum(keep.numel() for keep in mask.values())
    kept = sum(int(torch.count_nonzero(soup[name])) for name in mask)
    assert kept == kept_count(total, 0.8)  # every entry under the mask is noisy, hence nonzero
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["sparsity"] == pytest.approx(1 - kept / total)


def test_masked_fedavg_on_the_gmp_schedule_stays_exactly_sparse_under_dp(tmp_path):
    strategy = private_strategy(tmp_path, pruning_schedule="gmp", clients_per_round=2)
    strategy.start(LocalGrid(make_client_app(), partitions(3)))
    total = sum(keep.numel() for keep in strategy.mask.values())
    assert sum(int(torch.count_nonzero(strategy.soup[name])) for name in strategy.mask) == kept_count(total, 0.8)
    assert [r["privacy"]["releases"] for r in rounds_of(tmp_path)] == list(range(1, len(strategy.schedule) + 1))


def test_a_merge_adds_noise_to_every_value_under_the_mask_and_nothing_else():
    torch.manual_seed(0)
    soup = {"w": torch.randn(6, 5), "b": torch.zeros(5), "bn.running_mean": torch.zeros(5)}
    mask = {"w": torch.rand(6, 5) > 0.7}
    soup["w"] *= mask["w"]
    reference = values_under_mask(soup, mask)
    candidates = [{k: v + 0.01 * torch.randn_like(v) for k, v in reference.items()} for _ in range(3)]
    noiseless = PrivateMerge(Merge("uniform", False), reference, 1.0, 0.0, 3)
    noisy = PrivateMerge(Merge("uniform", False), reference, 1.0, 0.5, 3)
    for candidate in candidates:
        noiseless.add(candidate, 10)
        noisy.add(candidate, 10)
    quiet, loud = noiseless.result(), noisy.result()
    assert bool((quiet["w"] != loud["w"]).all()) and bool((quiet["b"] != loud["b"]).all())
    assert torch.equal(loud["bn.running_mean"], soup["bn.running_mean"])  # never a client's statistics
    full = state_from_values(loud, mask, soup)
    assert int(torch.count_nonzero(full["w"][~mask["w"]])) == 0


def test_the_server_clips_whatever_a_client_sends():
    reference = {"w": torch.zeros(50), "b": torch.zeros(5)}
    merge = PrivateMerge(Merge("uniform", False), reference, 0.1, 0.0, 1)
    merge.add({"w": torch.full((50,), 100.0), "b": torch.full((5,), -100.0)}, 1)
    merged = merge.result()
    assert float(torch.cat([merged["w"], merged["b"]]).norm()) == pytest.approx(0.1, rel=1e-6)
    assert merge.clipped == 1


@pytest.mark.parametrize("scale", [1e-3, 0.5, 3.0, 1e4])
def test_the_clipped_update_never_exceeds_the_bound(scale):
    torch.manual_seed(1)
    reference = {"w": torch.randn(40), "b": torch.randn(8), "bn.running_var": torch.ones(8)}
    values = {k: v + scale * torch.randn_like(v) for k, v in reference.items()}
    clipped, scaled = clip_update(values, reference, 1.0)
    assert set(clipped) == set(private_names(reference)) == {"w", "b"}
    norm = torch.cat([(clipped[k].double() - reference[k].double()).flatten() for k in clipped]).norm()
    before = torch.cat([(values[k].double() - reference[k].double()).flatten() for k in clipped]).norm()
    assert norm <= 1.0 * (1 + 1e-6)
    assert scaled == bool(before > 1.0)
    if not scaled:
        assert float(norm) == pytest.approx(float(before), rel=1e-5)


def test_client_side_clipping_bounds_every_reply_and_reports_its_norm_bit(tmp_path):
    strategy = private_strategy(tmp_path, dp="client-fixed", dp_clipping_norm=0.05)
    grid = RecordingGrid(make_client_app(), partitions(4))
    strategy.start(grid, num_rounds=1)
    sent = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert sent and all(m.content["config"]["clipping_norm"] == 0.05 for m in sent)
    start = toolkit.receive(sent[0], build_for("mlp", digits())).start  # the soup as the clients got it
    mask = {name: torch.ones_like(t, dtype=torch.bool) for name, t in strategy.mask.items()}  # round 1 is dense
    names = private_names(start)
    for reply in train_replies(grid, 1):
        payload = payload_of(reply.content["update"])
        values = decode(payload, expected_mask=mask, expected_digest=None, template=start).to_state_dict(start)
        norm = torch.cat([(values[n].double() - start[n].double()).flatten() for n in names]).norm()
        assert float(norm) <= 0.05 * (1 + 1e-5)
        assert reply.content["metrics"]["norm_bit"] == 1


def test_epsilon_after_every_round_matches_flowers_accountant(private_job):
    strategy, out = private_job
    rounds = rounds_of(out)
    expected = flower_epsilons(3, 2.0 / 2, 3, 6)  # replace-one: the sum's sensitivity is 2C
    assert [r["privacy"]["epsilon"] for r in rounds] == pytest.approx(expected)
    assert [r["privacy"]["releases"] for r in rounds] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())["privacy"]
    assert summary["epsilon"] == pytest.approx(expected[-1]) and summary["delta"] == 1e-5
    assert "metrics" in summary["not_accounted"] and "mask" in summary["accounted"]


def test_no_amplification_accounts_as_flowers_dp_wrappers(tmp_path):
    strategy = private_strategy(tmp_path, dp_sampling="no-amplification")
    strategy.start(LocalGrid(make_client_app(), partitions(4)), num_rounds=2)
    expected = flower_epsilons(2, 1.0, 3, 4, replace_one=False)
    assert [r["privacy"]["epsilon"] for r in rounds_of(tmp_path)] == pytest.approx(expected)


def test_a_budget_stops_the_job_before_the_round_that_would_exceed_it_and_resume_continues(tmp_path):
    epsilons = flower_epsilons(3, 0.5, 3, 6)
    budget = (epsilons[1] + epsilons[2]) / 2  # rounds 1 and 2 fit, round 3 would not
    strategy = private_strategy(tmp_path, dp_epsilon_budget=budget)
    strategy.start(LocalGrid(make_client_app(), partitions(6)))  # returns: a clean stop

    assert [r["server_round"] for r in rounds_of(tmp_path)] == [1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "privacy budget is spent: round 3" in summary["stopped"]
    assert summary["privacy"]["epsilon"] == pytest.approx(epsilons[1])
    assert load_checkpoint(tmp_path / "checkpoints" / "soup").metadata["server_round"] == 2

    resumed = private_strategy(tmp_path, dp_epsilon_budget=epsilons[2] * 1.01)
    resumed.restore(load_checkpoint(tmp_path / "checkpoints" / "soup"))
    resumed.start(LocalGrid(make_client_app(), partitions(6)))
    assert [r["privacy"]["epsilon"] for r in rounds_of(tmp_path)] == pytest.approx(epsilons)


@pytest.mark.parametrize("dp", ["server-adaptive", "client-adaptive"])
def test_adaptive_clipping_grows_the_bound_while_too_few_updates_fit_under_it(tmp_path, dp):
    strategy = private_strategy(tmp_path, dp=dp, dp_noise_multiplier=0.0, dp_clipping_norm=1e-3)
    strategy.start(LocalGrid(make_client_app(), partitions(4)), num_rounds=2)
    first, second = (r["privacy"] for r in rounds_of(tmp_path))
    assert first["clipping_norm"] == 1e-3 and second["clipping_norm"] == first["next_clipping_norm"]
    assert first["next_clipping_norm"] == pytest.approx(1e-3 * torch.e**0.1)  # every update clipped, no noise
    assert first["epsilon"] is None  # no noise: no privacy, said so


@pytest.mark.parametrize(
    "run, federation, federated_recalibration, fix",
    [
        (dict(merge="greedy"), {}, False, "merge uniform"),
        (dict(merge="weighted"), {}, False, "merge uniform"),
        (dict(merge="trimmed-mean"), {}, False, "merge uniform"),
        (dict(update_norm_bound=3.0), {}, False, "set it to 0"),
        ({}, dict(mode="hyperparameter"), False, "use mode data"),
        (dict(diagnostics=True), {}, False, "set diagnostics false"),
        ({}, dict(dp_noise_multiplier=0.0, dp_epsilon_budget=1.0), False, "dp-noise-multiplier above 0"),
        ({}, {}, True, "norm statistics are not private"),
    ],
)
def test_dp_refuses_what_it_cannot_account_in_one_sentence(run, federation, federated_recalibration, fix):
    fed = FederationConfig(**{**DP, **federation})
    with pytest.raises(FedSMSError, match=fix) as refused:
        check_job(
            RunConfig(**{**RUN, **run}),
            fed,
            federated_recalibration=federated_recalibration,
            diagnostics=run.get("diagnostics", False),
        )
    assert str(refused.value).count(". ") == 0  # one sentence


def test_the_strategy_refuses_dp_with_clients_recalibrating_norm_statistics(tmp_path):
    fed = FederationConfig(**DP, recalibration="federated")
    run = RunConfig(**{**RUN, "model": "cnn"}, out_dir=str(tmp_path))
    with pytest.raises(FedSMSError, match="norm statistics are not private"):
        SparseSoupStrategy(run, fed, build_for("cnn", digits()), server_data=digits(), out_dir=tmp_path)
