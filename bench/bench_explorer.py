"""Explorer latency and memory on a CPU: control updates, a new image, a 1280 x 960 photo upload.

Drives `weaktr.explorer.HeadExplorer` headless exactly as the widgets do (setting widget values, clicking buttons)
and times each interaction end to end (all drawing included, the browser's part excluded). Each measurement runs
in a fresh process so that its peak-RSS rise is its own.

    python bench/bench_explorer.py --preset demo  --threads 1            # the notebooks' model (shipped backbone)
    python bench/bench_explorer.py --preset deit-s --threads 1           # DeiT-S layout (12 x 6 heads, patch 16)
    python bench/bench_explorer.py --preset demo --baseline --markdown   # + the old fixed 448-px working size

Presets: `demo` = `weaktr.explorer.demo_model` (the shipped pretrained ViT, D=128, 4 blocks x 4 heads, patch 8)
with C=8 synthetic classes; `deit-s` = a random-init `deit_small_patch16_224` WeakTr (C=6). Targets of issue 12
(2-core CPU): every control <= 0.3 s, a new image <= 0.5 s, a 1280 x 960 upload <= 1.5 s and <= 500 MB extra.
`--baseline` adds the upload at max_side=448 (the explorer's working size before issue 12). `checkpoint_b` loads a
second checkpoint (the same model's weights, saved to a temporary .pt) for the side-by-side compare, then times new
images with it beside. Results: `--out results/bench_explorer_<preset>.json`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from _timing import add_process_args, peak_rss_mib, rss_mib, run_child  # noqa: E402

CONTROLS = ("map", "class", "opacity", "threshold", "colormap", "head click", "head off", "layer toggle",
            "all heads on", "image click", "compare", "attn mass")


def git_commit() -> str | None:
    "The checkout's commit (+ '-dirty' with uncommitted changes), or None outside git."
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=root, capture_output=True, text=True).stdout.strip()   # result files do not count
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def timed(fn):
    "(wall seconds, CPU seconds of this process) of fn(): on a shared machine CPU time is what an idle core would take."
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def build(preset: str, max_side):
    "A HeadExplorer over a small synthetic set for the preset's model."
    from weaktr.synth import make_synthetic, synthetic_dataset
    from weaktr.explorer import head_explorer, demo_model
    from weaktr.model import create_weaktr
    C = 8 if preset == "demo" else 6
    root = make_synthetic(Path(tempfile.mkdtemp()) / "s", n_train=12, n_val=0, size=64, num_classes=C, seed=3)
    ds = synthetic_dataset(root, "train")
    torch.manual_seed(0)
    model = demo_model(C) if preset == "demo" else create_weaktr("deit_small_patch16_224", C, drop_path_rate=0.0)
    return head_explorer(model.eval(), ds, max_side=max_side, export_dir=tempfile.mkdtemp()).explorer


def build_like(model):
    "A fresh randomly initialised WeakTr of the same preset (the cost of building one before its weights are loaded)."
    from weaktr.explorer import demo_model
    from weaktr.model import create_weaktr
    if model.depth == 12:
        return create_weaktr("deit_small_patch16_224", model.num_classes, drop_path_rate=0.0)
    return demo_model(model.num_classes, pretrained=False)


def photo(W=1280, H=960, seed=0) -> bytes:
    "A 1280 x 960 JPEG with photo-like smooth structure and noise."
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((W, H), Image.BICUBIC)
    a = np.asarray(im, np.int16) + rng.integers(-12, 13, (H, W, 3))
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def measure_controls(ex, repeats: int) -> dict:
    "Median seconds per control (each set to alternating values `repeats` times)."
    h, w = ex.analysis.grid
    ex.all_classes.value = True
    first = ex.cls_dd.value
    other = [c for c in range(ex.model.num_classes) if c != first][0]
    steps = {
        "map": lambda i: setattr(ex.source, "value", ("fused", "refined")[i % 2]),
        "class": lambda i: setattr(ex.cls_dd, "value", (other, first)[i % 2]),
        "opacity": lambda i: setattr(ex.alpha, "value", (0.3, 0.6)[i % 2]),
        "threshold": lambda i: setattr(ex.threshold, "value", (0.3, 0.5)[i % 2]),
        "colormap": lambda i: setattr(ex.cmap, "value", ("magma", "jet")[i % 2]),
        "head "
        "click": lambda i: (setattr(ex.click_mode, "value", "select"), ex._cells[i % ex.model.depth, 1][1].click()),
        "head off": lambda i: (setattr(ex.click_mode, "value", "toggle"), ex._cells[0, 0][1].click()),
        "layer toggle": lambda i: setattr(ex._rows[1], "value", not ex._rows[1].value),
        "all heads on": lambda i: ex.all_on.click(),
        "image click": lambda i: setattr(ex.click_grid, "index", (i * 7) % len(ex.click_grid.options)),
        "compare": lambda i: setattr(ex.compare, "value", ("refined_uniform", "rollout")[i % 2]),
        "attn mass": lambda i: setattr(ex.mass, "value", (0.6, 0.0)[i % 2]),
    }
    out, cpu = {}, {}
    for name in CONTROLS:
        ex.source.value = "refined"
        ts = []
        for i in range(repeats):
            if name == "all heads on": ex._rows[2].value = False
            ts.append(timed(lambda: steps[name](i)))
        errors = [m for m in ex.messages if m[0] == "error"]
        assert not errors, (name, errors[-1])
        out[name], cpu[name] = float(np.median([t[0] for t in ts])), float(np.median([t[1] for t in ts]))
    return out, cpu


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"] or torch.get_num_threads())
    what, preset, max_side = spec["what"], spec["preset"], spec["max_side"]
    ex = build(preset, max_side)
    res = {"what": what, "preset": preset, "max_side": max_side, "model": ex.title.value}
    if what == "controls":
        res["controls"], res["controls_cpu"] = measure_controls(ex, spec["repeats"])
    elif what == "new_image":
        ts = [timed(lambda: setattr(ex.index, "value", i)) for i in range(1, 1 + spec["repeats"])]   # uncached items
        res["new_image_s"] = float(np.median([t[0] for t in ts]))
        res["new_image_cpu_s"] = float(np.median([t[1] for t in ts]))
        res["next_button_s"], res["next_button_cpu_s"] = timed(ex.next_btn.click)
    elif what == "checkpoint_b":                                # a second checkpoint of the same model, beside
        path = Path(tempfile.mkdtemp()) / "b.pt"
        torch.save({"model": ex.model.state_dict()}, path)
        res["checkpoint_mib"] = path.stat().st_size / 2**20
        from weaktr.explorer import load_explorer_model
        res["load_b_model_only_cpu_s"] = timed(lambda: load_explorer_model(path))[1]   # file -> model, no drawing
        res["load_b_torch_load_cpu_s"] = timed(lambda: torch.load(path, map_location="cpu", weights_only=True))[1]
        res["load_b_build_random_init_cpu_s"] = timed(lambda: build_like(ex.model))[1]   # what the load overwrites
        res["load_b_s"], res["load_b_cpu_s"] = timed(lambda: ex.load_compare_checkpoint(path))
        assert ex.compare.value == "ckpt_b" and ex.model2 is not None, ex.messages[-1]
        ts = [timed(lambda: setattr(ex.index, "value", i)) for i in range(1, 1 + spec["repeats"])]   # A and B analyse
        res["new_image_with_b_s"] = float(np.median([t[0] for t in ts]))
        res["new_image_with_b_cpu_s"] = float(np.median([t[1] for t in ts]))
    elif what == "upload":
        data = photo()
        import gc
        gc.collect()
        rss0, peak0 = rss_mib(), peak_rss_mib()
        dt, dc = timed(lambda: ex.add_upload("photo_1280x960.jpg", data))
        assert ex.analysis.id == "photo_1280x960.jpg", ex.messages[-1]
        res.update(upload_s=dt, upload_cpu_s=dc, rss_rise_mib=rss_mib() - rss0,
                   peak_rise_mib=max(peak_rss_mib() - rss0, 0.0) if peak_rss_mib() > peak0 else None,
                   grid=list(ex.analysis.grid), fed=list(ex.analysis.image.shape[1::-1]))
        res["upload_parts_cpu_s"] = upload_parts(ex, data)
    return res


def upload_parts(ex, data: bytes) -> dict:
    "Where an upload's time goes, each part re-run once after the measured upload: CPU seconds (median of 3)."
    from weaktr.viz import prepare_image, analyze_image
    key = ex._shown_key
    full = prepare_image(Image.open(io.BytesIO(data)), 1, None)[0]
    def cpu(fn):
        return float(np.median([timed(fn)[1] for _ in range(3)]))
    def redraw():
        ex._grid_key = None                                      # the thumbnails are redrawn too
        ex._refresh(grid=True)
    def layout():
        ex.click_grid.options = []                               # the click overlay rebuilt for the new grid
        ex._layout_view()
    return {"JPEG decode to RGB (full size)": cpu(lambda: Image.open(io.BytesIO(data)).convert("RGB")),
            "model pass at the working size (analyze_image)":
                cpu(lambda: analyze_image(ex.model, full, None, None, ex.class_names(), max_side=ex.max_side)),
            "display copy (resize to the view)": cpu(lambda: full.resize(ex.base.shape[1::-1], Image.LANCZOS)),
            "click overlay + hover CSS (_layout_view)": cpu(layout),
            "drawing: view, beside, readouts, thumbnails (_refresh)": cpu(redraw),
            "all (the widget path, cache cleared)": cpu(lambda: (ex.cache.pop(key, None), ex._show_item(key)))}


def upload_ab(a, spec: dict):
    "The 1280 x 960 upload, this checkout and `a.against` alternately (fresh processes), `a.rounds` rounds."
    import subprocess
    other = Path(a.against).resolve()
    scripts = {"this": Path(__file__).resolve(), "against": other / "bench" / "bench_explorer.py"}
    commits = {"this": git_commit(), "against": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=other,
                                                               capture_output=True, text=True).stdout.strip()}
    runs = {k: [] for k in scripts}
    load0 = os.getloadavg()[0]
    for _ in range(a.rounds):
        for k, script in scripts.items():
            cmd = [sys.executable, str(script), "--threads", str(a.threads), "--_child", json.dumps(spec)]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=script.parents[1])
            if res.returncode != 0:
                raise RuntimeError(f"{k} ({script}) failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            runs[k].append({x: r[x] for x in ("upload_s", "upload_cpu_s", "peak_rise_mib", "rss_rise_mib")})
    med = {k: {m: float(np.median([r[m] for r in v])) for m in ("upload_s", "upload_cpu_s")} for k, v in runs.items()}
    meta = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), cpus=os.cpu_count(), torch=torch.__version__,
                threads=a.threads, load_start=round(load0, 2), load_end=round(os.getloadavg()[0], 2),
                preset=a.preset, rounds=a.rounds, commits=commits,
                command="python bench/bench_explorer.py " + " ".join(sys.argv[1:]))
    out = dict(meta=meta, medians=med, runs=runs)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))
    for k in scripts:
        print(f"{k} ({commits[k]}): upload median {med[k]['upload_s']:.3f} s wall, {med[k]['upload_cpu_s']:.3f} s CPU "
              f"over {a.rounds} rounds")
    print(json.dumps(meta))


def markdown(results: list[dict]) -> None:
    "Print the markdown tables of one run's results (what --markdown prints; --render FILE reprints a saved run)."
    r = {(x["what"], x["max_side"]): x for x in results}
    c, cc = r["controls", "auto"]["controls"], r["controls", "auto"]["controls_cpu"]
    up, ni = r["upload", "auto"], r["new_image", "auto"]
    worst = max(c, key=c.get)
    mem = lambda x: (f"{x['peak_rise_mib']:.0f} peak" if x["peak_rise_mib"] is not None
                     else f"{x['rss_rise_mib']:.0f} resident (peak below the build's)")
    rows = [("every control, worst median", f"{c[worst]:.3f} ({worst})", f"{cc[worst]:.3f}", "≤ 0.3 s"),
            ("controls, median of the medians", f"{np.median(list(c.values())):.3f}",
             f"{np.median(list(cc.values())):.3f}", "≤ 0.3 s"),
            ("new image (dataset #)", f"{ni['new_image_s']:.3f}", f"{ni['new_image_cpu_s']:.3f}", "≤ 0.5 s"),
            ("new image (next ▶)", f"{ni['next_button_s']:.3f}", f"{ni['next_button_cpu_s']:.3f}", "≤ 0.5 s"),
            (f"1280×960 JPEG upload: fed {up['fed'][0]}×{up['fed'][1]}, grid {up['grid'][0]}×{up['grid'][1]}",
             f"{up['upload_s']:.2f}", f"{up['upload_cpu_s']:.2f}", "≤ 1.5 s"),
            ("1280×960 upload: memory rise (MiB)", mem(up), "", "≤ 500 MB")]
    if ("checkpoint_b", "auto") in r:
        b = r["checkpoint_b", "auto"]
        rows += [(f"load checkpoint B ({b['checkpoint_mib']:.0f} MiB) and show it beside", f"{b['load_b_s']:.2f}",
                  f"{b['load_b_cpu_s']:.2f}", ""),
                 ("… of which reading the file into a model", "", f"{b['load_b_model_only_cpu_s']:.2f}", ""),
                 ("… … torch.load of the file alone", "", f"{b['load_b_torch_load_cpu_s']:.2f}", ""),
                 ("… … building a randomly initialised model alone", "",
                  f"{b['load_b_build_random_init_cpu_s']:.2f}", ""),
                 ("new image with checkpoint B beside (A and B analyse it)", f"{b['new_image_with_b_s']:.3f}",
                  f"{b['new_image_with_b_cpu_s']:.3f}", "")]
    if ("upload", 448) in r:
        b = r["upload", 448]
        rows += [(f"baseline (old fixed max_side=448): upload, fed {b['fed'][0]}×{b['fed'][1]}, grid "
                  f"{b['grid'][0]}×{b['grid'][1]}",
                  f"{b['upload_s']:.2f}", f"{b['upload_cpu_s']:.2f}",
                  f"ours / baseline: **{up['upload_s'] / b['upload_s']:.2f}x** wall"),
                 ("baseline: memory rise (MiB)", mem(b), "", "")]
    print("| measurement | wall s | CPU s | target |\n|---|---|---|---|")
    for row in rows: print("| " + " | ".join(row) + " |")
    parts = up["upload_parts_cpu_s"]
    print("\n1280×960 upload, CPU s per part: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    print("\nper control, median wall / CPU s: " + ", ".join(f"{k} {c[k]:.3f} / {cc[k]:.3f}" for k in c))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["demo", "deit-s"], default="demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", action="store_true", help="also the upload at the old fixed max_side=448")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--against", default=None, metavar="CHECKOUT",
                    help="A/B: alternate the upload measurement of this checkout and of another checkout's "
                         "bench/bench_explorer.py (each in a fresh process importing its own weaktr), --rounds times")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the --against comparison")
    ap.add_argument("--render", default=None, metavar="FILE",
                    help="print the markdown tables of a saved run (an --out file) and its meta; measures nothing")
    add_process_args(ap)
    a = ap.parse_args(argv)
    if a.render:
        saved = json.loads(Path(a.render).read_text())
        markdown(saved["results"])
        print(json.dumps(saved["meta"]))
        return
    if a._child:
        print(json.dumps(child(json.loads(a._child))))
        return
    base = dict(preset=a.preset, threads=a.threads, repeats=a.repeats, max_side="auto")
    if a.against:
        return upload_ab(a, dict(base, what="upload"))
    specs = [dict(base, what=w) for w in ("controls", "new_image", "upload", "checkpoint_b")]
    if a.baseline: specs.append(dict(base, what="upload", max_side=448))
    load0 = os.getloadavg()[0]
    results = [run_child(__file__, json.dumps(s)) for s in specs]
    meta = dict(date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, python=platform.python_version(), threads=a.threads,
                load_start=round(load0, 2), load_end=round(os.getloadavg()[0], 2), preset=a.preset,
                command="python bench/bench_explorer.py " + " ".join(sys.argv[1:]), commit=git_commit())
    out = dict(meta=meta, results=results)
    if a.out: Path(a.out).write_text(json.dumps(out, indent=1))
    if a.markdown: markdown(results)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
