"""setup.py for weaktr, reading settings.ini (the nbdev 2 template, trimmed)."""
from configparser import ConfigParser
import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    license="Apache-2.0",
    author=cfg["author"],
    author_email=cfg["author_email"],
    packages=setuptools.find_packages(include=["weaktr", "weaktr.*"]),
    include_package_data=True,
    package_data={"weaktr": ["assets/*"]},
    install_requires=cfg.get("requirements", "").split(),
    extras_require={"dev": cfg.get("dev_requirements", "").split()},
    python_requires=">=" + cfg["min_python"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={"nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"]},
)
