"""The main job: ``posterior demo`` runs end to end and writes its results."""

import subprocess
import sys

import diagnostics


def test_demo_writes_datatrees_figures_and_summary(tmp_path):
    output = tmp_path / "demo"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "posterior",
            "demo",
            "--output",
            str(output),
            "--engines",
            "mcgdiff,dps",
            "--num-draws",
            "8",
            "--particles-per-filter",
            "4",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    for name in ("mcgdiff.nc", "dps.nc", "mcgdiff.png", "dps.png", "compare.png", "summary.txt"):
        assert (output / name).stat().st_size > 0
    smc = diagnostics.load_datatree(output / "mcgdiff.nc")
    assert smc["posterior"]["x"].shape == (8, 4, 1, 8, 8)  # 8 filters of 4 particles
    assert "x" in smc["constant_data"]  # the truth, under the latent's name
    dps = diagnostics.load_datatree(output / "dps.nc")
    assert dps["posterior"]["x"].shape == (4, 2, 1, 8, 8)  # 4 chains of 8 // 4 draws
    summary = (output / "summary.txt").read_text()
    assert "MCGDiff" in summary and "DPS" in summary and "psnr" in summary
    assert summary.strip() in completed.stdout


def test_demo_refuses_an_unknown_engine(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "posterior", "demo", "--engines", "nope", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert completed.returncode != 0 and "unknown engine" in completed.stderr


def test_unknown_command_fails_with_usage():
    completed = subprocess.run(
        [sys.executable, "-m", "posterior", "bogus"], capture_output=True, text=True
    )
    assert completed.returncode == 2 and "usage" in completed.stderr
