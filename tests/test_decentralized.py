"""Decentralized SMS: ``fedsms prune``, ``fedsms retrain`` and ``fedsms soup`` give what
``fedsms local`` gives, step by step (fast, in this process) and as a whole shell pipeline
with background candidate processes (slow)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedsms.candidates import CandidateTrainer
from fedsms.checkpoint import load_checkpoint, save_checkpoint
from fedsms.cli import main
from fedsms.config import RunConfig
from fedsms.local import LocalRun, run_local

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "decentralized" / "run_sms.sh"
SLURM = ROOT / "examples" / "decentralized" / "sms_array.slurm"
# Random pruning: the prune seed shows in the mask, so a shifted seed cannot pass unseen.
JOB = {
    "dataset": "digits",
    "model": "mlp",
    "phases": 2,
    "candidates": 2,
    "retrain_epochs": 1,
    "pretrain_epochs": 1,
    "target_sparsity": 0.8,
    "pruning": "random",
    "ood": False,
    "device": "cpu",
    "seed": 5,
    "soup_guard": "off",  # the offline soup is the plain average asked for; the local driver's guard would differ
}


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """``fedsms local`` (sms, sms-greedy, gmp-soup) with every phase's checkpoint and candidates kept.

    The local driver keeps only each method's last checkpoint, so its ``save`` is wrapped to
    copy every phase's, and the trainer to record each phase's candidates by label.
    """
    out = tmp_path_factory.mktemp("local")
    candidates: dict[str, list] = {}
    save, train = LocalRun.save, CandidateTrainer.train

    def save_every_phase(self, method, phase, state, mask, row):
        save(self, method, phase, state, mask, row)
        base = self.out_dir / "checkpoints" / f"seed{self.config.seed}-{method}"
        for suffix in (".safetensors", ".mask.safetensors", ".json"):
            shutil.copy(f"{base}{suffix}", out / f"{method}-p{phase}{suffix}")

    def record(self, start, mask, configs, label):
        results = train(self, start, mask, configs, label)
        candidates[label.split(" sparsity")[0]] = results
        return results

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalRun, "save", save_every_phase)
        patch.setattr(CandidateTrainer, "train", record)
        run_local(RunConfig.from_mapping({**JOB, "methods": "sms,sms-greedy,gmp-soup", "out_dir": str(out)}))
    return out, candidates


def masks_equal(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def states_equal(a, b) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # safetensors sorts the keys


@pytest.mark.parametrize("method, schedule", [("sms", "imp"), ("gmp-soup", "gmp")])
def test_prune_gives_the_local_drivers_mask_of_every_phase(local, tmp_path, method, schedule):
    out, _ = local
    start = out / "dense-p0"  # fedsms local's dense checkpoint (all-ones mask)
    for phase in (1, 2):
        assert (
            main(
                ["prune", str(start), "--phase", str(phase), "--schedule", schedule, "-o", str(tmp_path / f"p{phase}")]
            )
            == 0
        )
        pruned, expected = load_checkpoint(tmp_path / f"p{phase}"), load_checkpoint(out / f"{method}-p{phase}")
        assert masks_equal(pruned.mask, expected.mask)
        assert pruned.metadata["mask_digest"] == expected.metadata["mask_digest"]
        assert (pruned.metadata["stage"], pruned.metadata["phase"], pruned.metadata["schedule"]) == (
            "pruned",
            phase,
            schedule,
        )
        parent = load_checkpoint(start).mask
        assert all(not (pruned.mask[k] & ~parent[k]).any() for k in parent)  # nested: never regrows
        start = out / f"{method}-p{phase}"  # the next phase starts from the local soup


def test_prune_of_a_model_without_mask_file_starts_from_all_ones(local, tmp_path):
    out, _ = local
    save_file(load_checkpoint(out / "dense-p0").state, tmp_path / "dense.safetensors")  # a bare state dict
    options = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in JOB.items()
        if k in ("dataset", "model", "phases", "target_sparsity", "pruning", "seed")
    ]
    assert (
        main(["prune", str(tmp_path / "dense.safetensors"), "--phase", "1", *options, "-o", str(tmp_path / "p1")]) == 0
    )
    assert masks_equal(load_checkpoint(tmp_path / "p1").mask, load_checkpoint(out / "sms-p1").mask)


def test_retrain_and_soup_give_the_local_drivers_candidates_and_soups(local, tmp_path):
    out, candidates = local
    assert main(["prune", str(out / "dense-p0"), "--phase", "1", "-o", str(tmp_path / "pruned")]) == 0
    for i in (1, 0):
        assert main(["retrain", str(tmp_path / "pruned"), "--candidate", str(i), "-o", str(tmp_path / f"c{i}")]) == 0
    local_candidates = candidates["[sms] phase 1/2"]
    for i in (0, 1):
        mine = load_checkpoint(tmp_path / f"c{i}")
        assert states_equal(mine.state, local_candidates[i][0])
        meta = mine.metadata
        assert (meta["stage"], meta["phase"], meta["candidate"]) == ("candidate", 1, i)
        assert meta["hyperparameters"]["seed"] == JOB["seed"] + i + 10_007  # candidate i's seed in phase 1
        assert meta["num_examples"] == local_candidates[i][1]["num_examples"]
        assert meta["mask_digest"] == load_checkpoint(tmp_path / "pruned").metadata["mask_digest"]
        assert (meta["model"], meta["dataset"]) == ("mlp", "digits")
    # Given out of order: the soup adds candidates in index order, as the local driver does.
    assert (
        main(["soup", str(tmp_path / "c1"), str(tmp_path / "c0"), "--recalibrate", "-o", str(tmp_path / "soup")]) == 0
    )
    assert states_equal(load_checkpoint(tmp_path / "soup").state, load_checkpoint(out / "sms-p1").state)
    assert (
        main(["soup", str(tmp_path / "c0"), str(tmp_path / "c1"), "--merge", "greedy", "-o", str(tmp_path / "g")]) == 0
    )
    greedy = load_checkpoint(tmp_path / "g")
    assert states_equal(greedy.state, load_checkpoint(out / "sms-greedy-p1").state)
    assert greedy.metadata["merge"] == "greedy" and greedy.metadata["stage"] == "soup"


def refusal(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_retrain_refuses_a_checkpoint_without_mask_or_with_weights_outside_it(local, tmp_path, capsys):
    out, _ = local
    dense = load_checkpoint(out / "dense-p0")
    save_file(dense.state, tmp_path / "bare.safetensors")
    err = refusal(["retrain", str(tmp_path / "bare"), "--candidate", "0", "-o", str(tmp_path / "x")], capsys)
    assert "has no mask file" in err and "fedsms prune" in err
    err = refusal(["retrain", str(out / "dense-p0"), "--candidate", "0", "-o", str(tmp_path / "x")], capsys)
    assert "not the output of fedsms prune" in err
    assert main(["prune", str(out / "dense-p0"), "--phase", "1", "-o", str(tmp_path / "pruned")]) == 0
    pruned = load_checkpoint(tmp_path / "pruned")
    save_checkpoint(tmp_path / "tampered", dense.state, pruned.mask, pruned.metadata)  # dense weights, sparse mask
    err = refusal(["retrain", str(tmp_path / "tampered"), "--candidate", "0", "-o", str(tmp_path / "x")], capsys)
    assert "nonzero weights outside its mask" in err
    err = refusal(["retrain", str(tmp_path / "pruned"), "--candidate", "2", "-o", str(tmp_path / "x")], capsys)
    assert "outside 0..1" in err
    assert not (tmp_path / "x.json").exists()


def test_soup_refuses_candidates_of_another_phase(local, tmp_path, capsys):
    out, _ = local
    assert main(["prune", str(out / "dense-p0"), "--phase", "1", "-o", str(tmp_path / "pruned")]) == 0
    assert main(["retrain", str(tmp_path / "pruned"), "--candidate", "0", "-o", str(tmp_path / "c0")]) == 0
    c0 = load_checkpoint(tmp_path / "c0")
    save_checkpoint(tmp_path / "late", c0.state, c0.mask, {**c0.metadata, "phase": 2, "candidate": 1})
    err = refusal(["soup", str(tmp_path / "c0"), str(tmp_path / "late"), "-o", str(tmp_path / "s")], capsys)
    assert "of phase 2" in err and "one phase" in err
    save_checkpoint(tmp_path / "again", c0.state, c0.mask, c0.metadata)
    err = refusal(["soup", str(tmp_path / "c0"), str(tmp_path / "again"), "-o", str(tmp_path / "s")], capsys)
    assert "both candidate 0" in err
    assert not (tmp_path / "s.json").exists()


def test_prune_refuses_to_skip_or_repeat_a_phase(local, tmp_path, capsys):
    out, _ = local
    err = refusal(["prune", str(out / "sms-p1"), "--phase", "1", "-o", str(tmp_path / "x")], capsys)
    assert "pass --phase 2" in err
    err = refusal(["prune", str(out / "dense-p0"), "--phase", "3", "-o", str(tmp_path / "x")], capsys)
    assert "starts phase 1, not 3" in err
    err = refusal(["prune", str(out / "sms-p1"), "--phase", "2", "--phases", "1", "-o", str(tmp_path / "x")], capsys)
    assert "steps 1..1" in err


def test_every_decentralized_command_has_help(capsys):
    for command in ("prune", "retrain", "soup"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert "--schedule" in capsys.readouterr().out


def test_slurm_script_chains_prune_array_and_soup_per_phase(tmp_path):
    """Not run on Slurm: a stand-in ``sbatch`` records the submissions and their dependencies."""
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(
        '#!/bin/sh\nn=$(($(wc -l < "$SBATCH_LOG" 2>/dev/null || echo 0) + 1))\n'
        'echo "$n $*" >> "$SBATCH_LOG"\necho $((100 + n))\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "SBATCH_LOG": str(tmp_path / "log"),
        "CANDIDATES": "4",
    }
    subprocess.run(
        ["bash", str(SLURM), "dense", str(tmp_path / "out"), "--phases", "2"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 6  # per phase: prune, retrain array, soup
    prune1, array1, soup1, prune2, array2, soup2 = lines
    assert "--dependency" not in prune1 and "fedsms prune dense --phase 1" in prune1
    assert "--array=0-3" in array1 and "--dependency=afterok:101" in array1
    assert "--dependency=afterok:102" in soup1 and "fedsms soup" in soup1
    assert "--dependency=afterok:103" in prune2 and "phase1/soup --phase 2" in prune2
    assert "--dependency=afterok:104" in array2 and "--dependency=afterok:105" in soup2


@pytest.mark.slow
def test_shell_pipeline_with_background_candidates_equals_fedsms_local(tmp_path):
    """m = 2 ``fedsms retrain`` processes per phase, 2 phases: the final soup is ``fedsms local --methods sms``'s,
    bit for bit, with the same sparsity (one torch thread in every process)."""
    job = {**JOB, "pruning": "global", "methods": "sms", "out_dir": str(tmp_path / "local")}
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CANDIDATES": "2",
        "RETRAIN_ARGS": "--device cpu",
    }
    options = [f"--{k.replace('_', '-')}={v}" for k, v in job.items()]
    subprocess.run([sys.executable, "-m", "fedsms.cli", "local", *options], env=env, check=True, capture_output=True)
    seed = JOB["seed"]
    dense = tmp_path / "local" / "checkpoints" / f"seed{seed}-dense"
    run = subprocess.run(
        ["bash", str(SCRIPT), str(dense), str(tmp_path / "dec"), "--phases", "2"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    mine = load_checkpoint(tmp_path / "dec" / "phase2" / "soup")
    theirs = load_checkpoint(tmp_path / "local" / "checkpoints" / f"seed{seed}-sms")
    assert states_equal(mine.state, theirs.state)
    assert masks_equal(mine.mask, theirs.mask)
    assert mine.metadata["sparsity"] == theirs.metadata["sparsity"] == pytest.approx(0.8, abs=1e-4)
