"""A thin per-checkout virtual environment on top of the one shared, heavy environment (`./kit setup` calls this).

    python tools/thin_venv.py SHARED_VENV [CHECKOUT]      # makes CHECKOUT/.venv (default CHECKOUT: this file's repo)

Why: the pinned dependencies (torch, jupyter, ...; ~6 GB) are installed once per requirements hash under
~/.cache/weaktr/venvs and reused by every clone. An editable install of `weaktr` into that shared venv would point
it at whichever clone ran setup last, so a kernel started without PYTHONPATH would silently run another clone's code.
Instead each checkout gets `.venv`, a real venv made with `python -m venv --without-pip` (no packages, < 1 s) whose
site-packages holds:

* `_weaktr_thin.pth`: this checkout's root first (so `import weaktr` is this checkout's), then the shared venv's
  site-packages, whose own `.pth` files are processed except a stale editable `weaktr` of another clone;
* a `weaktr-<version>.dist-info` (metadata + the `nbdev` entry point an editable install would have given);
* `bin/` copies of the shared venv's console scripts (`jupyter`, `papermill`, `nbdev_*`, `pytest`, ...) that run
  the thin venv's python;
* `share/jupyter/kernels/python3`: the kernel spec `python3` pointing at `.venv/bin/python`, so JupyterLab, papermill
  or nbclient started from `.venv` run this checkout's code; the rest of the shared `share/jupyter` and
  `etc/jupyter` (JupyterLab's app dir, widget extensions, server extensions) is linked.

Nothing is written outside the checkout's `.venv`; the shared venv is only read.
"""
from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MARK = ".weaktr-thin"          # file in a thin venv: which shared venv and checkout it was made for
PTH = "_weaktr_thin.pth"
SKIP_PTH = ("__editable__.weaktr", "weaktr")   # .pth files of the shared venv that would import another clone
VENV_OWN = ("python", "activate", "Activate.ps1", "pip")


def site_packages(venv) -> Path:
    "The venv's lib/pythonX.Y/site-packages (exactly one expected)."
    found = sorted(Path(venv).glob("lib/python3*/site-packages"))
    if len(found) != 1:
        raise FileNotFoundError(f"{venv}: expected one lib/python3.*/site-packages, found {[str(p) for p in found]}")
    return found[0]


def shared_venv_of(prefix=None) -> Path:
    "The shared venv behind an environment prefix (a thin venv names it in its marker; any other venv is its own)."
    prefix = Path(prefix or sys.prefix)
    mark = prefix / MARK
    return Path(json.loads(mark.read_text())["shared"]) if mark.is_file() else prefix


def _version(checkout: Path) -> str:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(checkout / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"].get("version", "0") if "DEFAULT" in cfg else "0"


def _write(path: Path, text: str, mode: int | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if mode is not None: os.chmod(tmp, mode)
    os.replace(tmp, path)


def _link(src: Path, dst: Path):
    if dst.is_symlink() or dst.is_file(): dst.unlink()
    elif dst.is_dir(): shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src, target_is_directory=src.is_dir())


def make_thin_venv(shared,            # the shared venv holding the dependencies (e.g. ~/.cache/weaktr/venvs/<hash>)
                   checkout,          # the checkout whose weaktr this venv imports
                   dest=None,         # default: <checkout>/.venv
                  ) -> Path:
    "Create or refresh the thin venv `dest` for `checkout` on top of `shared`; returns dest."
    shared, checkout = Path(shared).resolve(), Path(checkout).resolve()
    dest = Path(dest) if dest is not None else checkout / ".venv"
    shared_py = shared / "bin" / "python"
    if not shared_py.exists(): raise FileNotFoundError(f"shared venv {shared}: no bin/python")
    if not (checkout / "weaktr" / "__init__.py").is_file():
        raise FileNotFoundError(f"{checkout} is not a weaktr checkout (no weaktr/__init__.py)")
    want = dict(shared=str(shared), checkout=str(checkout))
    if dest.is_symlink(): dest.unlink()                       # the old kit's link to the shared venv (target untouched)
    elif dest.exists():
        if not (dest / MARK).is_file():
            raise FileExistsError(f"{dest} exists and was not made by ./kit (no {MARK}): move it away, then rerun "
                                  "./kit setup")
        if json.loads((dest / MARK).read_text()) != want or not (dest / "bin" / "python").exists():
            shutil.rmtree(dest)                                       # made for another shared venv or checkout: remake
    if not (dest / "bin" / "python").exists():
        subprocess.run([str(shared_py), "-m", "venv", "--without-pip", str(dest)], check=True)
    dest = dest.resolve()
    site, shared_site = site_packages(dest), site_packages(shared)

    # sys.path: this checkout, then the shared packages (their .pth files too, except another clone's editable weaktr)
    _write(site / "_weaktr_thin.py",
           f'''"Added by tools/thin_venv.py: the shared venv's packages behind this checkout's weaktr."
import os, site, sys
SHARED_SITE = {str(shared_site)!r}
SKIP = {SKIP_PTH!r}

def add_shared():
    known = {{os.path.normcase(os.path.abspath(p)) for p in sys.path}}
    if os.path.normcase(SHARED_SITE) not in known: sys.path.append(SHARED_SITE)
    for name in sorted(os.listdir(SHARED_SITE)):
        if name.endswith(".pth") and not name.startswith(SKIP):
            site.addpackage(SHARED_SITE, name, known)

add_shared()
''')
    _write(site / PTH, f"{checkout}\nimport _weaktr_thin\n")

    # package metadata as an editable install would give it (the nbdev entry point finds weaktr._modidx)
    for old in site.glob("weaktr-*.dist-info"): shutil.rmtree(old)
    di = site / f"weaktr-{_version(checkout)}.dist-info"
    _write(di / "METADATA", f"Metadata-Version: 2.1\nName: weaktr\nVersion: {_version(checkout)}\n")
    _write(di / "entry_points.txt", "[nbdev]\nweaktr = weaktr._modidx:d\n")
    _write(di / "INSTALLER", "weaktr-thin-venv\n")
    _write(di / "direct_url.json", json.dumps(dict(url=checkout.as_uri(), dir_info=dict(editable=True))) + "\n")
    _write(di / "RECORD", "")

    # console scripts that run the thin python
    for src in sorted((shared / "bin").iterdir()):
        if src.name.startswith(VENV_OWN) or not src.is_file() or src.is_symlink(): continue
        try: head = src.read_bytes()[:512]
        except OSError: continue
        if not head.startswith(b"#!") or str(shared / "bin" / "python").encode() not in head: continue
        old, new = str(shared / "bin" / "python"), str(dest / "bin" / "python")
        text = src.read_text(errors="surrogateescape").replace(old, new)
        _write(dest / "bin" / src.name, text, 0o755)

    # Jupyter: our own python3 kernel spec; everything else of the shared share/jupyter and etc/jupyter linked
    sj = shared / "share" / "jupyter"
    if sj.is_dir():
        for entry in sj.iterdir():
            if entry.name != "kernels": _link(entry, dest / "share" / "jupyter" / entry.name)
    if (shared / "etc" / "jupyter").is_dir(): _link(shared / "etc" / "jupyter", dest / "etc" / "jupyter")
    kdir = dest / "share" / "jupyter" / "kernels" / "python3"
    kdir.mkdir(parents=True, exist_ok=True)
    for logo in (sj / "kernels" / "python3").glob("logo-*"): shutil.copyfile(logo, kdir / logo.name)
    _write(kdir / "kernel.json", json.dumps(dict(
        argv=[str(dest / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name=f"Python 3 (weaktr: {checkout.name})", language="python",
        metadata=dict(debugger=True)), indent=1) + "\n")
    _write(dest / MARK, json.dumps(want) + "\n")
    return dest


if __name__ == "__main__":
    if not 2 <= len(sys.argv) <= 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1])
        sys.exit(2)
    try:
        d = make_thin_venv(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else Path(__file__).resolve().parents[1])
    except (FileNotFoundError, FileExistsError, subprocess.CalledProcessError) as e:
        print(f"weaktr: could not make the checkout's thin venv: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"== weaktr: {d} (this checkout's python, on top of {Path(sys.argv[1]).resolve()})")
