"""Nothing read from disk or the network is unpickled, and every config or checkpoint
value that is out of type or range is refused in one sentence naming its key."""

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from fedsms import FedSMSError
from fedsms.checkpoint import load_checkpoint, save_checkpoint
from fedsms.config import split_config

ROOT = Path(__file__).resolve().parents[1]

BAD_VALUES = [
    ("target-sparsity", 1.0, "'target-sparsity' must be in [0, 1)"),
    ("target-sparsity", -0.1, "'target-sparsity' must be in [0, 1)"),
    ("target-sparsity", "most", "'target-sparsity' must be a float"),
    ("phases", 0, "'phases' must be at least 1"),
    ("phases", 2.5, "'phases' must be an int"),
    ("candidates", 0, "'candidates' must be at least 1"),
    ("retrain-epochs", 0, "'retrain-epochs' must be at least 1"),
    ("lr", 0.0, "'lr' must be positive"),
    ("weight-decay", -1e-4, "'weight-decay' must be at least 0"),
    ("batch-size", 0, "'batch-size' must be at least 1"),
    ("label-smoothing", 1.0, "'label-smoothing' must be in [0, 1)"),
    ("heldout-fraction", 0.0, "'heldout-fraction' must be in (0, 1)"),
    ("recalibration-fraction", 1.5, "'recalibration-fraction' must be in (0, 1]"),
    ("pruning", "largest", "'pruning' must be one of"),
    ("merge", "max", "'merge' must be one of"),
    ("augment", "maybe", "'augment' must be a bool"),
    ("methods", "imp,magic", "'methods' must list some of"),
    ("rounds-per-phase", 0, "'rounds-per-phase' must be at least 1"),
    ("pretrain-rounds", -1, "'pretrain-rounds' must be at least 0"),
    ("min-train-clients", 0, "'min-train-clients' must be at least 1"),
    ("fraction-evaluate", 1.5, "'fraction-evaluate' must be in [0, 1]"),
    ("dirichlet-alpha", 0.0, "'dirichlet-alpha' must be positive"),
    ("round-timeout", 0, "'round-timeout' must be positive"),
    ("round-retries", -1, "'round-retries' must be at least 0"),
    ("resume", "later", "'resume' must be a bool"),
    ("value-dtype", "int8", "'value-dtype' must be one of"),
    ("rounds", 3, "unknown config key 'rounds'"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES)
def test_a_bad_config_value_is_refused_naming_its_key(key, value, message):
    with pytest.raises(FedSMSError, match=re.escape(message)):
        split_config({key: value})


def test_nothing_in_the_package_can_unpickle():
    sources = [p for folder in ("fedsms", "server", "client") for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 20
    for path in sources:
        text = path.read_text()
        assert not re.search(r"\bimport pickle\b|\bpickle\.load|allow_pickle\s*=\s*True", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def small_checkpoint(folder: Path) -> Path:
    state = {"net.0.weight": torch.tensor([[0.0, 2.0], [3.0, 0.0]]), "net.0.bias": torch.ones(2)}
    mask = {"net.0.weight": state["net.0.weight"] != 0}
    return save_checkpoint(folder / "c", state, mask, {"phase": 1})


def test_a_pickle_in_place_of_a_checkpoint_is_refused_not_loaded(tmp_path):
    path = small_checkpoint(tmp_path)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path.write_bytes(pickle.dumps({"net.0.weight": Boom()}))
    with pytest.raises(FedSMSError, match="cannot be read"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value", [("format_version", "1"), ("mask_digest", 7), ("mask_tensors", "net.0.weight")])
def test_checkpoint_metadata_of_the_wrong_type_is_refused_naming_the_key(tmp_path, key, value):
    path = small_checkpoint(tmp_path)
    meta_path = path.with_name("c.json")
    meta = json.loads(meta_path.read_text())
    meta[key] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FedSMSError, match=f"lacks '{key}'"):
        load_checkpoint(path)


def test_a_checkpoint_without_round_history_cannot_be_resumed(tmp_path):
    from test_resume import make_strategy

    strategy = make_strategy(tmp_path)
    config = {**strategy.run.to_dict(), **strategy.fed.to_dict()}
    save_checkpoint(tmp_path / "soup", strategy.soup, strategy.mask, {"server_round": "2", "config": config})
    with pytest.raises(FedSMSError, match="lacks 'server_round'"):
        strategy.restore(load_checkpoint(tmp_path / "soup"))
