"""Build the documentation site: `./kit docs [--quick | --no-exec] [--clean] [-j N]`.

Sphinx + MyST-NB render the notebooks of `nbs/` into `settings.ini`'s `doc_path` (`_docs/`). The pipeline:

1. **stage** (`stage()`): every notebook is copied into `_proc/` (a sibling of `nbs/`, so the notebooks see the same
   relative paths as under `nbs/`) with nbdev's cell directives turned into MyST-NB tags (`#| hide` -> removed cell,
   `#| eval: false` -> not executed, `#| echo: false` -> output only, ...), the docs' fast settings injected after a
   notebook's `parameters` cell (`DOCS_PARAMS`), an anchor and an "API" line at every exported definition, and a
   header on each run notebook (its papermill command and parameter table). The API reference (`api/*.md`, nbdev's
   `show_doc` of every name in `__all__`, each linking to the cell of the notebook that defines it) and the navigation
   (`index`'s toctree, in notebook order) are generated there too. Files are written only when their content changes,
   so Sphinx re-reads only what changed.
2. **execute once, reuse**: MyST-NB runs the notebooks through a jupyter-cache in `_proc/.cache/jupyter` keyed by each
   notebook's code: a rebuild re-executes only notebooks whose code changed (the run notebooks are recipes and are not
   executed; `--quick` executes only `QUICK_EXECUTE`, `--no-exec` nothing).
3. **build**: `sphinx-build -b html` with `docs/conf.py` (book theme, MathJax 2 from the `jupyter-server-mathjax`
   package copied into the site: no network at build or view time).

Prints the per-notebook execution times from the cache at the end (`--times` prints only those).
"""
from __future__ import annotations

import argparse, ast, configparser, hashlib, json, os, re, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
STAGE = ROOT / "_proc"                       # nbdev's processed-notebooks folder; depth 1, like nbs/
CACHE = STAGE / ".cache"
JCACHE = Path(os.environ.get("WEAKTR_DOCS_JCACHE", CACHE / "jupyter"))   # the execution cache

# Notebooks too slow at their defaults for every docs build get a fast setting here; each page says what it ran with.
# name: (parameters injected after the `parameters` cell, why)
DOCS_PARAMS: dict[str, tuple[dict, str]] = {
    "walkthrough.ipynb": ({"n_images": 12},
                          "12 images in the live experiments (default 16; the model is the default one, shared with "
                          "explore.ipynb: with `./kit demo` run first, the demo's Phase-1 checkpoint)"),
}
QUICK_EXECUTE = ("index.ipynb", "method_notes.ipynb", "03_head_fusion.ipynb", "07_decoder.ipynb")
RUNS = "runs"                                 # papermill run notebooks: recipes, not executed

# The sidebar, in notebook order: (caption, glob patterns relative to nbs/)
NAV = [("Method", ["method_notes.ipynb"]),
       ("Guides", ["walkthrough.ipynb", "explore.ipynb"]),
       ("Notebooks", ["[0-9][0-9]_*.ipynb", "[0-9][0-9][a-z]_*.ipynb"]),
       ("Run recipes (papermill)", ["runs/*.ipynb"])]

DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"]


def notebooks() -> list[Path]:
    "Every notebook the site shows: nbs/*.ipynb and nbs/runs/*.ipynb (files starting with _ or . skipped)."
    out = [p for p in sorted(NBS.glob("*.ipynb")) + sorted((NBS / RUNS).glob("*.ipynb")) if p.name[0] not in "_."]
    return out


def write_if_changed(path: Path, text: str) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() == text: return False
    path.write_text(text)
    return True


# ------------------------------------------------------------------------------------------------ nbdev -> MyST-NB
def _directives(src: str) -> tuple[dict, str]:
    "nbdev `#| name value` lines at the top of a code cell -> ({name: value}, source without them)."
    lines, found = src.splitlines(), {}
    while lines and (m := DIRECTIVE.match(lines[0])):
        found[m.group(1).replace("-", "_")] = m.group(2)
        lines.pop(0)
    return found, "\n".join(lines)


def _tags_for(d: dict) -> list[str]:
    tags = []
    false = lambda v: v.strip().lower() in ("false", "0", "no")
    if "default_exp" in d or "hide" in d or "exporti" in d: tags.append("remove-cell")
    if "eval" in d and false(d["eval"]): tags.append("skip-execution")
    if any(f in d for f in ("slow", "gpu")): tags.append("skip-execution")  # settings.ini tst_flags: not on a CPU build
    if "echo" in d and false(d["echo"]): tags.append("remove-input")
    if "output" in d and false(d["output"]): tags.append("remove-output")
    if "include" in d and false(d["include"]): tags.append("remove-cell")
    return tags


def md_cell(text: str, tags=()) -> dict:
    return {"cell_type": "markdown", "metadata": {"tags": list(tags)} if tags else {}, "source": text}


def code_cell(text: str, tags=()) -> dict:
    return {"cell_type": "code", "metadata": {"tags": list(tags)} if tags else {}, "source": text,
            "execution_count": None, "outputs": []}


def definitions() -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(notebook path relative to nbs, cell id) -> [(module, exported name)], read from the `# %%` markers of
    weaktr/*.py."""
    out: dict = {}
    for py in sorted((ROOT / "weaktr").glob("*.py")):
        text = py.read_text()
        if "AUTOGENERATED" not in text[:600]: continue
        mod = f"weaktr.{py.stem}"
        try: names = set(ast.literal_eval(re.search(r"__all__\s*=\s*(\[.*?\])", text, re.S).group(1)))
        except Exception: names = set()
        cell = None
        for line in text.splitlines():
            if m := re.match(r"# %% \.\./nbs/(\S+\.ipynb) #(\w+)", line):
                cell = (m.group(1), m.group(2))
                continue
            if line.startswith("# %% "):
                cell = None
                continue
            m = re.match(r"(?:async\s+)?(?:def|class)\s+(\w+)|(\w+)\s*(?::[^=]*)?=", line)
            name = m and (m.group(1) or m.group(2))
            if cell and name in names and all(name != n for _, n in out.get(cell, [])):
                out.setdefault(cell, []).append((mod, name))
                names.discard(name)
    return out


def _rel(frm: str, to: str) -> str:
    "Relative URL from page `frm` to page `to` (both relative to the site root)."
    return os.path.relpath(to, os.path.dirname(frm) or ".")


def _links(text: str, page: str) -> str:
    "Markdown links to notebooks with a #fragment -> HTML links (MyST resolves pages, not raw-HTML anchors)."
    def sub(m):
        label, target, frag = m.group(1), m.group(2), m.group(3)
        if re.match(r"\w+:", target): return m.group(0)
        if target == "": href = f"#{frag}"
        else: href = f"{target[:-len('.ipynb')]}.html#{frag}" if target.endswith(".ipynb") else f"{target}#{frag}"
        return f'<a href="{href}">{label}</a>'
    return re.sub(r"(?<!!)\[([^\]\n]+)\]\(((?:[^()\s#]+\.(?:ipynb|md))?)#([\w.\-]+)\)", sub, text)


def _param_table(src: str) -> str:
    "Markdown table of a papermill `parameters` cell: name, type, default, comment."
    rows = []
    for line in src.splitlines():
        m = re.match(r"(\w+)\s*:\s*([^=]+?)\s*=\s*(.+?)\s*(?:#\s*(.*))?$", line)
        if not m: continue
        default = m.group(3).rstrip()
        rows.append(f"| `{m.group(1)}` | `{m.group(2)}` | `{default}` | {(m.group(4) or '').replace('|', '/')} |")
    return "| parameter | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(rows)


def stage_notebook(nb_path: Path, defs: dict) -> dict:
    "The staged copy of one notebook (a dict in nbformat 4)."
    rel = nb_path.relative_to(NBS).as_posix()
    nb = json.loads(nb_path.read_text())
    cells, is_run = [], rel.startswith(RUNS + "/")
    for i, c in enumerate(nb["cells"]):
        c = {**c, "metadata": dict(c.get("metadata", {}))}
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        tags = list(c["metadata"].get("tags", []))
        if c["cell_type"] == "markdown":
            c["source"] = _links(src, rel)
            cells.append(c)
            if i == 0 and is_run:
                cells.append(md_cell(_run_header(rel, nb)))
            continue
        if c["cell_type"] != "code":
            cells.append(c)
            continue
        d, body = _directives(src)
        tags += [t for t in _tags_for(d) if t not in tags]
        names = defs.get((rel, c.get("id", "")), [])
        if names:                                           # an exported definition: anchor before, API line after
            cells.append(md_cell("".join(f'<a id="{m}.{n}"></a>' for m, n in names)))
        c["source"] = body
        if tags: c["metadata"]["tags"] = tags
        c["outputs"], c["execution_count"] = [], None
        cells.append(c)
        if names:
            links = ", ".join(f'<a href="{_rel(rel, "api/" + m.split(".")[1] + ".html")}#{m}.{n}"><code>{n}</code></a>'
                              for m, n in names)
            cells.append(md_cell(f'<p class="api-link">API reference: {links}</p>'))
        if "parameters" in tags and nb_path.name in DOCS_PARAMS:
            params, why = DOCS_PARAMS[nb_path.name]
            cells.append(code_cell("# docs build (tools/docs.py DOCS_PARAMS): " + why.split(" (")[0] + "\n" +
                                   "\n".join(f"{k} = {v!r}" for k, v in params.items()), ["injected-parameters"]))
            cells.append(md_cell(f"*This page was executed for the documentation with {why}: "
                                 + ", ".join(f"`{k} = {v!r}`" for k, v in params.items()) + ".*"))
    for j, c in enumerate(cells):                               # nbformat 4.5 ids, stable across builds
        c.setdefault("id", hashlib.sha1(f"{rel}:{j}".encode()).hexdigest()[:8])
    meta = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"}}
    return {"cells": cells, "metadata": meta, "nbformat": 4, "nbformat_minor": 5}


def _run_header(rel: str, nb: dict) -> str:
    "A run notebook's recipe header: how to run it, its parameters."
    stem = Path(rel).stem
    pcell = next((c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    table = _param_table("".join(pcell["source"])) if pcell else ""
    return (f"```{{admonition}} A papermill recipe\n:class: tip\nThis page shows the run notebook `nbs/{rel}` as a "
            f"recipe; it is not executed for the documentation. Run it with\n\n    papermill nbs/{rel} "
            f"runs/<name>/{stem}.ipynb -p run_dir runs/<name> [-p NAME VALUE ...]\n\nor with a preset: `python -m "
            f"weaktr.grid export-preset configs/voc.yaml {stem} > /tmp/p.yaml` and `-f /tmp/p.yaml`. `./kit demo` runs "
            "every stage in order on the synthetic data.\n```\n\n**Parameters** (the `parameters` cell; `papermill "
            f"--help-notebook nbs/{rel}` prints the same):\n\n{table}")


# ------------------------------------------------------------------------------------------------ API reference
def api_pages() -> dict[str, str]:
    "{relative path: MyST markdown} for api/index.md and one api/<module>.md per module in weaktr/_modidx.py."
    import importlib
    from nbdev.showdoc import BasicMarkdownRenderer
    sys.path.insert(0, str(ROOT))
    modidx = importlib.import_module("weaktr._modidx").d["syms"]
    defs = {v: k for k, vs in definitions().items() for v in vs}          # (module, name) -> (notebook, cell id)
    pages, index = {}, ["# API reference", "",
                        "Every exported function, class and constant of `weaktr`, as nbdev's `show_doc` renders it: "
                        "the signature with each parameter's comment (docments) and the docstring. Each entry links "
                        "to the notebook cell that defines, explains and tests it.", "",
                        "| module | notebook | exported names |", "|---|---|---|"]
    for mod_name in sorted(modidx, key=lambda m: _module_order(m)):
        mod = importlib.import_module(mod_name)
        short = mod_name.split(".", 1)[1]
        names = list(getattr(mod, "__all__", []))
        nbs = sorted({defs[(mod_name, n)][0] for n in names if (mod_name, n) in defs})
        nb_links = ", ".join(f"[{Path(n).stem}](../{n})" for n in nbs)
        lines = [f"# `{mod_name}`", "", f"> {(mod.__doc__ or '').strip()}", "", f"Source notebook: {nb_links}", ""]
        for name in names:
            obj = getattr(mod, name)
            lines += _entry(mod_name, name, obj, defs.get((mod_name, name)), BasicMarkdownRenderer, 2)
            if isinstance(obj, type) and obj.__module__ == mod_name:
                for meth in sorted(k for k in modidx[mod_name] if k.startswith(f"{mod_name}.{name}.")):
                    m = meth.rsplit(".", 1)[1]
                    if m.startswith("_") and m not in ("__call__",): continue
                    fn = obj.__dict__.get(m)
                    if fn is None: continue
                    lines += _entry(mod_name, f"{name}.{m}", fn, defs.get((mod_name, name)), BasicMarkdownRenderer, 3)
        pages[f"api/{short}.md"] = "\n".join(lines) + "\n"
        index.append(f"| [`{mod_name}`]({short}.md) | {nb_links.replace('../', '../')} | {len(names)} |")
    index += ["", "```{toctree}", ":hidden:", ""] + [f"{m.split('.', 1)[1]}" for m in
                                                       sorted(modidx, key=_module_order)] + ["```", ""]
    pages["api/index.md"] = "\n".join(index)
    return pages


def _module_order(mod_name: str) -> tuple:
    "Modules in the order of their notebooks."
    for py in [ROOT / "weaktr" / f"{mod_name.split('.', 1)[1]}.py"]:
        m = re.search(r"File to edit: \.\./nbs/(\S+\.ipynb)", py.read_text()[:400]) if py.exists() else None
        if m: return (m.group(1), mod_name)
    return ("~", mod_name)


def _entry(mod_name, name, obj, where, Renderer, level) -> list[str]:
    try:
        md = Renderer(obj, title_level=level)._repr_markdown_()
    except Exception:                       # a constant or anything show_doc cannot render
        md = ""
    md = re.sub(r"^---\s*\n\s*\n\[source\]\([^)]*\)\{[^}]*\}\s*\n", "", md.lstrip())
    md = re.sub(r"^\[source\]\([^)]*\)\{[^}]*\}\s*\n", "", md.lstrip())
    if not md.strip() or not md.lstrip().startswith("#"):
        import pprint
        if isinstance(obj, Path) and obj.is_absolute() and obj.is_relative_to(ROOT):   # no machine-specific paths
            rel = obj.relative_to(ROOT).as_posix()
            r = ["<the repository root>" + (f"/{rel}" if rel != "." else "")]
        else:
            r = pprint.pformat(obj, width=110, compact=True, sort_dicts=False).splitlines()
        r = "\n".join(r[:20] + (["…"] if len(r) > 20 else []))
        md = f"{'#' * level} {name}\n\n```text\n{name} = {r}\n```\n"
    md = md.replace("\n#", "\n#", 1)
    anchor = f'<a id="{mod_name}.{name}"></a>\n\n'
    src = ""
    if where:
        nb, cell = where
        src = (f'<p class="api-src">defined in <a href="../{nb[:-len(".ipynb")]}.html#{mod_name}.{name.split(".")[0]}">'
               f'{Path(nb).stem}</a></p>\n')
    return [anchor + md.rstrip() + "\n", src, ""]


# ------------------------------------------------------------------------------------------------ staging
def _toctree(caption: str, docs: list[str]) -> str:
    return f"```{{toctree}}\n:caption: {caption}\n:maxdepth: 1\n:hidden:\n\n" + "\n".join(docs) + "\n```\n"


def stage(verbose=True, touch: str | None = None) -> dict:
    "Write _proc/ (staged notebooks, API pages, navigation); remove what no longer has a source. -> {path: changed}"
    STAGE.mkdir(exist_ok=True)
    defs = definitions()
    want: dict[str, str] = {}
    nbs = notebooks()
    for p in nbs:
        nb = stage_notebook(p, defs)
        rel = p.relative_to(NBS).as_posix()
        if rel == "index.ipynb":
            nav = []
            for caption, pats in NAV:
                docs = sorted({q.relative_to(NBS).with_suffix("").as_posix() for pat in pats for q in NBS.glob(pat)
                               if q in nbs})
                if docs: nav.append(_toctree(caption, docs))
            nav.append(_toctree("Reference", ["api/index"]))
            nb["cells"].append({**md_cell("\n".join(nav)), "id": "navtoc00"})
        if touch and p.name == touch:                            # a one-notebook code change, for --measure
            c = next(c for c in nb["cells"] if c["cell_type"] == "code")
            c["source"] += f"\n# docs build measurement {time.time():.0f}"
        want[rel] = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    want.update(api_pages())
    changed = {k: write_if_changed(STAGE / k, v) for k, v in want.items()}
    for d in ("images",):                                                # pictures the markdown cells show
        if (NBS / d).is_dir():
            for f in (NBS / d).rglob("*"):
                if f.is_file():
                    dst = STAGE / d / f.relative_to(NBS / d)
                    if not dst.exists() or dst.read_bytes() != f.read_bytes():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(f, dst)
    keep = set(want) | {str(f.relative_to(STAGE))
                        for f in (STAGE / "images").rglob("*")} if (STAGE / "images").exists() else set(want)
    for f in list(STAGE.rglob("*.ipynb")) + list(STAGE.rglob("*.md")):
        r = f.relative_to(STAGE).as_posix()
        if r.startswith(".cache/") or r in keep: continue
        f.unlink()
    if verbose:
        n = sum(changed.values())
        print(f"== docs: staged {len(want)} pages into {STAGE.relative_to(ROOT)}/ ({n} changed)")
    return changed


# ------------------------------------------------------------------------------------------------ build
def exec_times() -> list[tuple[str, float]]:
    "(notebook, seconds) of the cached executions, from jupyter-cache's records."
    if not JCACHE.exists(): return []
    from jupyter_cache import get_cache
    cache = get_cache(JCACHE)
    latest = {}
    for rec in sorted(cache.list_cache_records(), key=lambda r: r.created):      # the newest record per notebook
        latest[rec.uri or ""] = (rec.data or {}).get("execution_seconds")
    out = []
    for uri, t in latest.items():
        if t is not None: out.append((str(Path(uri).relative_to(STAGE)) if uri.startswith(str(STAGE)) else uri, t))
    return sorted(out)


def build(mode="full", clean=False, jobs=1, out=None, touch=None) -> Path:
    "Stage and run sphinx-build; `touch`: a notebook name whose staged code gets one comment line (measurements)."
    out = Path(out) if out else ROOT / settings().get("doc_path", "_docs")
    doctrees = CACHE / f"doctrees-{mode}"                       # per mode: the modes differ in configuration
    if clean:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(doctrees, ignore_errors=True)
    t0 = time.time()
    stage(touch=touch)
    env = {**os.environ, "WEAKTR_DOCS_MODE": mode, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    env.pop("MPLBACKEND", None)                                   # the kernels' own inline backend draws the figures
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(ROOT / "docs"), "-d", str(doctrees),
           "-j", str(jobs), "--keep-going", "-q", str(STAGE), str(out)]
    print("== docs:", " ".join(cmd[2:]), f"(mode {mode})", flush=True)
    before = dict(exec_times())
    r = subprocess.run(cmd, env=env, cwd=ROOT)
    if r.returncode: raise SystemExit(f"sphinx-build failed (exit {r.returncode}); see the messages above")
    wall = time.time() - t0
    executed = sorted(n for n, t in exec_times() if before.get(n) != t)
    print(f"== docs: built {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}/index.html "
          f"in {wall:.0f} s (mode {mode}; executed {len(executed)} notebook(s): {', '.join(executed) or 'none'})")
    _log_build(dict(mode=mode, wall_s=round(wall, 1), executed=executed, cached_before=len(before),
                    extra=os.environ.get("WEAKTR_DOCS_EXECUTE", ""), touched=touch or ""))
    return out


BUILD_LOG = CACHE / "builds.jsonl"


def _log_build(rec: dict):
    "Append one build's timing (with date and load) to _proc/.cache/builds.jsonl; `--record` summarises them."
    from datetime import datetime, timezone
    try: load = round(os.getloadavg()[0], 2)
    except OSError: load = None
    rec = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), load_average=load, **rec)
    BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with BUILD_LOG.open("a") as f: f.write(json.dumps(rec) + "\n")


def record(path: Path = ROOT / "results" / "docs_build.json") -> dict:
    "results/docs_build.json from the logged builds (latest of each kind) and the cached per-notebook execution times."
    import platform
    from datetime import datetime, timezone
    logs = [json.loads(l) for l in BUILD_LOG.read_text().splitlines()] if BUILD_LOG.exists() else []
    kinds = {}
    for b in logs:
        n = len(b["executed"])
        kind = (f"{b['mode']}" + (f" + {b['extra']}" if b.get("extra") else "") +
                (f", after a code change in {b['touched']}" if b.get("touched") else "") +
                (", nothing to execute (all cached)" if n == 0 else
                 f", {n} notebook(s) executed" + (f" ({', '.join(b['executed'])}), the rest from the cache"
                                                   if n <= 3 else "")))
        kinds[kind] = b
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else platform.processor()
    loads = [b["load_average"] for b in kinds.values() if b.get("load_average") is not None]
    res = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=f"{cpu}, {os.cpu_count()} cores",
               command="python tools/docs.py --record (from _proc/.cache/builds.jsonl and the execution cache)",
               note=(f"measured while the 2 cores were shared with other jobs (load average up to {max(loads):.0f}): "
                     "upper bounds" if loads and max(loads) > 2.5 else "an otherwise idle machine"),
               builds={k: b["wall_s"] for k, b in kinds.items()},
               build_details=list(kinds.values()),
               notebooks={n: round(t, 1) for n, t in exec_times()})
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"== docs: wrote {path.relative_to(ROOT)}")
    return res


def measure(path: Path = ROOT / "results" / "docs_build.json", touch: str = "05_metrics.ipynb",
            keep_cache: bool = False) -> dict:
    """Time the builds and write them, with the per-notebook execution times, to results/docs_build.json.

    Builds: full (from an empty execution cache, or with `keep_cache` the cache as found: then the execution times the
    cache recorded for the notebooks it already held are added, giving the empty-cache estimate), a rebuild with
    nothing changed, one after a code change in `touch` (re-executes it alone), one with the change reverted, and
    `--quick` from an empty cache (what the browser test builds on CI)."""
    from datetime import datetime, timezone
    global JCACHE
    builds, extra = {}, {}
    def timed(name, **kw):
        t0 = time.time()
        build(**kw)
        builds[name] = round(time.time() - t0, 1)
        print(f"== docs --measure: {name}: {builds[name]:.0f} s", flush=True)
    if not keep_cache: shutil.rmtree(JCACHE, ignore_errors=True)
    cached_before = dict(exec_times())
    timed("full" if not keep_cache else "full, with the execution cache as found", clean=True)
    notebooks_s = {n: round(t, 1) for n, t in exec_times()}
    if keep_cache:
        builds["full from an empty cache (estimate: the build above + the recorded executions it reused)"] = round(
            builds["full, with the execution cache as found"] + sum(cached_before.values()), 1)
        extra["reused_from_cache"] = sorted(cached_before)
    timed("rebuild, nothing changed")
    timed(f"rebuild after a code change in {touch} (re-executes it alone)", touch=touch)
    timed("rebuild, change reverted (the cached execution is reused)")
    saved, JCACHE = JCACHE, CACHE / "jupyter-quick-measure"
    os.environ["WEAKTR_DOCS_JCACHE"] = str(JCACHE)
    try:
        shutil.rmtree(JCACHE, ignore_errors=True)
        timed("quick (--quick, empty cache: what the browser test builds)", mode="quick", clean=True,
              out=CACHE / "quick-measure-site")
    finally:
        shutil.rmtree(JCACHE, ignore_errors=True)
        shutil.rmtree(CACHE / "quick-measure-site", ignore_errors=True)
        JCACHE = saved
        os.environ.pop("WEAKTR_DOCS_JCACHE", None)
    import platform
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else platform.processor()
    try: load = os.getloadavg()[0]
    except OSError: load = float("nan")
    res = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=f"{cpu}, {os.cpu_count()} cores",
               command="python tools/docs.py --measure" + (" --keep-cache" if keep_cache else ""),
               load_average_at_end=round(load, 2),
               note=(f"the machine was shared with other jobs (load average {load:.1f} on 2 cores at the end): "
                     "upper bounds" if load > 2.5 else "an otherwise idle machine"),
               builds=builds, notebooks=notebooks_s, **extra)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"== docs --measure: wrote {path.relative_to(ROOT)}")
    return res


def screenshot(page: str, png: Path, site: Path | None = None, width: int = 1280, height: int = 900,
               anchor: str | None = None):
    "A PNG of one page of the built site, in headless Chromium (for the README): page relative to the site root."
    import functools, http.server, threading
    from playwright.sync_api import sync_playwright
    site = Path(site) if site else ROOT / settings().get("doc_path", "_docs")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        type("Q", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None}), directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    chromium = os.environ.get("WEAKTR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    try:
        with sync_playwright() as pw:
            args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
            b = pw.chromium.launch(executable_path=chromium, args=args)
            pg = b.new_page(viewport={"width": width, "height": height})
            pg.goto(f"http://127.0.0.1:{srv.server_address[1]}/{page}", wait_until="load")
            pg.evaluate("() => (window.MathJax && MathJax.startup) ? MathJax.startup.promise : null")
            if anchor: pg.evaluate(f"document.getElementById({anchor!r})?.scrollIntoView()")
            pg.wait_for_timeout(500)
            png.parent.mkdir(parents=True, exist_ok=True)
            pg.screenshot(path=str(png))
            b.close()
    finally:
        srv.shutdown()
    print(f"== docs: {png.relative_to(ROOT) if png.is_relative_to(ROOT) else png} <- {page}")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="./kit docs", description=__doc__.split("\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help=f"execute only {', '.join(QUICK_EXECUTE)} (CI)")
    g.add_argument("--no-exec", action="store_true", help="execute nothing: pages without outputs (fastest)")
    ap.add_argument("--execute", default="", metavar="NB[,NB]",
                    help="with --quick: also execute these notebooks (e.g. walkthrough.ipynb)")
    ap.add_argument("--clean", action="store_true", help="rebuild every page (the execution cache is kept)")
    ap.add_argument("--clear-cache", action="store_true", help="also forget every cached execution")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="Sphinx processes (each executes its notebooks)")
    ap.add_argument("--out", default=None, help="output folder (default: settings.ini doc_path)")
    ap.add_argument("--stage-only", action="store_true", help="only write _proc/")
    ap.add_argument("--times", action="store_true", help="print the cached per-notebook execution times and exit")
    ap.add_argument("--measure", action="store_true", help="time full / incremental / quick builds into results/")
    ap.add_argument("--keep-cache", action="store_true", help="with --measure: start from the cache as found")
    ap.add_argument("--record", action="store_true", help="write results/docs_build.json from the logged builds")
    ap.add_argument("--touch", default=None, metavar="NB",
                    help="build as if NB's code had changed (one comment line added to its staged copy): times an "
                         "incremental rebuild")
    ap.add_argument("--screenshot", nargs=2, metavar=("PAGE[#ID]", "PNG"), help="a PNG of one page of the built site")
    a = ap.parse_args(argv)
    if a.times:
        for nb, t in exec_times(): print(f"{t:8.1f} s  {nb}")
        return
    if a.measure:
        measure(keep_cache=a.keep_cache)
        record()
        return
    if a.record:
        record()
        return
    if a.screenshot:
        page, _, anchor = a.screenshot[0].partition("#")
        screenshot(page, Path(a.screenshot[1]).resolve(), site=a.out, anchor=anchor or None)
        return
    if a.clear_cache: shutil.rmtree(JCACHE, ignore_errors=True)
    if a.stage_only:
        stage()
        return
    if a.execute: os.environ["WEAKTR_DOCS_EXECUTE"] = a.execute
    build("quick" if a.quick else "off" if a.no_exec else "full", clean=a.clean or a.clear_cache, jobs=a.jobs,
          out=a.out, touch=a.touch)
    times = exec_times()
    if times:
        print("== docs: execution times (cached; s):", ", ".join(f"{Path(n).stem} {t:.0f}" for n, t in times))


if __name__ == "__main__":
    main()
