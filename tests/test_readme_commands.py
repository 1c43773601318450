"""Every ``fedsms`` command in README.md that can run on this machine runs as written, in the
order a newcomer meets them, in one folder, after a small demo-like run (``runs/demo-latest``).

Short training, one seed, two candidates and no OOD or diagnostics evaluation are appended to
``fedsms local`` and ``fedsms simulate`` (argparse: the last value of an option wins) so the
test stays short; nothing else is changed. No simulation may leave a temporary folder behind. Lines
with placeholders (``SOUP_OR_DENSE``, ``[--merge ...]``, ``...``) are a template, not a
command, and are left out; so are other programs (``fedsms-server``, ``flwr``, ``make``).
"""

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import venv_bin
from helpers import in_process_simulation

from fedsms.checkpoint import load_checkpoint, save_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = re.compile(r"\.\.\.|\[|\b[A-Z][A-Z_]{3,}\b|\*")
# Short training (two retraining epochs: the GMP line's 6 mask updates need phases x epochs >= 6),
# one seed, two candidates and no evaluation extras: the README's commands in seconds.
QUICK = ["--pretrain-epochs", "1", "--retrain-epochs", "2", "--candidates", "2", "--batch-size", "256"]
QUICK += ["--ood", "false", "--diagnostics", "false"]
QUICK_FOR = {"local": [*QUICK, "--seeds", "0"], "simulate": QUICK}
# The README's soup line merges "your candidates": three scaled copies of one checkpoint stand in.
USER_FILES = ("a", "b", "c")


def readme_commands() -> list[str]:
    """The ``fedsms`` command lines of the README's bash blocks, continuations joined,
    comments dropped, placeholders left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("fedsms ") and not PLACEHOLDER.search(line):
                commands.append(" ".join(line.split()))
    return commands


def test_the_readme_names_the_commands_a_newcomer_runs():
    commands = readme_commands()
    verbs = {shlex.split(c)[1] for c in commands}
    assert verbs == {"local", "simulate", "soup", "inspect", "export"}
    assert "fedsms inspect runs/demo-latest/final_model" in commands
    assert not any("runs/demo/" in c for c in commands)  # the demo writes runs/demo-<stamp>/


def demo_like_run(runs: Path, monkeypatch) -> None:
    """``make demo``'s job at tiny size, in process, with ``runs/demo-latest`` pointing at it."""
    import fedsms_flower.simulation
    from fedsms.cli import main

    monkeypatch.setattr(fedsms_flower.simulation, "simulate", in_process_simulation)
    out = runs / "demo-test"
    argv = ["simulate", "--num-clients", "4", "--phases", "3", "--min-train-clients", "4"]
    argv += ["--min-available-clients", "4", "--baselines", "imp,imp-best,sms", "--out-dir", str(out)]
    argv += ["--model", "mlp", "--pretrain-epochs", "1", "--retrain-epochs", "1", "--ood-examples", "50"]
    assert main(argv) == 0
    (runs / "demo-latest").symlink_to(out.name)


@pytest.mark.slow
def test_every_readme_command_runs_as_written_after_the_demo(tmp_path, monkeypatch, flwr_home):
    demo_like_run(tmp_path / "runs", monkeypatch)
    sms = tmp_path / "runs" / "demo-latest" / "local" / "checkpoints" / "seed0-sms"
    sms_checkpoint = load_checkpoint(sms)
    for i, name in enumerate(USER_FILES):  # candidates differ: the same weights twice are refused
        state = {k: v * (1 + 0.01 * i) if v.is_floating_point() else v for k, v in sms_checkpoint.state.items()}
        save_checkpoint(tmp_path / name, state, sms_checkpoint.mask, sms_checkpoint.metadata)
    # A temporary folder of our own, with a short path: Ray's sockets live under it (107 bytes at most).
    temp = Path(tempfile.mkdtemp(prefix="fsr-"))
    env = {**os.environ, "TMPDIR": str(temp)}
    try:
        for command in readme_commands():
            argv = shlex.split(command)
            argv = [venv_bin("fedsms"), *argv[1:], *QUICK_FOR.get(argv[1], [])]
            result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        assert not list(temp.glob("fedsms-simulation-*"))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
