"""The explorer in a real JupyterLab, driven by headless Chromium (playwright, Debian's chromium).

Starts `jupyter lab` from this venv on 127.0.0.1 (free port, random token) over a temporary copy of
nbs/explore.ipynb (fine-tuning budget cut to a few seconds), runs all cells in the browser, checks that the widget
rendered at 1280 x 800 (screenshots saved under the test's tmp folder; $WEAKTR_EXPLORER_SCREENSHOT names a file to
copy the layout screenshot to), clicks a head of the grid, clicks on the image itself (the query patch), moves the
opacity slider, steps to the next image and picks a map for the side-by-side compare, checking each time that the
displayed image changed; and replays the toggle-state bug (after "all heads on", a click on L1 must switch layer 1
off).

Needs: pip `playwright` (its Python client only; never `playwright install`: the browser is the system's) and
Chromium (`apt-get install -y chromium`). Skips, saying so, only where Chromium cannot be found.
"""
from __future__ import annotations
import io, json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "nbs" / "explore.ipynb"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]
TRAIN_STEPS = 30               # the notebook's fine-tuning steps in this test


def find_chromium() -> str | None:
    "Chromium/Chrome executable: $WEAKTR_CHROMIUM, else the usual names on PATH or /usr/bin."
    cands = [os.environ.get("WEAKTR_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
             shutil.which("google-chrome"), "/usr/bin/chromium"]
    return next((c for c in cands if c and Path(c).is_file() and os.access(c, os.X_OK)), None)


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found (checked $WEAKTR_CHROMIUM, chromium, chromium-browser, "
                             "google-chrome, /usr/bin/chromium): install it with `apt-get install -y chromium` to run "
                             "the browser test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_explorer_notebook(page, base: str, token: str, name: str):
    "Open notebook `name` in JupyterLab, wait for its kernel, run all cells; -> the explorer's main image, once drawn."
    page.goto(f"{base}/lab/tree/{name}?token={token}", wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell", timeout=60_000)
    # the notebook is open and its kernel is ready
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook", timeout=60_000)
    page.wait_for_function("""() => { const w = window.jupyterapp.shell.currentWidget;
        return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
               && w.sessionContext.session.kernel.status === 'idle'; }""", timeout=60_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    main = page.locator("img.weaktr-main")
    main.wait_for(state="visible", timeout=75_000)
    page.wait_for_function("() => { const i = document.querySelector('img.weaktr-main'); "
                           "return i && i.naturalWidth > 100; }", timeout=30_000)
    return main


def notebook_copy(dst: Path, train_steps: int) -> Path:
    "explore.ipynb with the fine-tuning steps of its parameters cell set to `train_steps`."
    nb = json.loads(NB.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    src = "".join(cell["source"])
    assert "train_steps: int =" in src, "explore.ipynb's parameters cell has no train_steps"
    cell["source"] = "\n".join(f"train_steps: int = {train_steps}  # (test)" if l.startswith("train_steps")
                               else l
                               for l in src.splitlines())
    dst.mkdir(parents=True, exist_ok=True)
    (dst / NB.name).write_text(json.dumps(nb))
    return dst / NB.name


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"jupyter lab did not answer {url} in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server over a copy of explore.ipynb: yields (base url, token, notebook name)."
    root = tmp_path / "nbs"
    notebook_copy(root, TRAIN_STEPS)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jcfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jrun"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "jlab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "jlab-ws"), "OMP_NUM_THREADS": "2"}
    env.pop("MPLBACKEND", None)                                   # the kernel's own inline backend
    news = tmp_path / "jlab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))                                    # no "news?" toast
    log = tmp_path / "jupyter.log"
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--ServerApp.terminals_enabled=False", "--LabApp.expose_app_in_browser=True",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")   # containers / CI run as root
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/status?token={token}", 45, proc, log)
        yield f"http://127.0.0.1:{port}", token, NB.name, log
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)                   # the server and the kernels it started
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try: os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError: pass


def non_blank(png: bytes, min_size=(200, 150)) -> Image.Image:
    im = Image.open(io.BytesIO(png)).convert("RGB")
    assert im.width >= min_size[0] and im.height >= min_size[1], f"screenshot too small: {im.size}"
    a = np.asarray(im, np.float32)
    assert a.std() > 10 and len(np.unique(a.reshape(-1, 3)[::7], axis=0)) > 50, "screenshot looks blank"
    return im


def test_explorer_in_jupyterlab(lab, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the Python package `playwright` is missing: pip install playwright (requirements.txt); "
                    "do not run `playwright install`, the test uses the system Chromium")
    base, token, name, log = lab
    t_start = time.time()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})   # the target screen
            main = run_explorer_notebook(page, base, token, name)
            status = page.locator(".weaktr-status").inner_text()
            assert "Error" not in status, status

            explorer = page.locator(".weaktr-explorer")
            page.evaluate("() => window.jupyterapp.shell.collapseLeft()")          # the file browser's width
            page.wait_for_timeout(500)
            explorer.evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "lab.png"))
            if os.environ.get("WEAKTR_EXPLORER_SCREENSHOT"):
                shutil.copyfile(shots / "lab.png", os.environ["WEAKTR_EXPLORER_SCREENSHOT"])
            box, grid_box = page.locator("img.weaktr-main").bounding_box(), page.locator(".weaktr-grid").bounding_box()
            assert grid_box["x"] > box["x"] + box["width"] * 0.9, ("the head grid is not beside the main view",
                                                                   box, grid_box)
            assert box["y"] + box["height"] <= 800 and grid_box["y"] < 800, ("the view or the grid starts below "
                                                                             "the fold", box, grid_box)
            non_blank(explorer.screenshot(path=str(shots / "explorer.png")), (600, 400))
            grid = page.locator(".weaktr-grid")
            non_blank(grid.screenshot(path=str(shots / "grid.png")), (150, 150))
            n_cells = page.locator(".weaktr-grid button[class*='weaktr-cell-']").count()
            assert n_cells >= 4, f"only {n_cells} head buttons in the grid"

            def src():
                return main.get_attribute("src")

            def changed_after(action, what):
                before_src, before_png = src(), main.screenshot()
                action()
                page.wait_for_function("(old) => { const i = document.querySelector('img.weaktr-main'); return i && "
                                       "i.src !== old && i.naturalWidth > 100; }", arg=before_src, timeout=20_000)
                page.wait_for_timeout(200)
                after_png = main.screenshot(path=str(shots / f"after_{what}.png"))
                assert after_png != before_png, f"the main image looks the same after {what}"
                non_blank(after_png, (150, 100))

            # pick a head in the grid: the main view shows that head
            cell = page.locator(".weaktr-grid button.weaktr-cell-1-1")
            changed_after(lambda: (cell.scroll_into_view_if_needed(), cell.click()), "head_click")
            # click on the image itself (a transparent button per patch lies over it): that patch's affinity row
            def click_image():
                main.scroll_into_view_if_needed()
                b = main.bounding_box()
                page.mouse.click(b["x"] + 0.3 * b["width"], b["y"] + 0.4 * b["height"])
            changed_after(click_image, "image_click")
            page.wait_for_function("() => document.querySelector('.weaktr-status').innerText.includes('patch (')",
                                   timeout=10_000)
            # move the opacity slider with the keyboard
            handle = page.locator(".weaktr-opacity .noUi-handle")
            def slide():
                handle.scroll_into_view_if_needed()
                handle.focus()
                for _ in range(4): page.keyboard.press("ArrowRight")
            changed_after(slide, "opacity_slider")
            # the toggle-state bug: switch layer 1 off, all heads on, then L1 again must switch layer 1 OFF
            page.locator(".weaktr-explorer .widget-toggle-buttons button", has_text="switch on/off").click()
            row1 = page.locator("button.weaktr-row-1")
            def wait_class(sel, cls, present):
                page.wait_for_function("([sel, c, p]) => { const e = document.querySelector(sel); return e && "
                                       "e.classList.contains(c) === p; }", arg=[sel, cls, present], timeout=20_000)
            changed_after(lambda: (row1.scroll_into_view_if_needed(), row1.click()), "layer1_off")
            wait_class("button.weaktr-cell-1-0", "mod-warning", True)
            wait_class("button.weaktr-row-1", "mod-active", False)
            changed_after(lambda: page.locator(".weaktr-explorer button", has_text="all heads on").click(), "all_on")
            wait_class("button.weaktr-cell-1-0", "mod-warning", False)
            wait_class("button.weaktr-row-1", "mod-active", True)
            changed_after(lambda: row1.click(), "layer1_off_again")            # the old code switched it ON here
            wait_class("button.weaktr-cell-1-0", "mod-warning", True)
            wait_class("button.weaktr-row-1", "mod-active", False)
            # the next image, then a second map beside the main view (side-by-side compare)
            changed_after(lambda: page.locator("button.weaktr-next").click(), "next_image")
            v2 = page.locator("img.weaktr-view2")
            before = v2.get_attribute("src")
            baseline = "baseline: refined CAM, uniform head weights (no AAF)"
            page.locator(".weaktr-compare select").select_option(label=baseline)
            page.wait_for_function("(old) => document.querySelector('img.weaktr-view2').src !== old", arg=before,
                                   timeout=20_000)
            page.screenshot(path=str(shots / "compare.png"))
        except Exception:
            try:
                page.screenshot(path=str(shots / "failure.png"))
                outs = page.locator(".jp-OutputArea-output").all_inner_texts()
                print("notebook outputs:\n" + "\n---\n".join(o[-1500:] for o in outs))
            except Exception: pass
            print(f"screenshots in {shots}; jupyter log tail:\n{log.read_text()[-2000:]}")
            raise
        finally:
            browser.close()
    print(f"browser test: {time.time() - t_start:.1f} s, screenshots in {shots}")
