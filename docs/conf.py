"""Sphinx configuration of the weaktr documentation site (built by `./kit docs`, i.e. tools/docs.py).

The source folder is `_proc/` (the staged notebooks, see tools/docs.py); this folder holds only the configuration and
static files. Execution mode comes from $WEAKTR_DOCS_MODE: full (every notebook but the run recipes, through the
jupyter-cache), quick (only tools/docs.py QUICK_EXECUTE), off (none).
"""
import configparser, importlib.util, os, sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tools"))
import docs as kitdocs                                       # noqa: E402  (tools/docs.py)

_ini = configparser.ConfigParser()
_ini.read(ROOT / "settings.ini")
_s = _ini["DEFAULT"]
project = _s["title"]
author = _s["author"]
copyright = _s["copyright"]
release = version = _s["version"]

extensions = ["myst_nb", "sphinx.ext.mathjax"]
exclude_patterns = [".cache", "**/.ipynb_checkpoints", "explorer_exports", "_*"]
root_doc = "index"

# -- MyST / notebooks ----------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "html_image"]
myst_heading_anchors = 3
_mode = os.environ.get("WEAKTR_DOCS_MODE", "full")
nb_execution_mode = "off" if _mode == "off" else "cache"
nb_execution_cache_path = str(kitdocs.JCACHE)                 # $WEAKTR_DOCS_JCACHE or _proc/.cache/jupyter
nb_execution_timeout = 1200                                   # seconds per cell
nb_execution_raise_on_error = True                            # a failing notebook fails the build, naming it
nb_execution_show_tb = True
nb_execution_in_temp = False                                  # run in _proc/, a sibling of nbs/: same relative paths
nb_execution_excludepatterns = [f"{kitdocs.RUNS}/*"]
if _mode == "quick":                                          # + $WEAKTR_DOCS_EXECUTE (./kit docs --quick --execute)
    _run = set(kitdocs.QUICK_EXECUTE) | set(filter(None, os.environ.get("WEAKTR_DOCS_EXECUTE", "").split(",")))
    nb_execution_excludepatterns += [p.relative_to(kitdocs.NBS).as_posix() for p in kitdocs.notebooks()
                                     if p.name not in _run]
nb_merge_streams = True
# MyST-NB writes output files (figures) to <outdir>/../jupyter_execute, i.e. the repository root for _docs/: keep them
# in the cache folder instead (an absolute path wins in its Path.joinpath)
import myst_nb.sphinx_ext                                     # noqa: E402
myst_nb.sphinx_ext.OUTPUT_FOLDER = str(kitdocs.CACHE / "jupyter_execute")
nb_ipywidgets_js = {}                                         # no widget JS from a CDN: widgets show their text form
nb_output_stderr = "remove-warn"
nb_render_markdown_format = "myst"                            # display(Markdown(...)) tables and math render

# -- HTML ----------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"{project} {release}"
html_static_path = [str(HERE / "_static")]
html_css_files = ["weaktr.css"]
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "navigation_with_keys": False,
}
html_context = {"default_mode": "light"}                      # (an unset mode logs a console error)
html_favicon = str(HERE / "_static" / "favicon.png")
html_last_updated_fmt = None
html_copy_source = False
html_show_sourcelink = False

# MathJax 3 (the static build shipped in the sphinx-mathjax-offline package), copied into <site>/_static/mathjax by
# _copy_mathjax: the site renders math with no network. Sphinx's default MathJax 3 setup applies (MyST-NB adds the
# classes to process).
_mj = Path(importlib.util.find_spec("sphinx-mathjax-offline").origin).parent / "static" / "mathjax"
mathjax_path = "mathjax/tex-chtml.js"
_MJ_SKIP = ("-speech.js", "mml-svg.js", "tex-svg", "tex-mml-svg", "node-main.js")


def _copy_mathjax(app, exception):
    "Copy MathJax (the tex-chtml component, its extensions and woff fonts) into <site>/_static/mathjax."
    if exception or app.builder.format != "html": return
    import shutil
    dst = Path(app.outdir) / "_static" / "mathjax"
    if (dst / "tex-chtml.js").exists(): return
    shutil.copytree(_mj, dst, dirs_exist_ok=True,
                    ignore=lambda d, names: [n for n in names if n.endswith(_MJ_SKIP) or n == "svg"])


def setup(app):
    app.connect("build-finished", _copy_mathjax)
