"""The tutorial notebooks are committed clean and listed in their README.

Executing them is the job of ``pytest --nbmake tutorials`` (each notebook shrinks its sizes when
``CI`` is set); these checks are static and take milliseconds.
"""

import json
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))


def test_the_tutorials_are_numbered_in_order():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    assert len(NOTEBOOKS) == 8


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, f"{path.name} has no code cell"
    for number, cell in enumerate(code):
        assert cell.get("outputs") == [], f"{path.name}: code cell {number} has outputs"
        assert cell.get("execution_count") is None, f"{path.name}: code cell {number} was run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_a_ci_mode_and_is_listed(path):
    notebook = json.loads(path.read_text())
    source = "".join("".join(cell["source"]) for cell in notebook["cells"])
    assert 'SMOKE = "CI" in os.environ' in source, f"{path.name} has no small CI mode"
    assert f"]({path.name})" in (TUTORIALS / "README.md").read_text(), (
        f"{path.name} is not linked from tutorials/README.md"
    )
