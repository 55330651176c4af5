"""The main job: ``diffpost demo`` runs end to end and writes its results.

The demo runs in-process at small sizes (``--num-steps``); one run goes through the installed
console script in a subprocess, as a user would start it.
"""

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diffpost
from diffpost import diagnostics
from diffpost.cli import main

SMALL = ["--num-steps", "3", "--num-draws", "8", "--particles-per-filter", "4", "--quiet"]


def test_demo_writes_datatrees_figures_and_summary(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--output", str(output), *SMALL]) == 0
    printed = capsys.readouterr().out
    for name in ("mcgdiff", "dps", "daps"):
        assert (output / f"{name}.nc").stat().st_size > 0
        assert (output / f"{name}.png").stat().st_size > 0
    assert (output / "compare.png").stat().st_size > 0
    smc = diagnostics.load_datatree(output / "mcgdiff.nc")
    assert smc["posterior"]["x"].shape == (8, 4, 1, 8, 8)  # 8 filters of 4 particles
    assert "x" in smc["constant_data"]  # the truth, under the latent's name
    assert smc.attrs["inference_library"] == "diffpost"
    dps = diagnostics.load_datatree(output / "dps.nc")
    assert dps["posterior"]["x"].shape == (4, 2, 1, 8, 8)  # 4 chains of 8 // 4 draws
    assert dps["sample_stats"].sizes["step"] == 3  # --num-steps reached the engine
    summary = (output / "summary.txt").read_text()
    assert all(
        name in summary for name in ("MCGDiff", "DPS", "DAPS", "psnr", "coverage", "rank_coverage")
    )
    assert summary.strip() in printed


def test_console_script_runs_the_demo_end_to_end(tmp_path):
    """The installed ``diffpost`` command, in a subprocess started outside the repository."""
    script = shutil.which("diffpost", path=str(Path(sys.executable).parent))
    assert script is not None, "the diffpost console script is not installed beside python"
    completed = subprocess.run(
        [script, "demo", "--engines", "mcgdiff", "--output", "out", *SMALL],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "out" / "mcgdiff.nc").stat().st_size > 0
    assert "MCGDiff" in (tmp_path / "out" / "summary.txt").read_text()


def test_version_is_written_once():
    assert diffpost.__version__ == importlib.metadata.version("diffpost")
    completed = subprocess.run(
        [sys.executable, "-m", "diffpost", "--version"], capture_output=True, text=True, timeout=60
    )
    assert completed.stdout.strip() == f"diffpost {diffpost.__version__}"


def test_demo_refuses_an_unknown_engine(tmp_path):
    with pytest.raises(SystemExit, match="unknown engine"):
        main(["demo", "--engines", "nope", "--output", str(tmp_path)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bogus"], "invalid choice"),
        (["demo", "--num-steps", "0"], "--num-steps: must be a positive integer"),
        (["demo", "--num-draws", "-2"], "--num-draws: must be a positive integer"),
    ],
)
def test_bad_command_lines_fail_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "usage: diffpost" in error and message in error


def test_demo_restores_a_photograph_crop_with_the_patch_prior(tmp_path, capsys):
    output = tmp_path / "camera"
    argv = ["demo", "--problem", "camera", "--task", "inpaint", "--size", "48"]
    assert (
        main([*argv, "--output", str(output), "--num-steps", "2", "--num-draws", "4", "--quiet"])
        == 0
    )
    for name in ("ddrm", "pigdm"):
        tree = diagnostics.load_datatree(output / f"{name}.nc")
        assert tree["posterior"]["x"].shape[-3:] == (1, 48, 48)
        assert (output / f"{name}.png").stat().st_size > 0
    summary = (output / "summary.txt").read_text()
    assert "inpaint" in summary and "natural-image patch prior" in summary
    assert all(name in summary for name in ("DDRM", "PiGDM", "psnr", "coverage"))
    with pytest.raises(SystemExit, match="--task must be one of"):
        main(["demo", "--problem", "camera", "--task", "dehaze", "--output", str(output)])
    with pytest.raises(SystemExit, match="--size must be"):
        main(["demo", "--problem", "camera", "--size", "300", "--output", str(output)])
    with pytest.raises(SystemExit, match="unknown engine"):
        main(["demo", "--problem", "camera", "--engines", "mcgdiff", "--output", str(output)])
