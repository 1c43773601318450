"""A checkpoint's documented files, ``X.safetensors``, ``X.mask.safetensors`` and ``X.json``,
copied anywhere under any name, load and retrain (issue 27, point 5): the generation files
the manifest names are used only where they are there."""

import shutil

import pytest
import torch
from helpers import digits
from safetensors.torch import save_file

from fedsms.checkpoint import load_checkpoint
from fedsms.cli import main
from fedsms.models import build_for


def copy_documented(base, to):
    for suffix in (".safetensors", ".mask.safetensors", ".json"):
        shutil.copyfile(f"{base}{suffix}", f"{to}{suffix}")  # the contents, not the links


@pytest.mark.parametrize("name", ["pruned", "renamed", "pruned.v2"])
def test_copied_checkpoint_files_load_and_retrain(tmp_path, name):
    torch.manual_seed(0)
    save_file(build_for("mlp", digits()).state_dict(), tmp_path / "dense.safetensors")
    prune = ["prune", str(tmp_path / "dense.safetensors"), "--phase", "1", "--phases", "2", "--model", "mlp"]
    assert main([*prune, "--dataset", "digits", "--target-sparsity", "0.8", "-o", str(tmp_path / "a" / "pruned")]) == 0
    (tmp_path / "b").mkdir()
    copy_documented(tmp_path / "a" / "pruned", tmp_path / "b" / name)
    original, copy = load_checkpoint(tmp_path / "a" / "pruned"), load_checkpoint(tmp_path / "b" / name)
    assert all(torch.equal(copy.state[k], v) for k, v in original.state.items())
    assert copy.metadata["mask_digest"] == original.metadata["mask_digest"]
    retrain = ["retrain", str(tmp_path / "b" / name), "--candidate", "0", "--retrain-epochs", "1"]
    assert main([*retrain, "-o", str(tmp_path / "b" / "c0")]) == 0
    assert load_checkpoint(tmp_path / "b" / "c0").metadata["mask_digest"] == original.metadata["mask_digest"]
