"""Gradual magnitude pruning with soups: the cubic schedule, exact and nested masks at every
update, the local methods end to end, and the federated strategy agreeing with the local
driver on the same candidates."""

import json
import subprocess

import pytest
import torch
from conftest import venv_bin
from flwr.app import ArrayRecord, ConfigRecord
from helpers import LocalGrid, digits, partitions, reply_of

from fedsms import FedSMSError, codec
from fedsms.cli import main
from fedsms.config import FederationConfig, RunConfig, split_config
from fedsms.local import LocalRun
from fedsms.masks import kept_count, mask_digest, outside_mask_nonzeros
from fedsms.models import build_for
from fedsms.report import by_schedule, final_table, phase_table
from fedsms.schedule import cubic_sparsity, gmp_steps, split_evenly
from fedsms_client.app import make_client_app
from fedsms_flower.records import payload_of
from fedsms_server.strategy import SparseSoupStrategy


def update_targets(run: RunConfig) -> list[float]:
    return [step.sparsity for step in gmp_steps(run)]


def interval_epochs(run: RunConfig) -> list[int]:
    return [step.epochs for step in gmp_steps(run)]


TINY = dict(
    model="mlp", target_sparsity=0.8, candidates=2, pretrain_epochs=1, retrain_epochs=1, ood=False, device="cpu"
)


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one torch thread beats several, by far on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the schedule ---------------------------------------------------------------------


def test_cubic_schedule_hits_its_endpoints_follows_the_formula_and_rises():
    assert cubic_sparsity(0, 0, 10, 0.2, 0.9) == 0.2
    assert cubic_sparsity(10, 0, 10, 0.2, 0.9) == 0.9
    assert cubic_sparsity(-3, 0, 10, 0.2, 0.9) == 0.2 and cubic_sparsity(14, 0, 10, 0.2, 0.9) == 0.9
    assert cubic_sparsity(5, 0, 10, 0.2, 0.9) == pytest.approx(0.9 - 0.7 * 0.5**3)
    assert cubic_sparsity(7, 4, 10, 0.0, 0.8) == pytest.approx(0.8 * (1 - (1 - 3 / 6) ** 3))
    values = [cubic_sparsity(t / 4, 0, 10, 0.1, 0.95) for t in range(41)]
    assert all(a < b for a, b in zip(values, values[1:]))
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(a > b for a, b in zip(steps, steps[1:]))  # prunes fastest early, as GMP intends


def test_updates_follow_the_cubic_schedule_and_share_the_imp_epoch_budget():
    config = RunConfig(target_sparsity=0.9, phases=3, retrain_epochs=5)
    assert update_targets(config) == pytest.approx([0.9 * (1 - (2 / 3) ** 3), 0.9 * (1 - (1 / 3) ** 3), 0.9])
    assert interval_epochs(config) == [5, 5, 5]  # gmp-updates 0: one update per phase
    four = RunConfig(target_sparsity=0.9, phases=3, retrain_epochs=5, gmp_updates=4, gmp_initial_sparsity=0.5)
    assert update_targets(four) == pytest.approx([0.9 - 0.4 * (3 / 4) ** 3, 0.9 - 0.4 / 8, 0.9 - 0.4 / 64, 0.9])
    assert interval_epochs(four) == [3, 4, 4, 4] and sum(interval_epochs(four)) == 3 * 5
    assert update_targets(four)[-1] == 0.9  # exactly the target, not approximately
    assert split_evenly(7, 7) == [1] * 7 and split_evenly(10, 3) == [3, 3, 4]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"gmp-updates": 16}, "'gmp-updates' must be in [0, phases × retrain-epochs]"),
        ({"gmp-updates": -1}, "'gmp-updates'"),
        ({"gmp-initial-sparsity": 0.95}, "'gmp-initial-sparsity' must be in [0, target-sparsity]"),
        ({"pruning-schedule": "cubic"}, "'pruning-schedule' must be one of imp, gmp"),
        (
            {"methods": "gmp,magic"},
            "'methods' must list some of imp, imp-long, imp-best, imp-avg, sms, sms-greedy, gmp, gmp-soup",
        ),
    ],
)
def test_bad_gmp_settings_name_the_key(values, message):
    with pytest.raises(FedSMSError) as error:
        split_config({"phases": 3, "retrain-epochs": 5, "target-sparsity": 0.9, **values})
    assert message in str(error.value)


# ---- the local driver -----------------------------------------------------------------


class Recorder:
    """Wraps a LocalRun's trainer and checkpointing to keep what each update did."""

    def __init__(self, run: LocalRun) -> None:
        self.trained, self.saved = [], []
        train, save = run.trainer.train, run.save

        def recording_train(start, mask, configs, label):
            out = train(start, mask, configs, label)
            self.trained.append(
                {
                    "start": start,
                    "mask": mask,
                    "configs": configs,
                    "states": [s for s, _ in out],
                    "examples": [m["num_examples"] for _, m in out],
                }
            )
            return out

        def recording_save(method, phase, state, mask, row):
            self.saved.append({"method": method, "phase": phase, "state": state, "mask": mask})
            save(method, phase, state, mask, row)

        run.trainer.train, run.save = recording_train, recording_save


def run_recorded(tmp_path, **values) -> tuple[list[dict], Recorder, LocalRun]:
    run = LocalRun(RunConfig(**{**TINY, "out_dir": str(tmp_path), **values}), log=lambda _: None)
    recorder = Recorder(run)
    try:
        rows = run.run()
    finally:
        run.close()
    return rows, recorder, run


def test_every_update_prunes_exactly_nests_and_keeps_pruned_weights_zero(tmp_path):
    rows, recorder, run = run_recorded(
        tmp_path, methods="gmp,gmp-soup", phases=2, retrain_epochs=2, gmp_updates=3, gmp_initial_sparsity=0.2
    )
    config = run.config
    targets, epochs = update_targets(config), interval_epochs(config)
    assert epochs == [1, 1, 2]
    dense_train, *updates = recorder.trained
    assert len(updates) == 2 * 3  # three updates for gmp, then three for gmp-soup
    total = sum(m.numel() for m in dense_train["mask"].values())
    for method, chunk in (("gmp", updates[:3]), ("gmp-soup", updates[3:])):
        previous = dense_train["mask"]
        for update, (target, length, step) in enumerate(zip(targets, epochs, chunk), 1):
            mask = step["mask"]
            assert sum(int(m.sum()) for m in mask.values()) == kept_count(total, target), (method, update)
            assert all(bool((mask[n] <= previous[n]).all()) for n in mask)  # nested: never regrows
            assert not outside_mask_nonzeros(step["start"], mask)  # the pruned start
            assert all(not outside_mask_nonzeros(s, mask) for s in step["states"])  # after training
            assert [c.epochs for c in step["configs"]] == [length] * len(step["configs"])
            assert len(step["states"]) == (2 if method == "gmp-soup" else 1)
            previous = mask
        saved = [s for s in recorder.saved if s["method"] == method]
        assert [s["phase"] for s in saved] == [1, 2, 3]
        assert all(not outside_mask_nonzeros(s["state"], s["mask"]) for s in saved)  # the soups too
    by_method = {m: [r for r in rows if r["method"] == m] for m in ("gmp", "gmp-soup")}
    for method, mine in by_method.items():
        assert [r["phase"] for r in mine] == [1, 2, 3]
        assert [r["sparsity"] for r in mine] == pytest.approx(targets, abs=1e-4)
        assert [r["candidates"] for r in mine] == [2 if method == "gmp-soup" else 1] * 3
    # the first prune is the same for both methods: the same dense model to the same target
    assert mask_digest(updates[0]["mask"]) == mask_digest(updates[3]["mask"])


def test_local_cli_runs_gmp_soup_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "local",
        "--methods",
        "gmp-soup",
        "--model",
        "mlp",
        "--phases",
        "2",
        "--candidates",
        "2",
        "--target-sparsity",
        "0.8",
        "--pretrain-epochs",
        "1",
        "--retrain-epochs",
        "1",
        "--ood-examples",
        "50",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["phase"]) for r in rows] == [("dense", 0), ("gmp-soup", 1), ("gmp-soup", 2)]
    targets = update_targets(RunConfig(target_sparsity=0.8, phases=2))
    assert [r["sparsity"] for r in rows[1:]] == pytest.approx(targets, abs=1e-4)
    assert all(0.0 <= r["accuracy"] <= 1.0 and "ood_accuracy" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["gmp-soup"]["2"]["sparsity"]["mean"] == pytest.approx(0.8, abs=1e-4)
    printed = capsys.readouterr().out
    assert "gmp-soup" in printed and "final phase of each method" in printed


# ---- federated --------------------------------------------------------------------------


def gmp_strategy(tmp_path, run: RunConfig, state=None, **federation) -> SparseSoupStrategy:
    fed = FederationConfig(pruning_schedule="gmp", pretrain_rounds=0, min_train_clients=2, **federation)
    torch.manual_seed(0)
    model = build_for(run.model, digits())
    if state is not None:
        model.load_state_dict(state)
    return SparseSoupStrategy(run, fed, model, server_data=digits(), out_dir=tmp_path, log=lambda _: None)


def two_clients() -> LocalGrid:
    return LocalGrid(make_client_app(), partitions(2))


def closed(strategy, server_round: int):
    """Close the round as Flower's loop does (``aggregate_evaluate``); its record."""
    strategy.aggregate_evaluate(server_round, [])
    return strategy.rounds[-1]


def test_federated_gmp_prunes_at_round_boundaries_exactly_and_nested(tmp_path):
    run = RunConfig(**{**TINY, "phases": 2, "retrain_epochs": 3, "gmp_updates": 3})
    strategy = gmp_strategy(tmp_path, run, rounds_per_phase=2)
    # 4 pruning rounds split over 3 updates: rounds 1, 2 and 3 open one; round 4 keeps the mask
    opens = [step.prune and step.prune.index for step in strategy.schedule]
    assert opens == [1, 2, 3, None]
    total = sum(m.numel() for m in strategy.mask.values())
    previous, digests = strategy.mask, []
    grid = two_clients()
    for server_round, target in zip(range(1, 5), update_targets(run) + [update_targets(run)[-1]]):
        # the hook prunes when the round opens an update
        strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        assert sum(int(m.sum()) for m in strategy.mask.values()) == kept_count(total, target)
        assert all(bool((strategy.mask[n] <= previous[n]).all()) for n in previous)
        assert not outside_mask_nonzeros(strategy.soup, strategy.mask)
        previous = strategy.mask
        digests.append(strategy.digest)
    assert len(set(digests)) == 3 and digests[2] == digests[3]


def test_too_many_federated_updates_fail_when_the_strategy_is_built(tmp_path):
    run = RunConfig(**{**TINY, "phases": 2, "retrain_epochs": 3, "gmp_updates": 5})
    with pytest.raises(FedSMSError, match="set gmp-updates to at most 4"):
        gmp_strategy(tmp_path, run, rounds_per_phase=2)


def test_federated_and_local_gmp_soups_agree_on_the_same_candidates(tmp_path):
    """One update per round: the server's prune and masked average after every round give
    the local driver's masks exactly and its soups to float tolerance."""
    _, recorder, run = run_recorded(tmp_path / "local", methods="gmp-soup", phases=3)
    dense = recorder.trained[0]["states"][0]
    local_updates = recorder.trained[1:]
    local_soups = [s for s in recorder.saved if s["method"] == "gmp-soup"]
    strategy = gmp_strategy(tmp_path / "fed", run.config, state=dense)
    assert strategy.num_rounds == 3
    grid = two_clients()
    for server_round, (step, soup) in enumerate(zip(local_updates, local_soups), 1):
        messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        assert len(messages) == 2
        payload = payload_of(messages[0].content["soup"])  # the soup as the clients receive it
        assert all(payload_of(m.content["soup"]) == payload for m in messages)
        sent = codec.decode(
            payload, expected_mask=None, expected_digest=None, template=strategy.soup, expected_kind="soup"
        )
        assert mask_digest(sent.mask) == mask_digest(step["mask"]) == mask_digest(soup["mask"])
        for name, value in sent.to_state_dict(strategy.soup).items():
            torch.testing.assert_close(value, step["start"][name])  # the clients start where the local candidates did
        replies = [
            reply_of(
                server_round,
                i,
                i,
                codec.encode(state, sent.mask, phase=server_round, round=server_round, kind="update", num_examples=n),
            )
            for i, (state, n) in enumerate(zip(step["states"], step["examples"]))
        ]
        # each round ends a phase: the merge, then the phase's end (server-held data; the mlp has no norm layers)
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert arrays is not None
        assert closed(strategy, server_round).accepted == 2
        for name, value in soup["state"].items():
            torch.testing.assert_close(strategy.soup[name], value, rtol=1e-6, atol=1e-7)


def test_tables_show_each_method_at_its_own_last_update_and_split_the_schedules():
    def row(method, phase, sparsity, accuracy):
        return {"method": method, "seed": 0, "phase": phase, "sparsity": sparsity, "accuracy": accuracy, "ece": 0.1}

    rows = [
        row("dense", 0, 0.0, 0.99),
        row("imp", 1, 0.5, 0.97),
        row("imp", 2, 0.75, 0.95),
        *(row("gmp", u, s, a) for u, s, a in ((1, 0.6, 0.96), (2, 0.7, 0.95), (3, 0.75, 0.94))),
    ]
    lines = {line.split()[0]: line for line in final_table(rows).splitlines()[1:]}
    assert "75.00%" in lines["imp"] and "95.00" in lines["imp"]
    assert "75.00%" in lines["gmp"] and "94.00" in lines["gmp"]
    parts = by_schedule(rows)
    assert [sorted({r["method"] for r in part}) for part in parts] == [["dense", "imp"], ["dense", "gmp"]]
    assert "70.00%" in phase_table(parts[1]) and "70.00%" not in phase_table(parts[0])


@pytest.mark.slow
def test_masked_fedavg_on_the_gmp_schedule_runs_as_a_flower_simulation(tmp_path, flwr_home):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            venv_bin("fedsms"),
            "simulate",
            "--num-clients",
            "3",
            "--mode",
            "data",
            "--pruning-schedule",
            "gmp",
            "--out-dir",
            str(out),
            "--model",
            "mlp",
            "--phases",
            "3",
            "--target-sparsity",
            "0.9",
            "--pretrain-rounds",
            "1",
            "--pretrain-epochs",
            "2",
            "--retrain-epochs",
            "1",
            "--ood",
            "false",
            "--min-train-clients",
            "3",
            "--min-available-clients",
            "3",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rounds] == [0, 1, 2, 3] and all(r["accepted"] == 3 for r in rounds)
    targets = update_targets(RunConfig(target_sparsity=0.9, phases=3))
    assert [r["sparsity"] for r in rounds[1:]] == pytest.approx(targets, abs=1e-4)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["method"] for r in results] == ["fed-dense"] + ["fed-data-gmp"] * 3
