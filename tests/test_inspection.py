"""``fedsms inspect`` on every file fedsms writes and on a folder, from files made here in
the formats fedsms writes (no training)."""

import json

import pytest
import torch

from fedsms.checkpoint import export_model, save_checkpoint
from fedsms.cli import main
from fedsms.masks import compute_mask, dense_mask, prunable_names
from fedsms.models import build_model

SPARSITY = 0.8


@pytest.fixture
def run_folder(tmp_path):
    """A run's folder: two checkpoints, the final model (no mask file) and a results file."""
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 8, 8))
    params = dict(model.named_parameters())
    mask = compute_mask(params, dense_mask(model, prunable_names(model)), SPARSITY)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in mask:
                param.mul_(mask[name])
    for method in ("dense", "sms"):
        save_checkpoint(tmp_path / "checkpoints" / f"seed0-{method}", model.state_dict(), mask, {"method": method})
    export_model(tmp_path / "final_model", model, {"model": "mlp"})
    rows = [{"method": "dense", "seed": 0, "phase": 0, "sparsity": 0.0, "accuracy": 0.97}]
    rows += [{"method": "sms", "seed": 0, "phase": p, "sparsity": s, "accuracy": 0.96} for p, s in ((1, 0.5), (2, 0.8))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path, mask


def total_line(out: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith("total")).split()


def test_a_model_without_a_mask_file_is_read_from_its_zeros(run_folder, capsys):
    folder, mask = run_folder
    assert main(["inspect", str(folder / "final_model")]) == 0
    out = capsys.readouterr().out
    numel, kept = sum(m.numel() for m in mask.values()), sum(int(m.sum()) for m in mask.values())
    assert "read off its zeros" in out and total_line(out)[1:] == [str(numel), str(kept), "80.00%"]
    assert "compact file (fedsms export): " in out
    assert main(["inspect", str(folder / "final_model.safetensors")]) == 0  # by any of its names
    assert total_line(capsys.readouterr().out)[1:] == [str(numel), str(kept), "80.00%"]


def test_a_checkpoint_shows_its_mask_and_metadata(run_folder, capsys):
    folder, _ = run_folder
    assert main(["inspect", str(folder / "checkpoints" / "seed0-sms.json")]) == 0
    out = capsys.readouterr().out
    assert total_line(out)[-1] == "80.00%" and '"method": "sms"' in out and "read off" not in out


def test_a_folder_lists_each_checkpoint_model_and_results_file_once(run_folder, capsys):
    folder, _ = run_folder
    assert main(["inspect", str(folder)]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == [
        ["checkpoint", str(folder / "checkpoints" / "seed0-dense")],
        ["checkpoint", str(folder / "checkpoints" / "seed0-sms")],
        ["model", str(folder / "final_model.safetensors")],
        ["results", str(folder / "results.jsonl")],
    ]
    for _, path in listed:
        assert main(["inspect", path]) == 0


def test_a_folder_lists_a_compact_file_as_one(run_folder, capsys):
    from fedsms.compact import export_compact

    folder, _ = run_folder
    compact = export_compact(folder / "final_model", folder / "model.sparse.safetensors")
    assert main(["inspect", str(folder)]) == 0
    assert ["compact", str(compact)] in [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert main(["inspect", str(compact)]) == 0
    assert "compact file: " in capsys.readouterr().out


def test_a_results_file_prints_its_tables(run_folder, capsys):
    folder, _ = run_folder
    assert main(["inspect", str(folder / "results.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "n = 1" in out and "\nsms " in out and "± 0.00" not in out


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "is missing; pass a checkpoint, a model, a results file or a run's folder"),
        ("picture.png", "is not a checkpoint, a model or a results file"),
        ("empty", "holds no fedsms checkpoint, model or results file"),
        ("other.jsonl", "holds neither result rows nor round records"),
    ],
)
def test_what_inspect_cannot_read_is_said_in_one_sentence(tmp_path, capsys, name, message):
    (tmp_path / "picture.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other.jsonl").write_text('{"a": 1}\n')
    assert main(["inspect", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
