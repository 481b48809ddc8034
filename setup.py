"""setup.py for weaktr, reading settings.ini (the nbdev 2 template, trimmed)."""
from configparser import ConfigParser
from pathlib import Path
import shutil

import setuptools
from setuptools.command.build_py import build_py

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]


class build_py_with_run_notebooks(build_py):
    """Also copy the run notebooks (nbs/runs/*.ipynb) into the package as weaktr/runs/: an installed weaktr runs the
    pipeline."""
    def run(self):
        super().run()
        src, dst = Path("nbs") / "runs", Path(self.build_lib) / cfg["lib_path"] / "runs"
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            for nb in sorted(src.glob("*.ipynb")): shutil.copy2(nb, dst / nb.name)


setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    license="Apache-2.0",
    author=cfg["author"],
    author_email=cfg["author_email"],
    packages=setuptools.find_packages(include=["weaktr", "weaktr.*"]),
    include_package_data=True,
    package_data={"weaktr": ["assets/*", "runs/*.ipynb"]},
    cmdclass={"build_py": build_py_with_run_notebooks},
    install_requires=cfg.get("requirements", "").split(),
    extras_require={"dev": cfg.get("dev_requirements", "").split()},
    python_requires=">=" + cfg["min_python"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={"nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
