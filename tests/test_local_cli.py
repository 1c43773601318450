"""The single-machine pipeline and the `fedsms` command, end to end on digits at tiny size."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsms.checkpoint import load_checkpoint, save_checkpoint
from fedsms.cli import main
from fedsms.masks import kept_count, mask_digest, prunable_names, sparsity_after_phase
from fedsms.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--model",
    "mlp",
    "--phases",
    "2",
    "--candidates",
    "2",
    "--target-sparsity",
    "0.8",
    "--pretrain-epochs",
    "2",
    "--retrain-epochs",
    "1",
    "--ood-examples",
    "50",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    methods = "imp,imp-long,imp-best,imp-avg,sms"
    assert main(["local", *TINY, "--methods", methods, "--out-dir", str(out), "--seeds", "0,1"]) == 0
    return out


def test_local_writes_rows_for_every_method_phase_and_seed(local_run):
    rows = [json.loads(line) for line in (local_run / "results.jsonl").read_text().splitlines()]
    seen = {(r["method"], r["phase"], r["seed"]) for r in rows}
    for seed in (0, 1):
        assert ("dense", 0, seed) in seen
        for method in ("imp", "imp-long", "imp-best", "imp-avg", "sms", "ensemble"):
            assert {(method, 1, seed), (method, 2, seed)} <= seen
    for r in rows:
        assert r["sparsity"] == pytest.approx(sparsity_after_phase(0.8, 2, r["phase"]), abs=1e-4)
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["ood_accuracy"] <= 1.0
    sms = [r for r in rows if r["method"] == "sms"]
    assert all(r["candidates"] == 2 for r in sms)
    imp_avg = {r["phase"]: r["candidates"] for r in rows if r["method"] == "imp-avg" and r["seed"] == 0}
    assert imp_avg == {1: 1, 2: 2}  # the one-phase soup averages only in the last phase
    # IMP with m x the epochs: one model per phase, the compute of the m candidates
    epochs = {(r["method"], r["candidates"], r["epochs"]) for r in rows if r["method"] in ("imp", "imp-long", "sms")}
    assert epochs == {("imp", 1, 1), ("imp-long", 1, 2), ("sms", 2, 1)}
    # all methods prune the same schedule; every seed's summary is in summary.json
    summary = json.loads((local_run / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["results"]["sms"]["2"]["accuracy"]["n"] == 2
    assert (local_run / "accuracy_vs_sparsity.png").stat().st_size > 1000
    assert (local_run / "id_vs_ood.png").stat().st_size > 1000


def test_final_checkpoints_are_exactly_sparse_and_load_plainly(local_run):
    model = build_model("mlp", 10, (1, 8, 8))
    names = prunable_names(model)
    total = sum(dict(model.named_parameters())[n].numel() for n in names)
    checkpoint = load_checkpoint(local_run / "checkpoints" / "seed0-sms")
    assert sum(int(m.sum()) for m in checkpoint.mask.values()) == kept_count(total, 0.8)
    model.load_state_dict(load_file(local_run / "checkpoints" / "seed0-sms.safetensors"))
    for name in names:
        weight = dict(model.named_parameters())[name]
        assert torch.count_nonzero(weight[~checkpoint.mask[name]]) == 0


def test_soup_command_merges_checkpoints_that_share_a_mask(local_run, tmp_path, capsys):
    a = load_checkpoint(local_run / "checkpoints" / "seed0-sms")
    b_state = {k: v * 0.5 for k, v in a.state.items()}
    save_checkpoint(tmp_path / "b", b_state, a.mask, {"model": "mlp", "dataset": "digits"})
    assert (
        main(["soup", str(local_run / "checkpoints" / "seed0-sms"), str(tmp_path / "b"), "-o", str(tmp_path / "soup")])
        == 0
    )
    soup = load_checkpoint(tmp_path / "soup")
    for name, value in soup.state.items():
        torch.testing.assert_close(value, 0.75 * a.state[name])
    assert mask_digest(soup.mask) == mask_digest(a.mask)
    assert "soup of 2 candidates" in capsys.readouterr().out


def test_soup_command_refuses_checkpoints_with_other_masks(local_run, tmp_path, capsys):
    other = local_run / "checkpoints" / "seed1-imp"  # another seed: another mask
    code = main(["soup", str(local_run / "checkpoints" / "seed0-sms"), str(other), "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "same mask" in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_inspect_prints_per_layer_sparsity_and_metadata(local_run, capsys):
    assert main(["inspect", str(local_run / "checkpoints" / "seed0-sms")]) == 0
    out = capsys.readouterr().out
    assert "net.1.weight" in out and "total" in out and '"method": "sms"' in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["local", "--target-sparsity", "1.5"], "'target-sparsity' must be in [0, 1)"),
        (["local", "--phases", "0"], "'phases' must be at least 1"),
        (["local", "--model", "vgg"], "unknown model 'vgg'"),
        (["local", "--dataset", "cifar10", "--pretrain-epochs", "1"], "--data-dir"),
        (["local", "--recipe", "lr"], "recipe part 'lr' is not KEY=V1,V2"),
        (["inspect", "/nonexistent/ckpt"], "is missing"),
        (["inspect", str(ROOT / "README.md")], "is not a checkpoint, a model or a results file"),
        (["inspect", str(ROOT / "fedsms" / "wire")], "holds no fedsms checkpoint, model or results file"),
    ],
)
def test_bad_input_gives_one_clear_sentence(argv, message, capsys, tmp_path):
    code = main([*argv, "--out-dir", str(tmp_path / "o")] if argv[0] == "local" else argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_existing_results_are_never_overwritten(local_run, capsys):
    before = (local_run / "results.jsonl").read_text()
    assert main(["local", *TINY, "--out-dir", str(local_run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (local_run / "results.jsonl").read_text() == before


def test_every_command_has_help(capsys):
    for command in ([], ["local"], ["simulate"], ["soup"], ["inspect"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
    assert "--target-sparsity" in capsys.readouterr().out


def test_sms_greedy_is_sms_with_the_greedy_merge(tmp_path):
    # the alias reports the greedy soup beside the configured one; with merge=greedy both are the same run
    out = tmp_path / "run"
    assert main(["local", *TINY, "--methods", "sms,sms-greedy", "--merge", "greedy", "--out-dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]

    def pick(method: str) -> list[tuple]:
        return [(r["phase"], r["mask_digest"], r["accuracy"], r["chosen"]) for r in rows if r["method"] == method]

    assert pick("sms-greedy") == pick("sms") and len(pick("sms")) == 2
    assert sum(r["method"] == "ensemble" for r in rows) == 2  # only sms reports the ensemble
