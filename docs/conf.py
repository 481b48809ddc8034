"""Sphinx configuration of the weaktr documentation site (built by `./kit docs`, i.e. tools/docs.py).

The source folder is `_proc/` (the staged notebooks, see tools/docs.py); this folder holds only the configuration and
static files. Execution mode comes from $WEAKTR_DOCS_MODE: full (every notebook but the run recipes, through the
jupyter-cache), quick (only tools/docs.py QUICK_EXECUTE), off (none).
"""
import configparser, os, sys
from pathlib import Path

import jupyter_server_mathjax

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tools"))
import docs as kitdocs                                       # noqa: E402  (tools/docs.py)

_ini = configparser.ConfigParser(); _ini.read(ROOT / "settings.ini")
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
nb_execution_cache_path = str(kitdocs.JCACHE)
nb_execution_timeout = 1200                                   # seconds per cell
nb_execution_raise_on_error = True                            # a failing notebook fails the build, naming it
nb_execution_show_tb = True
nb_execution_in_temp = False                                  # run in _proc/, a sibling of nbs/: same relative paths
nb_execution_excludepatterns = [f"{kitdocs.RUNS}/*"]
if _mode == "quick":
    nb_execution_excludepatterns += [p.relative_to(kitdocs.NBS).as_posix() for p in kitdocs.notebooks()
                                     if p.name not in kitdocs.QUICK_EXECUTE]
nb_merge_streams = True
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
html_last_updated_fmt = None
html_copy_source = False
html_show_sourcelink = False

# MathJax 2.7 from the jupyter-server-mathjax package, copied into the site (_copy_mathjax below): no CDN.
_mj = Path(jupyter_server_mathjax.__file__).parent / "static"
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
mathjax2_config = {
    "tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]], "processEscapes": True,
                "processEnvironments": True,
                # MyST-NB marks pages tex2jax_ignore and math elements with the class "math" (its MathJax 3 setup)
                "ignoreClass": "tex2jax_ignore|mathjax_ignore", "processClass": "tex2jax_process|mathjax_process|math|output_area"},
    "HTML-CSS": {"availableFonts": [], "preferredFont": None, "webFont": "STIX-Web", "imageFont": None},
    "SVG": {"font": "STIX-Web"},
    "showMathMenu": False,
    "messageStyle": "none",
}


def _copy_mathjax(app, exception):
    "Copy the MathJax files the pages use (web fonts: woff only) into <site>/_static/mathjax."
    if exception or app.builder.format != "html": return
    import shutil
    dst = Path(app.outdir) / "_static" / "mathjax"
    if (dst / "MathJax.js").exists(): return
    def ignore(d, names):
        return [n for n in names if n in ("otf", "eot", "svg", "png", "tests") and Path(d).name != "output"]
    shutil.copytree(_mj, dst, ignore=ignore, dirs_exist_ok=True)


def setup(app):
    app.connect("build-finished", _copy_mathjax)
