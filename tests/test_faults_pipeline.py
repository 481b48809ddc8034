"""Fault injection for the stage runner, the pipeline and the grid (issue 16 items 1, 5, 14, 18, 19, 20; issue 11's
stage registry, one `parse_value` and declared mIoU units). Each test failed on the code before the fix. Fast: toy
notebooks (a few seconds of kernel start-up each) and no training."""
import ast
import json
from pathlib import Path

import pytest

from weaktr.core import REPO_ROOT

RUN_NBS = sorted((REPO_ROOT / "nbs" / "runs").glob("*.ipynb"))


def _parameters_source(nb: Path) -> str:
    cells = json.loads(nb.read_text())["cells"]
    return next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))


@pytest.mark.parametrize("nb", RUN_NBS, ids=lambda p: p.stem)
def test_papermill_inspection_sees_every_parameter(nb):
    "Item 18: papermill 2.7 drops a parameter whose comment holds '=' (a spurious 'unknown parameter' warning)."
    import papermill as pm
    declared = [n.target.id for n in ast.parse(_parameters_source(nb)).body if isinstance(n, ast.AnnAssign)]
    seen = pm.inspect_notebook(str(nb))
    assert declared and [k for k in declared if k not in seen] == [], f"{nb.name}: papermill does not see these parameters"
