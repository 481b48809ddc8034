"""README.md from nbs/index.ipynb (what nbdev_readme does, without Quarto): `./kit readme` (also run by `./kit export`).

    python tools/readme.py            # execute nbs/index.ipynb and write README.md
    python tools/readme.py --check    # exit 1 if README.md differs from what index.ipynb generates
    python tools/readme.py --stdout   # print it

The notebook is executed in-process with execnb (nbdev's own executor), in `nbs/` like `nbdev_test`. Then:
markdown cells are copied (links and image paths made relative to the repository root); code cells appear as
```python blocks followed by their outputs — text in a plain block, `text/markdown` (a table read from a committed
result file, say) as markdown. nbdev directives apply: `#| hide` drops a cell, `#| echo: false` keeps only its
output, `#| output: false` only its code. So README.md can never drift from index.ipynb: `tests/test_docs.py` checks
that they agree.
"""
from __future__ import annotations

import os, posixpath, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
INDEX = NBS / "index.ipynb"
README = ROOT / "README.md"
HEADER = "<!-- generated from nbs/index.ipynb by tools/readme.py (./kit readme): edit the notebook, not this file -->\n"
DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def _directives(src: str) -> tuple[dict, str]:
    lines, found = src.splitlines(), {}
    while lines and (m := DIRECTIVE.match(lines[0])):
        found[m.group(1)] = m.group(2).strip().lower()
        lines.pop(0)
    return found, "\n".join(lines)


def _fix_path(target: str) -> str:
    "A link target relative to nbs/ -> relative to the repository root (URLs, anchors and absolute paths unchanged)."
    if re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target, re.I): return target
    path, frag = (target.split("#", 1) + [""])[:2]
    fixed = posixpath.normpath(posixpath.join("nbs", path)) if path else ""
    return fixed + (f"#{frag}" if frag else "")


def fix_links(md: str) -> str:
    "Markdown links/images and HTML src/href attributes: relative to nbs/ -> relative to the repository root."
    md = re.sub(r"(!?\[[^\]\n]*\]\()([^)\s]+)(\))", lambda m: m.group(1) + _fix_path(m.group(2)) + m.group(3), md)
    return re.sub(r'((?:src|href)=")([^"]+)(")', lambda m: m.group(1) + _fix_path(m.group(2)) + m.group(3), md)


def _outputs(outputs: list) -> list[str]:
    out, text = [], []
    def flush():
        if text: out.append("```\n" + "".join(text).rstrip("\n") + "\n```")
        text.clear()
    for o in outputs:
        kind = o.get("output_type")
        if kind == "stream":
            text.append("".join(o.get("text", "")))
            continue
        if kind == "error":
            raise RuntimeError(f"nbs/index.ipynb raised {o.get('ename')}: {o.get('evalue')}")
        data = o.get("data", {})
        if "text/markdown" in data:
            flush()
            out.append(fix_links("".join(data["text/markdown"]).strip()))
        elif "text/plain" in data:
            text.append("".join(data["text/plain"]) + "\n")
    flush()
    return out


def execute(nb):
    "Run the notebook's cells in-process (execnb, cwd nbs/ like nbdev_test), outputs stored in the cells."
    from execnb.shell import CaptureShell
    cwd, env_backend = os.getcwd(), os.environ.get("MPLBACKEND")
    os.chdir(NBS)
    os.environ["MPLBACKEND"] = "Agg"
    sys.path.insert(0, str(ROOT))
    try:
        CaptureShell().run_all(nb, exc_stop=True)
    finally:
        os.chdir(cwd)
        if env_backend is None: os.environ.pop("MPLBACKEND", None)
        else: os.environ["MPLBACKEND"] = env_backend
    return nb


def render(nb_path: Path = INDEX, run: bool = True) -> str:
    "The README text index.ipynb generates."
    from execnb.nbio import read_nb
    nb = read_nb(nb_path)
    if run: execute(nb)
    parts = []
    for c in nb.cells:
        src = "".join(c.source) if isinstance(c.source, list) else c.source
        if c.cell_type == "markdown":
            parts.append(fix_links(src.strip()))
            continue
        if c.cell_type != "code": continue
        d, body = _directives(src)
        if "hide" in d or "default_exp" in d or d.get("include") == "false": continue
        if d.get("echo") != "false" and body.strip(): parts.append("```python\n" + body.strip("\n") + "\n```")
        if d.get("output") != "false": parts += _outputs(c.get("outputs", []))
    return HEADER + "\n" + "\n\n".join(p for p in parts if p) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--stdout" in argv:
        print(text, end="")
        return 0
    if "--check" in argv:
        if README.exists() and README.read_text() == text:
            print("README.md matches nbs/index.ipynb")
            return 0
        print("README.md differs from what nbs/index.ipynb generates: run ./kit readme")
        return 1
    changed = not README.exists() or README.read_text() != text
    if changed: README.write_text(text)
    print(f"README.md {'written' if changed else 'unchanged'} from nbs/index.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
