"""Point every reference to the external method specification ("spec §x") at the kit's own method notes.

    python tools/spec_refs.py                 # rewrite nbs/ (notebooks) and configs/, tests/, bench/ (text files)
    python tools/spec_refs.py --check         # only list what would change; exit 1 if anything would
    python tools/spec_refs.py PATH ...        # other notebooks / folders / text files
    ./kit export                              # then regenerate weaktr/ from the rewritten notebooks

The specification the kit was written from (`weaktr-method.md`) is not part of the repository; the kit's own account
of the method is `nbs/method_notes.ipynb`, whose sections carry stable anchors (`<a id="gc-loss"></a>`). `SECTIONS`
maps each section number of the specification to the anchor of the notes' section that covers it; its pitfall list
keeps the specification's numbering (§8 item n -> `pitfall-n`).

What is rewritten, in notebook markdown cells (links) and everywhere else (plain text):

| found | markdown cell | code cell, .py, .yaml |
|---|---|---|
| `spec §5.4` | `method notes [§gc-loss](method_notes.ipynb#gc-loss)` | `method notes §gc-loss` |
| `§3.1` (bare) | `[§phase1-data](method_notes.ipynb#phase1-data)` | `§phase1-data` |
| `spec §4.3–4.5` | the three sections, linked | `method notes §bg-threshold, §label-crf, §miou` |
| `spec §8 item 4`, `§8.4` | `method notes [pitfall 4](method_notes.ipynb#pitfall-4)` | `method notes pitfall 4` |
| `spec: weaktr-method.md` | `method notes` | `method notes` |
| `pitfall 23`, `pitfalls 9, 17` | each number linked to `#pitfall-n` | unchanged |

Inline code spans and fenced code in markdown get the plain form. Running it twice changes nothing (no `§<digit>`
is left after the first run). Notebooks are written the way nbdev writes them (sorted keys, indent 1).
"""
from __future__ import annotations

import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTES = "method_notes.ipynb"

# specification section -> method-notes anchor (nbs/method_notes.ipynb)
SECTIONS = {
    "0": "versions",
    "1": "data", "1.1": "voc", "1.2": "coco",
    "2": "cam-net", "2.1": "backbone", "2.2": "pos-embed", "2.3": "block-out", "2.4": "predictions", "2.5": "aaf",
    "2.6": "attn-types", "2.7": "detach", "2.8": "mlsm-loss", "2.9": "imagenet-init",
    "3": "phase1", "3.1": "phase1-data", "3.2": "phase1-optim", "3.3": "phase1-select",
    "4": "pseudo", "4.1": "cam-gen", "4.2": "cam-files", "4.3": "bg-threshold", "4.4": "label-crf", "4.5": "miou",
    "5": "phase2", "5.1": "segmenter", "5.2": "phase2-data", "5.3": "phase2-optim", "5.4": "gc-loss",
    "5.5": "phase2-val", "5.6": "final-eval", "5.7": "phase2-recipe", "5.8": "phase2-backbones", "5.9": "seed-era",
    "6": "checkpoints", "6.1": "ckpt-phase1", "6.2": "ckpt-phase2",
    "7": "results", "7.1": "results", "7.2": "results",
    "8": "pitfalls",
    "9": "kit-map",
}
DEFAULT_TARGETS = ["nbs", "configs", "tests", "bench"]
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".txt", ".ini", ".cfg"}

NUM = r"\d+(?:\.\d+)?"
REF = re.compile(
    rf"(?P<spec>\b[Ss]pec(?:ification)?(?::\s*weaktr-method\.md)?\s+)?§\s?(?P<a>{NUM})(?!\.\d)"
    rf"(?P<range>\s?[–-]\s?§?(?P<b>{NUM}))?(?P<item>\s+items?\s+(?P<n>\d+))?")
SPEC_WORD = re.compile(r"\bspec(?:ification)?:\s*weaktr-method\.md\b|\bweaktr-method\.md\b")
PITFALL = re.compile(r"(?<![\[\w-])(?P<word>[Pp]itfalls?)\s+(?P<nums>\d+(?:(?:,\s*|\s+and\s+|/)\d+)*)(?![\]\w])")
CODE_SPAN = re.compile(r"(```.*?```|`[^`\n]*`)", re.S)


def _order(sec: str) -> tuple:
    return tuple(int(x) for x in sec.split("."))


def sections_between(a: str, b: str) -> list[str]:
    "Specification sections a..b inclusive, in order (`4.3`–`4.5` -> 4.3, 4.4, 4.5; `5.1`–`5.5`; `2`–`2.2`)."
    if "." not in b and "." in a: b = f"{a.split('.')[0]}.{b}" if int(b) > int(a.split('.')[1]) else b
    keys = sorted(SECTIONS, key=_order)
    lo, hi = _order(a), _order(b)
    return [k for k in keys if lo <= _order(k) <= hi and (len(_order(k)) == len(lo) or k == a)] or [a, b]


def _targets(m) -> list[tuple[str, str]]:
    "(label, anchor) pairs one reference stands for."
    a = m.group("a")
    if m.group("n") is not None and a == "8":                    # spec §8 item n
        return [(f"pitfall {m.group('n')}", f"pitfall-{m.group('n')}")]
    if a.startswith("8.") and a != "8":                          # §8.n = pitfall n
        n = a.split(".")[1]
        return [(f"pitfall {n}", f"pitfall-{n}")]
    secs = sections_between(a, m.group("b")) if m.group("b") else [a]
    out = []
    for s in secs:
        if s not in SECTIONS:
            raise KeyError(f"§{s}: no method-notes anchor for specification section {s} (add it to SECTIONS)")
        anchor = SECTIONS[s]
        if not out or out[-1][1] != anchor: out.append((f"§{anchor}", anchor))
    return out


def _tail(m) -> str:
    "Text matched after the section numbers that must be kept (an 'item n' that was not consumed as a pitfall)."
    return m.group("item") if (m.group("item") and m.group("a") != "8") else ""


def _pre(m) -> str:
    "'spec ' -> 'method notes ' ('Spec ' -> 'Method notes ')."
    return "" if not m.group("spec") else ("Method notes " if m.group("spec")[0] == "S" else "method notes ")


MAX_LINE = 120                                                 # the kit's line length


def plain(text: str) -> str:
    "Rewrite references as plain text (code, comments, docstrings, YAML), line by line."
    def line(l, prefix):
        sub = lambda m: (_pre(m) if prefix else "") + ", ".join(label for label, _ in _targets(m)) + _tail(m)
        return SPEC_WORD.sub("method notes" if prefix else "notes", REF.sub(sub, l))
    out = []
    for l in text.split("\n"):
        new = line(l, True)
        if len(new) > MAX_LINE: new = line(l, False)                           # "§gc-loss" alone: still unique
        out.append(new)
    return "\n".join(out)


def linked(text: str, notes_href: str) -> str:
    "Rewrite references in markdown as links to the notes (code spans get the plain form); link pitfall numbers."
    def sub(m):
        return _pre(m) + ", ".join(f"[{label}]({notes_href}#{anchor})" for label, anchor in _targets(m)) + _tail(m)

    def pit(m):
        nums = re.sub(r"\d+", lambda k: f"[{k.group(0)}]({notes_href}#pitfall-{k.group(0)})", m.group("nums"))
        if re.fullmatch(r"\d+", m.group("nums")):
            return f"[{m.group('word')} {m.group('nums')}]({notes_href}#pitfall-{m.group('nums')})"
        return f"{m.group('word')} {nums}"

    def prose(t):
        t = REF.sub(sub, t)
        t = SPEC_WORD.sub("method notes", t)
        return _outside_links(t, lambda s: PITFALL.sub(pit, s))

    parts = CODE_SPAN.split(text)
    return "".join(plain(p) if i % 2 else prose(p) for i, p in enumerate(parts))


def _outside_links(text: str, f) -> str:
    "Apply f to the parts of markdown text that are not inside [..](..) links."
    pieces = re.split(r"(\[[^\]\n]*\]\([^)\s]*\))", text)
    return "".join(p if i % 2 else f(p) for i, p in enumerate(pieces))


def notes_href(nb: Path) -> str:
    "Relative link from a notebook to the method notes."
    nbs = ROOT / "nbs"
    rel = Path(*([".."] * (len(nb.resolve().relative_to(nbs.resolve()).parts) - 1)),
               NOTES) if nb.resolve().is_relative_to(
        nbs.resolve()) else Path(NOTES)
    return "" if nb.name == NOTES and nb.parent.resolve() == nbs.resolve() else rel.as_posix()


def _title_cell(nb) -> int:
    """Index of the cell holding the notebook's `# Title` and `> subtitle` (nbdev makes the subtitle the module
    docstring)."""
    return next((i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown"
                 and "".join(c["source"]).lstrip().startswith("# ")), -1)


def _rewrite_cell(kind: str, src: str, href: str, first: bool = False) -> str:
    if kind != "markdown": return plain(src)
    if not first: return linked(src, href)
    return "\n".join(plain(l) if l.startswith(">") else linked(l, href) for l in src.split("\n"))


def rewrite_notebook(path: Path) -> bool:
    text = path.read_text()
    nb = json.loads(text)
    href = notes_href(path)
    for i, c in enumerate(nb["cells"]):
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        new = _rewrite_cell(c["cell_type"], src, href, first=i == _title_cell(nb))
        if new != src:
            c["source"] = new.splitlines(keepends=True) if isinstance(c["source"], list) else new
    out = json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    if json.loads(out) == json.loads(text): return False
    path.write_text(out)
    return True


def rewrite_text(path: Path) -> bool:
    text = path.read_text()
    new = plain(text)
    if new == text: return False
    path.write_text(new)
    return True


SKIP_MARK = "spec_refs: skip"                                # a file holding this text is left alone (tests)


def files(targets) -> list[Path]:
    out = []
    for t in targets:
        p = (ROOT / t) if not Path(t).is_absolute() else Path(t)
        if p.is_file(): out.append(p)
        elif p.is_dir():
            out += [f for f in sorted(p.rglob("*")) if f.is_file() and ".ipynb_checkpoints" not in f.parts
                    and (f.suffix == ".ipynb" or f.suffix in TEXT_SUFFIXES) and f.name != Path(__file__).name]
    return [f for f in out if SKIP_MARK not in f.read_text(errors="replace")]


def remaining(paths) -> list[str]:
    "Lines that still hold a numbered section reference ('spec §', '§<digit>') in the given files: 'file:line: text'."
    out = []
    for f in files(paths):
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            if re.search(r"(?i)spec(?:ification)?\s*§|§\s?\d", line):
                out.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    return out


def _code_lines(f: Path) -> list[str]:
    "Lines of code: a notebook's code cells, or a text file."
    if f.suffix != ".ipynb": return f.read_text().splitlines()
    nb = json.loads(f.read_text())
    return [l for c in nb["cells"] if c["cell_type"] == "code" for l in "".join(c["source"]).splitlines()]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in argv
    targets = [a for a in argv if a != "--check"] or DEFAULT_TARGETS
    changed = []
    for f in files(targets):
        if check:
            text = f.read_text()
            if f.suffix == ".ipynb":
                nb = json.loads(text)
                href = notes_href(f)
                srcs = [("".join(c["source"]) if isinstance(c["source"], list) else c["source"]) for c in nb["cells"]]
                if any(_rewrite_cell(c["cell_type"], s, href, i == _title_cell(nb)) != s
                       for i, (c, s) in enumerate(zip(nb["cells"], srcs))):
                    changed.append(f)
            elif plain(text) != text: changed.append(f)
            continue
        try:
            if (rewrite_notebook(f) if f.suffix == ".ipynb" else rewrite_text(f)): changed.append(f)
        except KeyError as e:                                   # an unknown section: say where, change nothing there
            print(f"{f.relative_to(ROOT)}: {e.args[0]}")
    verb = "would change" if check else "rewrote"
    for f in changed: print(f"{verb} {f.relative_to(ROOT)}")
    print(f"spec_refs: {verb} {len(changed)} file(s)" + ("" if check or not any(f.suffix == ".ipynb" for f in changed)
                                                        else "; now run ./kit export to regenerate weaktr/"))
    long = [f"{f.relative_to(ROOT)}: {l.strip()[:80]}…" for f in changed if f.suffix != ".ipynb" or True
            for l in _code_lines(f) if len(l) > 120 and "method notes" in l]
    if long and not check: print("lines now over 120 characters (shorten by hand):\n  " + "\n  ".join(long))
    left = remaining(targets)
    if left: print("still numbered (not rewritten):\n  " + "\n  ".join(left))
    return 1 if (check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
