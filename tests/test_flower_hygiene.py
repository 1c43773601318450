"""What fedsms leaves around a Flower run: a generated app Flower has nothing to warn about,
no Flower line that does not concern a fedsms job, and no temporary folder after a run that
succeeded (the folder of one that failed is kept and named)."""

import sys
import tempfile
import tomllib

import pytest
from flwr.common.config import validate_fields_in_config

from fedsms_flower.deployment import scratch_home, write_app_dir
from fedsms_flower.simulation import FLOWER_NOISE, stream_without_noise


def test_the_generated_app_has_nothing_for_flower_to_warn_about(tmp_path):
    project = tomllib.loads((write_app_dir(tmp_path / "app") / "pyproject.toml").read_text())
    valid, errors, warnings = validate_fields_in_config(project)
    assert valid and not errors and not warnings, warnings


def test_flower_lines_about_other_federations_are_dropped_and_the_rest_kept(capfd):
    said = [
        "INFO :      Starting Flower Simulation",
        "WARNING :   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.",
        "INFO :      Federation `@none/default` (4 simulated SuperNodes)",
        "INFO :      To change federation size, use the following command:",
        "INFO :      \tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>",
        "round 1: phase 0 round 1, sparsity 0.00%",
    ]
    script = f"import sys; print({chr(10).join(said)!r}); sys.exit(3)"
    assert stream_without_noise([sys.executable, "-c", script], {}) == 3
    out = capfd.readouterr().out.splitlines()
    assert out == [said[0], said[2], said[5]]
    assert sum("SuperNodes" in line for line in out) == 1  # the count, said once
    assert len(FLOWER_NOISE) == 3


def test_a_temporary_home_is_removed_after_success(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def succeed(home):
        seen.append(home)
        (home / "superlink.log").write_text("fine")
        return 0

    assert scratch_home("fedsms-x-", succeed) == 0
    assert seen[0].parent == tmp_path and not seen[0].exists()


@pytest.mark.parametrize("outcome", ["exit code", "error"])
def test_a_temporary_home_is_kept_and_named_after_a_failure(tmp_path, monkeypatch, capsys, outcome):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def fail(home):
        seen.append(home)
        if outcome == "error":
            raise RuntimeError("the SuperLink died")
        return 1

    if outcome == "error":
        with pytest.raises(RuntimeError):
            scratch_home("fedsms-x-", fail)
    else:
        assert scratch_home("fedsms-x-", fail) == 1
    assert seen[0].is_dir() and str(seen[0]) in capsys.readouterr().err


def test_a_home_the_user_gave_is_never_removed(tmp_path):
    given = tmp_path / "mine"
    given.mkdir()
    assert scratch_home("fedsms-x-", lambda home: 0 if home == given else 1, given) == 0
    assert given.is_dir()
