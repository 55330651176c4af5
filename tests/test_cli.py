"""The main job: ``posterior demo`` runs end to end and writes its results."""

import subprocess
import sys

import diagnostics


def test_demo_writes_datatree_figure_and_summary(tmp_path):
    output = tmp_path / "demo"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "posterior",
            "demo",
            "--output",
            str(output),
            "--num-particles",
            "200",
            "--num-chains",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    for name in ("posterior.nc", "particles.pt", "figure.png", "summary.txt"):
        assert (output / name).stat().st_size > 0
    tree = diagnostics.load_datatree(output / "posterior.nc")
    assert tree["posterior"]["x"].shape == (2, 200, 8)
    assert "noise floor" in completed.stdout and "closed form" in completed.stdout


def test_unknown_command_fails_with_usage():
    completed = subprocess.run(
        [sys.executable, "-m", "posterior", "bogus"], capture_output=True, text=True
    )
    assert completed.returncode == 2 and "usage" in completed.stderr
