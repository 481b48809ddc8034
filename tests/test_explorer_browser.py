"""The explorer's hover readout and its two-checkpoint compare in a real JupyterLab, driven by headless Chromium.

Uses the JupyterLab fixture of tests/test_browser.py (explore.ipynb, fine-tuning cut to a few seconds). Moves the
mouse over the main view and checks that the transparent patch button under the pointer carries the readout
(patch, map value, class, top head) both as its title and as the CSS strip drawn over the view, and that a click
there picks the same patch; then loads a second checkpoint as B through the checkpoint field and checks the panel
beside the view (B's map, both IoUs, both head-weight tables) and a bad file's one-line message.
Last, the docs' compare view (learned vs uniform head weights, layer 1 off, a query patch). $WEAKTR_EXPLORER_SHOTS
names a folder to copy the hover, checkpoint-B and compare screenshots to (nbs/images/explorer_*.png are these).

Needs the Python package `playwright` and Chromium (`apt-get install -y chromium`); skips only without Chromium.
"""
from __future__ import annotations
import os, re, shutil, time

import pytest
import torch

from test_browser import (CHROMIUM, CHROMIUM_ARGS, lab, non_blank,  # noqa: F401  (lab: the JupyterLab fixture)
                          run_explorer_notebook)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found (checked $WEAKTR_CHROMIUM, chromium, chromium-browser, google-chrome, "
                             "/usr/bin/chromium): `apt-get install -y chromium` to run the browser test")

UNDER = """([x, y]) => { const e = document.elementFromPoint(x, y); const b = e && e.closest('button');
    if (!b) return null; const a = getComputedStyle(b, '::after');
    return {title: b.title, after: a.content, position: a.position, overlay: !!b.closest('.weaktr-click')}; }"""


def checkpoint_b(folder) -> str:
    "A small WeakTr with the notebook dataset's class count, saved as a .pt in the lab's folder."
    from weaktr.data import open_dataset
    from weaktr.model import create_weaktr
    C = open_dataset("synthetic", "", "val").num_classes
    torch.manual_seed(7)
    m = create_weaktr("deit_tiny_patch16_224", C, img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                      reduction=2, drop_path_rate=0.0)
    torch.save({"model": m.state_dict()}, folder / "b.pt")
    return "b.pt"                                                       # relative to the kernel's folder (the lab's)


def test_hover_and_checkpoint_b(lab, tmp_path):  # noqa: F811  (lab: the fixture imported above)
    from playwright.sync_api import sync_playwright
    base, token, name, log = lab
    shots = tmp_path / "screenshots"
    shots.mkdir()
    ckpt = checkpoint_b(tmp_path / "nbs")
    (tmp_path / "nbs" / "notes.pt").write_text("hello\n")
    t0 = time.time()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            main = run_explorer_notebook(page, base, token, name)
            page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
            page.locator(".weaktr-explorer").evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(500)

            # hover: the patch button under the pointer holds the readout; the CSS draws it over the view
            b = main.bounding_box()
            x, y = b["x"] + 0.3 * b["width"], b["y"] + 0.25 * b["height"]
            page.mouse.move(b["x"] + b["width"] + 200, y)                 # off the view first
            plain = main.screenshot()
            page.mouse.move(x, y)
            page.wait_for_timeout(300)
            under = page.evaluate(UNDER, [x, y])
            assert under and under["overlay"], f"no patch button of the click overlay under the pointer: {under}"
            title = under["title"]
            m = re.match(r"patch \((\d+), (\d+)\) · (.+) = ", title)
            assert m, f"the hover readout does not start with the patch and the map value: {title!r}"
            assert "top head here: L" in title, title                   # the default map (refined CAM) is fused
            assert under["after"][1:-1] == title and under["position"] == "absolute", under
            hovered = main.screenshot(path=str(shots / "hover_view.png"))
            assert hovered != plain, "the readout strip is not drawn over the view"
            page.screenshot(path=str(shots / "hover.png"))
            # a click at the same point picks the same patch
            r, c = m.group(1), m.group(2)
            page.mouse.click(x, y)
            page.wait_for_function("(rc) => document.querySelector('.weaktr-status').innerText.includes(rc)",
                                   arg=f"patch ({r}, {c})", timeout=20_000)
            page.wait_for_function("""([x, y]) => { const b = document.elementFromPoint(x, y).closest('button');
                return b && b.title.includes('patch affinity row'); }""", arg=[x, y], timeout=20_000)
            # the same patch clicked again (the overlay's selection was cleared): a new status line, now naming
            # the map shown since the first click (its affinity row)
            page.mouse.click(x, y)
            page.wait_for_function("(rc) => document.querySelector('.weaktr-status').innerText.includes(rc)",
                                   arg=f"patch ({r}, {c}): patch affinity row", timeout=20_000)
            # in the lower half of the view the strip moves to the top (it never hides the hovered patch)
            y2 = b["y"] + 0.8 * b["height"]
            page.mouse.move(x, y2)
            page.wait_for_timeout(200)
            strip = page.evaluate("""([x, y]) => { const b = document.elementFromPoint(x, y).closest('button');
                const a = getComputedStyle(b, '::after'); return [a.top, a.bottom]; }""", [x, y2])
            assert strip[0] == "0px", f"the readout strip is not at the top while hovering the lower half: {strip}"
            page.mouse.move(x, y)
            page.wait_for_timeout(200)
            strip = page.evaluate("""([x, y]) => { const b = document.elementFromPoint(x, y).closest('button');
                const a = getComputedStyle(b, '::after'); return [a.top, a.bottom]; }""", [x, y])
            assert strip[1] == "0px" and strip[0] != "0px", f"the strip is not at the bottom (upper half): {strip}"

            # checkpoint B beside the main view
            page.mouse.move(b["x"] + b["width"] + 200, y)
            v2 = page.locator("img.weaktr-view2")
            before = v2.get_attribute("src")
            field = page.locator(".weaktr-explorer input[placeholder^='checkpoint']")
            field.scroll_into_view_if_needed()
            field.fill(ckpt)
            page.locator("button.weaktr-load-b").click()
            page.wait_for_function("(old) => document.querySelector('img.weaktr-view2').src !== old", arg=before,
                                   timeout=30_000)
            page.wait_for_function("() => document.querySelector('.weaktr-view2-title').innerText"
                                   ".includes('checkpoint B')", timeout=20_000)
            assert page.locator(".weaktr-view2-heads table").count() == 2
            page.locator(".weaktr-compare select").select_option(label="checkpoint B: the same view")
            page.locator(".weaktr-source select").select_option(label="fused CAM S·ReLU(M)")
            page.wait_for_function("() => /IoU B [0-9.]+ vs A [0-9.]+/.test("
                                   "document.querySelector('.weaktr-view2-title').innerText)", timeout=20_000)
            page.locator(".weaktr-explorer").evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(300)
            non_blank(page.screenshot(path=str(shots / "checkpoint_b.png")), (600, 400))
            # a file that is not a checkpoint: one line in the status, B stays
            field.fill("notes.pt")
            page.locator("button.weaktr-load-b").click()
            page.wait_for_function("() => document.querySelector('.weaktr-status').innerText.includes("
                                   "'is not a PyTorch checkpoint')", timeout=20_000)
            status = page.locator(".weaktr-status").inner_text()
            assert "Traceback" not in status and len(status.strip().splitlines()) == 1, status
            assert "checkpoint B" in page.locator(".weaktr-view2-title").inner_text()
            field.fill("")
            # learned vs uniform head weights with layer 1 off, for a query patch (the docs' compare screenshot)
            page.locator(".weaktr-explorer .widget-toggle-buttons button", has_text="switch on/off").click()
            page.locator("button.weaktr-row-1").click()
            page.wait_for_function("() => document.querySelector('.weaktr-view-title').innerText"
                                   ".includes('4 heads off')", timeout=20_000)
            page.wait_for_function("() => document.querySelector('.weaktr-view2-title').innerText"   # A's mask does
                                   ".includes('B has 2 × 2 heads: all on')", timeout=20_000)       # not fit B
            assert "heads off" not in page.locator(".weaktr-view2-title").inner_text()
            page.locator(".weaktr-compare select").select_option(
                label="baseline: refined CAM, uniform head weights (no AAF)")
            page.wait_for_function("() => document.querySelector('.weaktr-view2-title').innerText"
                                   ".includes('uniform head weights')", timeout=20_000)
            main.scroll_into_view_if_needed()
            b = main.bounding_box()
            page.mouse.click(b["x"] + 0.45 * b["width"], b["y"] + 0.4 * b["height"])
            page.wait_for_function("() => document.querySelector('.weaktr-view-title').innerText"
                                   ".includes('fused affinity')", timeout=20_000)
            page.mouse.move(b["x"] + b["width"] + 200, b["y"])
            page.locator(".weaktr-explorer").evaluate("e => e.scrollIntoView({block: 'start'})")
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "compare.png"))
        except Exception:
            try:
                page.screenshot(path=str(shots / "failure.png"))
            except Exception:
                pass
            print(f"screenshots in {shots}; jupyter log tail:\n{log.read_text()[-2000:]}")
            raise
        finally:
            browser.close()
    if os.environ.get("WEAKTR_EXPLORER_SHOTS"):
        for f in ("hover.png", "checkpoint_b.png", "compare.png"):
            shutil.copyfile(shots / f, os.path.join(os.environ["WEAKTR_EXPLORER_SHOTS"], f))
    print(f"browser test: {time.time() - t0:.1f} s, screenshots in {shots}")
