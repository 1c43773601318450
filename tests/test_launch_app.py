"""fedsms-server --app: a user's Flower app folder with its own run config; and
``fedsms.data.make_splits`` for a user's own image arrays."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import venv_bin

from fedsms import FedSMSError
from fedsms.data import ArrayData, Augmentation, load_dataset, make_splits
from fedsms_flower.deployment import refusal
from fedsms_server import launch as server_launch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vision"


def test_app_refuses_the_built_in_flags(capsys, tmp_path):
    base = ["--insecure", "--app", str(EXAMPLE)]
    assert server_launch.main([*base, "--phases", "3"]) == 2
    assert (
        "--phases configures the built-in app only; with --app, set the app's own keys with --run-config"
        in capsys.readouterr().err
    )
    assert server_launch.main([*base, "--clients", "3"]) == 2
    assert "--clients configures the built-in app only" in capsys.readouterr().err
    assert server_launch.main(["--insecure", "--run-config", "phases=3"]) == 2
    assert "--run-config sets the keys of an --app" in capsys.readouterr().err
    assert server_launch.main(["--insecure", "--app", str(tmp_path)]) == 2
    assert "is not a Flower app folder" in capsys.readouterr().err
    assert server_launch.main([*base, "--run-config", "phases=[", "--out-dir", str(tmp_path)]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert server_launch.main([*base, "--out-dir", str(tmp_path), "--run-config", f"out-dir='{tmp_path}'"]) == 2
    assert "give the output folder once" in capsys.readouterr().err


def test_app_out_dir_becomes_its_out_dir_key(tmp_path):
    args = server_launch.build_parser().parse_args(
        ["--insecure", "--app", str(EXAMPLE), "--out-dir", str(tmp_path / "o"), "--run-config", "phases=1"]
    )
    job = server_launch.app_job(args)
    assert job.app == EXAMPLE and job.out_dir == tmp_path / "o"
    assert job.run_config == ["phases=1", f'out-dir="{tmp_path / "o"}"']
    bare = server_launch.app_job(server_launch.build_parser().parse_args(["--app", str(EXAMPLE)]))
    assert bare.run_config == [] and bare.out_dir is None  # then only Flower's run status is reported


def test_an_undeclared_run_config_key_ends_the_server_in_one_sentence():
    started = time.monotonic()
    result = subprocess.run(
        [
            venv_bin("fedsms-server"),
            "--insecure",
            "--app",
            str(EXAMPLE),
            "--port",
            "1",
            "--run-config",
            "phases=2 phasez=3",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("fedsms-server: error: run-config key 'phasez' is not declared in [tool.flwr.app.config]")
    assert "Traceback" not in result.stderr


def test_flowers_refusal_reads_as_one_sentence():
    said = "Using SuperLink: fedsms (127.0.0.1:9092)\n\n[code: 15] Invalid run configuration.\n"
    text = refusal(EXAMPLE, said)
    assert text.startswith("Flower refused the run config ([code: 15] Invalid run configuration.); every --run-config")
    assert "\n" not in text


def test_make_splits_is_the_rule_of_load_dataset():
    digits = load_dataset("digits", heldout_fraction=0.2, seed=3)
    train_all = ArrayData(
        torch.cat([digits.train.images, digits.heldout.images]), torch.cat([digits.train.labels, digits.heldout.labels])
    )
    mine = make_splits(
        "digits", train_all, digits.test, num_classes=10, augmentation=digits.augmentation, heldout_fraction=0.2, seed=3
    )
    assert (mine.input_shape, mine.num_classes, len(mine.train), len(mine.heldout)) == (
        digits.input_shape,
        10,
        len(digits.train),
        len(digits.heldout),
    )
    assert mine.mean == pytest.approx(digits.mean) and mine.std == pytest.approx(digits.std)


def test_make_splits_checks_the_arrays():
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(20, dtype=torch.int32) % 4
    splits = make_splits(
        "mine",
        ArrayData(images, labels),
        ArrayData(images[:8], labels[:8]),
        num_classes=4,
        augmentation=Augmentation(crop_padding=1),
        heldout_fraction=0.25,
        seed=1,
    )
    assert (len(splits.train), len(splits.heldout), len(splits.test)) == (15, 5, 8)
    assert splits.train.labels.dtype == torch.int64 and splits.augmentation.crop_padding == 1
    with pytest.raises(FedSMSError, match=r"labels must be integer class indices in \[0, 3\)"):
        make_splits("mine", ArrayData(images, labels), ArrayData(images, labels), num_classes=3)
    with pytest.raises(FedSMSError, match="needs train as an ArrayData"):
        make_splits("mine", (images, labels), ArrayData(images, labels), num_classes=4)
    with pytest.raises(FedSMSError, match="augmentation translates and flips images"):
        rows = ArrayData(images.view(20, -1).float(), labels)
        make_splits("mine", rows, rows, num_classes=4, augmentation=Augmentation(flip=True))
    with pytest.raises(FedSMSError, match="give both the same"):
        make_splits("mine", ArrayData(images, labels), ArrayData(images[:, :1], labels), num_classes=4)


def test_make_splits_takes_tabular_rows_and_value_targets():
    torch.manual_seed(0)
    rows, values = torch.randn(40, 10), torch.randn(40, 2)  # two float targets per row
    splits = make_splits("rows", ArrayData(rows, values), ArrayData(rows[:8], values[:8]), heldout_fraction=0.25)
    assert (len(splits.train), len(splits.heldout), splits.input_shape, splits.num_classes) == (30, 10, (10,), 0)
    assert splits.mean is None and splits.train.labels.dtype == torch.float32  # targets kept as they are
    kept = torch.cat([splits.train.labels, splits.heldout.labels])
    assert torch.equal(kept.sort(dim=0).values, values.sort(dim=0).values)
    tokens = torch.randint(0, 50, (30, 7))
    seqs = make_splits(
        "seqs", ArrayData(tokens, torch.arange(30) % 3), ArrayData(tokens, torch.arange(30) % 3), num_classes=3
    )
    assert seqs.input_shape == (7,) and seqs.train.images.dtype == torch.int64


def test_vision_example_reads_its_png_folders(tmp_path):
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_images
        import vision_task
    finally:
        sys.path.remove(str(EXAMPLE))
    make_images.write_images(tmp_path, train_per_class=5, test_per_class=2, size=12, seed=1)
    splits = vision_task.load_splits(str(tmp_path), 0.2, 0)
    assert splits.input_shape == (3, 12, 12) and splits.num_classes == 4
    assert (len(splits.train), len(splits.heldout), len(splits.test)) == (16, 4, 8)
    assert splits.train.images.dtype == torch.uint8
    model = vision_task.PatternNet(splits.num_classes)
    assert model(splits.test.images.float() / 255).shape == (8, 4)
    with pytest.raises(FileNotFoundError, match="make_images.py"):
        vision_task.load_splits(str(tmp_path / "none"))


def test_the_built_in_job_keeps_its_flags(tmp_path):
    args = server_launch.build_parser().parse_args(
        ["--insecure", "--phases", "2", "--clients", "3", "--out-dir", str(tmp_path / "o")]
    )
    job = server_launch.built_in_job(args)
    assert job.app is None and job.out_dir == tmp_path / "o"  # the app folder is written into the Flower home
    assert job.run_config["phases"] == "2" and job.run_config["min_train_clients"] == 3
    assert job.run_config["out_dir"] == str(tmp_path / "o")
    default = server_launch.built_in_job(server_launch.build_parser().parse_args(["--insecure"]))
    assert default.run_config["min_available_clients"] == 2 and default.out_dir == Path("runs/server").resolve()
