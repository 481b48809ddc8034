"""Each checkout imports its own weaktr whatever starts Python or the kernel, on one shared set of dependencies
(issue 16, item 15): thin per-checkout venvs (tools/thin_venv.py, called by ./kit setup), and a CheckoutWarning when
weaktr comes from another checkout than the working directory's."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("thin_venv", REPO / "tools" / "thin_venv.py")
thin_venv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(thin_venv)
SHARED = thin_venv.shared_venv_of(sys.prefix)          # the venv that holds the dependencies of this test run


def _clone(dst: Path, extra=()) -> Path:
    "A minimal checkout copy: settings.ini, the weaktr package, tools/ (+ extra files)."
    dst.mkdir(parents=True)
    for name in ("settings.ini", *extra): shutil.copy2(REPO / name, dst / name)
    for d in ("weaktr", "tools"): shutil.copytree(REPO / d, dst / d, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _env():
    "No PYTHONPATH, no venv activation: what JupyterLab or papermill started by hand would see."
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = "/usr/bin:/bin"
    return env


def _py(checkout: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(checkout / ".venv" / "bin" / "python"), "-c", code], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_checkouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("clones")
    a, b = _clone(root / "a"), _clone(root / "b")
    for c in (a, b): thin_venv.make_thin_venv(SHARED, c)
    return a, b


def test_each_checkout_imports_its_own_weaktr(two_checkouts):
    a, b = two_checkouts
    for c in (a, b):
        venv = c / ".venv"
        assert venv.is_dir() and not venv.is_symlink()
        for cwd in (c, c / "tools", Path("/")):                    # from the checkout, a subfolder, or anywhere
            r = _py(c, "import weaktr, importlib.metadata as m; print(weaktr.__file__); "
                       "print([e.value for e in m.entry_points(group='nbdev') if e.name == 'weaktr'])", cwd)
            assert r.returncode == 0, r.stderr
            lines = r.stdout.splitlines()
            assert lines[0] == str(c / "weaktr" / "__init__.py"), (cwd, lines)
            assert lines[1] == "['weaktr._modidx:d']"              # the nbdev entry point an editable install gave
        r = _py(c, "import numpy, torch; print(torch.__file__)", c)    # the heavy packages come from the shared venv
        assert r.returncode == 0 and r.stdout.strip().startswith(str(SHARED)), r.stderr
    assert not (thin_venv.site_packages(a / ".venv") / "torch").exists()   # thin: nothing installed twice


def test_scripts_and_kernel_spec_run_the_checkouts_python(two_checkouts):
    a, _ = two_checkouts
    for script in ("jupyter", "papermill", "nbdev_export", "pytest"):
        first = (a / ".venv" / "bin" / script).read_text().splitlines()[0]
        assert first == f"#!{a / '.venv' / 'bin' / 'python'}" or str(a / ".venv") in first, (script, first)
    r = _py(a, "from jupyter_client.kernelspec import KernelSpecManager as K; "
               "print(K().get_kernel_spec('python3').argv[0])", a)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(a / ".venv" / "bin" / "python")


def test_a_kernel_started_from_the_thin_venv_runs_this_checkouts_code(two_checkouts):
    "A real kernel (jupyter_client, kernel spec python3), as JupyterLab or papermill started from .venv would start it."
    a, b = two_checkouts
    code = textwrap.dedent("""
        from jupyter_client.manager import start_new_kernel
        km, kc = start_new_kernel(kernel_name="python3", startup_timeout=300)
        out = []
        try:
            kc.execute_interactive("import weaktr; print(weaktr.__file__)", timeout=300,
                                   output_hook=lambda m: out.append(m["content"].get("text", "")))
        finally:
            kc.stop_channels(); km.shutdown_kernel(now=True)
        print("KERNEL:" + "".join(out).strip())
        """)
    for c in (a, b):
        r = _py(c, code, c)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"KERNEL:{c / 'weaktr' / '__init__.py'}" in r.stdout, r.stdout


def test_checkout_warning_when_weaktr_comes_from_another_checkout(two_checkouts):
    a, b = two_checkouts
    r = _py(a, "import weaktr.core", cwd=b / "tools")             # a's python, a folder of b (like a kernel in b/nbs)
    assert r.returncode == 0, r.stderr
    assert "CheckoutWarning" in r.stderr and str(b) in r.stderr and str(a / "weaktr") in r.stderr, r.stderr
    r = _py(a, "import weaktr.core", cwd=a)
    assert r.returncode == 0 and "CheckoutWarning" not in r.stderr, r.stderr


def test_thin_venv_refuses_a_foreign_venv_and_replaces_the_old_link(tmp_path):
    c = _clone(tmp_path / "c")
    (c / ".venv").mkdir()
    (c / ".venv" / "mine.txt").write_text("user's own venv")
    with pytest.raises(FileExistsError, match="not made by ./kit"):
        thin_venv.make_thin_venv(SHARED, c)
    assert (c / ".venv" / "mine.txt").read_text() == "user's own venv"
    shutil.rmtree(c / ".venv")
    (c / ".venv").symlink_to(SHARED)                              # what the old kit left: a link to the shared venv
    thin_venv.make_thin_venv(SHARED, c)
    assert not (c / ".venv").is_symlink() and (SHARED / "bin" / "python").exists()
    assert json.loads((c / ".venv" / thin_venv.MARK).read_text())["checkout"] == str(c.resolve())


def test_kit_setup_makes_the_thin_venv_and_leaves_the_shared_venv_alone(tmp_path):
    "./kit setup against a stand-in shared venv (it reuses this run's packages): no editable install into it."
    base = getattr(sys, "_base_executable", sys.executable)
    fake = tmp_path / "shared"
    subprocess.run([base, "-m", "venv", "--without-pip", str(fake)], check=True, env=_env())
    fake_site = thin_venv.site_packages(fake)
    (fake_site / "zz_real.pth").write_text(f"import site; site.addsitedir({str(thin_venv.site_packages(SHARED))!r})\n")
    (fake / ".weaktr-ok").touch()
    before = sorted(p.name for p in fake_site.iterdir())
    clone = _clone(tmp_path / "clone", extra=("kit", "requirements.txt", "constraints.lock", "setup.py"))
    (clone / ".venv").symlink_to(fake)                             # the old kit's link
    r = subprocess.run(["./kit", "setup"], cwd=clone, env={**_env(), "WEAKTR_VENV": str(fake)}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    # the shared venv got nothing (old kit: pip install -e)
    assert sorted(p.name for p in fake_site.iterdir()) == before
    assert not (clone / ".venv").is_symlink()
    r = _py(clone, "import weaktr; print(weaktr.__file__)", Path("/"))
    assert r.returncode == 0 and r.stdout.strip() == str(clone / "weaktr" / "__init__.py"), r.stderr
