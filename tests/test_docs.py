"""The documentation: README generated from nbs/index.ipynb, the method-notes references, and the built site in a
browser.

The browser test builds the site with `tools/docs.py --quick` (only a few notebooks executed: see QUICK_EXECUTE; the
others render without outputs) into a temporary folder, serves it on 127.0.0.1 and opens every page in headless
Chromium (Debian's /usr/bin/chromium driven by playwright's Python client; never `playwright install`). Each page:
no console error, no failed request, every formula typeset by MathJax (no raw `$$`, `\\(` or `\\[` left in the text),
every image loaded; every internal link points to a page of the site and, with a #fragment, to an element with that
id; the search page finds the method notes for "gradient clipping". Skips, saying so, only where Chromium is missing.
"""
from __future__ import annotations
# spec_refs: skip  (this file holds the tool's test inputs)

import functools, http.server, json, os, re, subprocess, sys, threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import docs as kitdocs          # noqa: E402
import readme as kitreadme      # noqa: E402
import spec_refs                # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    "Chromium/Chrome executable: $WEAKTR_CHROMIUM, else the usual names on PATH or /usr/bin (as tests/test_browser.py)."
    import shutil
    cands = [os.environ.get("WEAKTR_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
             shutil.which("google-chrome"), "/usr/bin/chromium"]
    return next((c for c in cands if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


CHROMIUM = find_chromium()


# ------------------------------------------------------------------------------------------------ README
def test_readme_is_generated_from_index():
    "README.md is exactly what nbs/index.ipynb generates (its cells executed): run ./kit readme after editing index."
    text = kitreadme.render()
    assert text.startswith(kitreadme.HEADER)
    assert (REPO / "README.md").read_text() == text, "README.md differs from nbs/index.ipynb: run ./kit readme"


def test_readme_numbers_come_from_result_files():
    "Measured numbers are outputs of code cells reading committed result files, never typed into markdown cells."
    nb = json.loads((REPO / "nbs" / "index.ipynb").read_text())
    md = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "results/demo/summary.json" in code and "results/docs_build.json" in code
    typed = re.findall(r"\b0\.\d{3}\b|\b\d+ min \d+ s\b", md)             # metrics, measured durations
    assert not typed, f"measured-looking numbers typed into index.ipynb's markdown: {typed}"
    readme = (REPO / "README.md").read_text()
    build = json.loads((REPO / "results" / "docs_build.json").read_text())
    assert build["builds"] and build["notebooks"] and build["date"][:10] in readme
    demo = REPO / "results" / "demo" / "summary.json"
    if demo.is_file():                                    # a ./kit demo run's summary.json, committed
        m = json.loads(demo.read_text())["metrics"]
        for v in (m["pseudo_miou"], m["seg_miou"], m["cls_map"]): assert f"{v:.3f}" in readme
    else:
        assert "no committed demo result" in readme


def test_readme_links_are_rewritten_to_the_repository_root():
    assert kitreadme.fix_links("[n](method_notes.ipynb#aaf) ![s](images/a.png) [u](https://x.org/a) [h](#top)") == \
        "[n](nbs/method_notes.ipynb#aaf) ![s](nbs/images/a.png) [u](https://x.org/a) [h](#top)"
    assert kitreadme.fix_links('<img src="images/a.png">') == '<img src="nbs/images/a.png">'


# ------------------------------------------------------------------------------------------------ spec references
def _notes_anchors() -> set[str]:
    nb = json.loads((REPO / "nbs" / "method_notes.ipynb").read_text())
    return set(re.findall(r'<a id="([\w.-]+)"></a>', "".join("".join(c["source"]) for c in nb["cells"])))


def test_no_spec_section_references_left():
    "Nothing in nbs/ or weaktr/ cites the external specification's numbered sections any more."
    left = spec_refs.remaining(["nbs", "weaktr"])
    assert not left, ("numbered spec references left (run python tools/spec_refs.py, then ./kit export):\n"
                      + "\n".join(left))
    for f in list((REPO / "nbs").rglob("*.ipynb")) + list((REPO / "weaktr").glob("*.py")):
        assert "weaktr-method.md" not in f.read_text(), f


def test_every_method_notes_reference_has_an_anchor():
    "Each §anchor cited in nbs/, weaktr/ and the mapping exists in the method notes; each pitfall 1-29 has one."
    anchors = _notes_anchors()
    assert set(spec_refs.SECTIONS.values()) <= anchors, set(spec_refs.SECTIONS.values()) - anchors
    assert {f"pitfall-{n}" for n in range(1, 30)} <= anchors
    cited = set()
    for f in list((REPO / "nbs").rglob("*.ipynb")) + list((REPO / "weaktr").glob("*.py")):
        cited |= set(re.findall(r"§([a-z][a-z0-9]*(?:-[a-z0-9]+)*)", f.read_text()))
        cited |= set(re.findall(r"method_notes\.ipynb#([\w-]+)", f.read_text()))
    assert cited, "no method-notes references found"
    assert cited <= anchors, f"cited but not in nbs/method_notes.ipynb: {sorted(cited - anchors)}"


def test_spec_refs_rewrites():
    "The mapping tool: plain text, markdown links, ranges, pitfall items, code spans; idempotent."
    assert spec_refs.plain("GC (spec §5.4), see §3.1") == "GC (method notes §gc-loss), see §phase1-data"
    assert spec_refs.plain("Spec §6.1: keys") == "Method notes §ckpt-phase1: keys"
    assert spec_refs.plain("(spec §4.3–4.5)") == "(method notes §bg-threshold, §label-crf, §miou)"
    assert spec_refs.plain("(spec §5.1–§5.5, §5.7)") == \
        "(method notes §segmenter, §phase2-data, §phase2-optim, §gc-loss, §phase2-val, §phase2-recipe)"
    assert spec_refs.plain("spec §8 item 4; §8.8.") == "method notes pitfall 4; pitfall 8."
    assert spec_refs.plain("(spec: weaktr-method.md §0 V3)") == "(method notes §versions V3)"
    md = spec_refs.linked("the loss (spec §5.4, pitfall 9) and `spec §2.5`", "../method_notes.ipynb")
    assert md == ("the loss (method notes [§gc-loss](../method_notes.ipynb#gc-loss), "
                  "[pitfall 9](../method_notes.ipynb#pitfall-9)) and `method notes §aaf`")
    assert spec_refs.linked("pitfalls 6, 13", "m.ipynb") == "pitfalls [6](m.ipynb#pitfall-6), [13](m.ipynb#pitfall-13)"
    assert spec_refs.linked(md, "../method_notes.ipynb") == md                       # idempotent
    long = "x = 1" + " " * 90 + "# the reference's seed (spec §3.2)"
    assert spec_refs.plain(long).endswith("(§phase1-optim)")                       # short form keeps lines <= 120
    with pytest.raises(KeyError, match="§10.1"): spec_refs.plain("spec §10.1")


# ------------------------------------------------------------------------------------------------ the site
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found (checked $WEAKTR_CHROMIUM, chromium, chromium-browser, google-chrome, "
                             "/usr/bin/chromium): install it with `apt-get install -y chromium` to run the docs test")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site built with --quick into a temporary folder, served on 127.0.0.1: yields (folder, base url)."
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    r = subprocess.run([sys.executable, str(REPO / "tools" / "docs.py"), "--quick", "--out", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"./kit docs --quick failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    warnings = re.findall(r"^\S.*?: WARNING: .*$", r.stderr, re.M)                # Sphinx's (not a kernel's) warnings
    assert not warnings, "Sphinx warnings:\n" + "\n".join(warnings)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(out)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield out, f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()


def test_site_has_every_page(site):
    out, _ = site
    pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
    expect = {f"{p.relative_to(kitdocs.NBS).with_suffix('').as_posix()}.html" for p in kitdocs.notebooks()}
    assert expect <= pages, expect - pages
    mods = [p.stem for p in (REPO / "weaktr").glob("*.py") if not p.stem.startswith("_")]
    assert {f"api/{m}.html" for m in mods} <= pages
    assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()
    nav = (out / "index.html").read_text()
    numbered = sorted(p.stem for p in kitdocs.NBS.glob("[0-9][0-9]*.ipynb"))
    order = [nav.find(f'href="{n}.html"') for n in ["method_notes"] + numbered]
    assert all(i > 0 for i in order) and order == sorted(order), f"navigation not in notebook order: {order}"
    api = (out / "api" / "core.html").read_text()
    assert 'id="weaktr.core.get_device"' in api and "00_core.html#weaktr.core.get_device" in api
    assert "auto" in api and "cuda" in api                                         # docments of get_device(device=...)


def _ids(html: str) -> set[str]:
    return set(re.findall(r'\s(?:id|name)="([^"]+)"', html))


@needs_chromium
def test_every_page_in_a_browser(site):
    "Console errors, failed requests, math typeset, images loaded, internal links and anchors."
    from playwright.sync_api import sync_playwright
    out, base = site
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html")     # not _static/ theme fragments
                   if not any(part.startswith("_") for part in p.relative_to(out).parts))
    ids = {p: _ids((out / p).read_text()) for p in pages}
    problems, links, n_math = [], set(), 0
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        # a request cancelled by our own next page.goto (e.g. the favicon of the previous page) reports ERR_ABORTED:
        # not a site defect. A missing file still shows as an HTTP >= 400 response or an image not loaded.
        page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url} {r.failure}")
                if "ERR_ABORTED" not in (r.failure or "") else None)
        page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        for p in pages:
            errors.clear()
            page.goto(base + p, wait_until="load")
            page.evaluate("() => (window.MathJax && MathJax.startup) ? MathJax.startup.promise : null")
            info = page.evaluate("""() => {
                const math = [...document.querySelectorAll('.math')];
                const text = [...document.querySelectorAll('article p, article li, article td, article h1, article h2,'
                                                            + ' article h3, .cell_output .output')]
                    .map(e => e.innerText).join('\\n');
                return {math: math.length, typeset: math.filter(e => e.querySelector('mjx-container')).length,
                        raw: (text.match(/\\$\\$|\\\\\\(|\\\\\\[/g) || []).length,
                        imgs: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
                        links: [...document.querySelectorAll('a[href]')].map(a => a.href)};
            }""")
            n_math += info["typeset"]
            if info["typeset"] < info["math"]:
                problems.append(f"{p}: {info['math'] - info['typeset']} formulas not typeset")
            if info["raw"]: problems.append(f"{p}: {info['raw']} raw $$ / \\( / \\[ left in the text")
            problems += [f"{p}: image not loaded: {s}" for s in info["imgs"]]
            problems += [f"{p}: {e}" for e in errors]
            links |= {(p, h) for h in info["links"] if h.startswith(base)}
        browser.close()
    for p, href in sorted(links):
        u = urlparse(href)
        target = unquote(u.path[len(urlparse(base).path):]) or "index.html"
        if target.endswith("/"): target += "index.html"
        if not (out / target).is_file():
            problems.append(f"{p}: broken link {href}")
            continue
        if u.fragment and target.endswith(".html"):
            tids = ids.get(target) or _ids((out / target).read_text())
            if unquote(u.fragment) not in tids: problems.append(f"{p}: missing anchor {href}")
    assert n_math > 100, f"only {n_math} typeset formulas in the whole site"
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60])


@needs_chromium
def test_search_finds_gradient_clipping(site):
    from playwright.sync_api import sync_playwright
    _, base = site
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(base + "search.html?q=gradient+clipping")
        page.wait_for_selector("#search-results li a, ul.search li a", timeout=30000)
        hits = page.eval_on_selector_all("#search-results li a, ul.search li a", "els => els.map(e => e.href)")
        browser.close()
    assert any("method_notes.html" in h for h in hits), hits
