"""The package stands alone (issue 11): the built wheel, installed into a fresh virtual environment that reuses the
installed dependencies (`python -m venv --system-site-packages`), runs `python -m weaktr.pipeline --quick` from an
empty directory, without the checkout on any path: the run notebooks ship inside the package (`weaktr/runs/`), the
runs go to `./runs` of the working directory. (~3-4 min on a 2-core CPU: the quick pipeline without the ablation.)"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from weaktr.core import REPO_ROOT

BUILD_FILES = ("setup.py", "settings.ini", "README.md", "MANIFEST.in")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WEAKTR_RUNS", "VIRTUAL_ENV")}
    return {**env, "MPLBACKEND": "Agg", **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    "Build the wheel from a copy of the build inputs (nothing is written into the checkout)."
    if not (REPO_ROOT / "setup.py").is_file(): pytest.skip("not a source checkout")
    src = tmp_path_factory.mktemp("src")
    for f in BUILD_FILES: shutil.copy2(REPO_ROOT / f, src / f)
    shutil.copytree(REPO_ROOT / "weaktr", src / "weaktr", ignore=shutil.ignore_patterns("__pycache__", "tmp_*"))
    shutil.copytree(REPO_ROOT / "nbs" / "runs", src / "nbs" / "runs")
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                        str(dist),
                        str(src)], capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = dist.glob("weaktr-*.whl")
    return whl


def test_wheel_ships_the_run_notebooks_and_assets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    runs = {Path(n).name for n in names if n.startswith("weaktr/runs/")}
    assert runs == {p.name for p in (REPO_ROOT / "nbs" / "runs").glob("*.ipynb")}, runs
    assert any(n.startswith("weaktr/assets/") and n.endswith(".safetensors") for n in names)


def test_installed_wheel_runs_the_quick_pipeline_from_an_empty_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # reuse this environment's installed dependencies: when this interpreter is itself a venv, --system-site-packages
    # only reaches the base interpreter's, so its site-packages go on the new venv's path too (appended: the wheel wins)
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True,
                             text=True, check=True, timeout=120).stdout.strip()
    # sys.path, not site.getsitepackages(): under the checkout's thin .venv (tools/thin_venv.py) the packages live in
    # the shared venv, which the thin venv reaches through a .pth line (and a .pth line's own .pth files are not read)
    deps = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    Path(purelib, "_weaktr_test_deps.pth").write_text("\n".join(deps) + "\n")
    r = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], capture_output=True,
                       text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    work = tmp_path / "empty"
    work.mkdir()
    env = _env(PATH=str(venv / "bin") + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run([str(py), "-c", "import weaktr, weaktr.grid as g; print(weaktr.__file__); "
                                       "print(g.runs_notebook_dir())"],
                       cwd=work, capture_output=True, text=True, timeout=300, env=env)
    pkg_file, nb_dir = r.stdout.split()
    assert Path(pkg_file).is_relative_to(venv) and Path(nb_dir) == Path(pkg_file).parent / "runs", r.stdout + r.stderr
    r = subprocess.run([str(py), "-m", "weaktr.pipeline", "--quick", "--no-ablation", "--threads", "1", "--device",
                        "cpu"],
                       cwd=work, capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    run_dir = work / "runs" / "demo"
    assert (run_dir / "summary.json").is_file() and (run_dir / "05_evaluate" / "evaluate.ipynb").is_file()
    assert "without encryption" not in r.stdout + r.stderr
