"""weaktr benchmark suite: every benchmark of bench/ beside its baseline, measured in the same run on the same card.

    python bench/run.py                                   # --quick: small settings, every available device
    python bench/run.py --quick --update BENCHMARKS.md    # ... and replace this machine's sections of BENCHMARKS.md
    python bench/run.py --full --update BENCHMARKS.md     # the issue's sizes on the GPU (CPU rows keep small settings)
    python bench/run.py --demo                            # also run the CPU demo (python -m weaktr.pipeline, ~15 min)
    ./kit bench [args]                                    # the same, in the kit's environment

What is measured (each sub-benchmark is its own script, run in a subprocess; a missing script is skipped with a note):
  phase1  bench/bench_phase1.py  Phase-1 train step, img/s and peak memory: WeakTr (fast attention) vs the plain
                                 timm ViT (and WeakTr with the reference attention path)
  camgen  bench/bench_camgen.py  CAM generation img/s: batched path vs the per-image reference path (maps
                                 asserted equal)
  crf     bench/bench_crf.py     pseudo labels (threshold + dense CRF + PNG) img/s: N worker processes vs 1 (CPU only)
  phase2  bench/bench_phase2.py  Phase-2 train step (kit vs reference attention, fp32) and MS+flip evaluation img/s
                                 (batched windows vs window by window, predictions asserted equal)
  memory  bench/bench_memory.py  Phase-1 saved-for-backward bytes (saved_tensors_hooks): WeakTr fast vs the plain timm
                                 ViT and vs WeakTr's reference path; train-step img/s of the fast path vs its code
                                 before issue 14
  demo    runs/demo/summary.json end-to-end CPU demo time (`--demo` runs it first); target: 15 min
Targets are judged as ratios within one run on one card (see BENCHMARKS.md); absolute numbers depend on the machine
and, on a shared machine, on its load (the load average is recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DEMO_TARGET_S = 15 * 60

# Sub-benchmark arguments: (mode, device type) -> argv. CPU rows always use the small settings.
SETTINGS = {
    "phase1": {"small": ["--backbone", "deit_tiny_patch16_224", "--batch", "8", "--img", "224", "--steps", "3",
                         "--warmup", "1"],
               "full": ["--backbone", "deit_small_patch16_224", "--batch", "64", "--img", "224", "--amp", "bf16",
                        "--steps", "20", "--warmup", "3"]},
    "camgen": {"small": ["--preset", "cpu-small", "--images", "8", "--batch", "8"],
               "full": ["--preset", "voc", "--amp", "bf16", "--images", "64"]},
    "crf": {"small": ["--images", "8", "--workers", "1", "2"],
            "full": ["--images", "64", "--workers", "1", str(min(8, os.cpu_count() or 1))]},
    "phase2": {"small": ["--backbone", "deit_tiny_patch16_224", "--img", "128", "--batches", "4", "--steps", "3",
                         "--warmup", "1", "--eval-images", "2"],
               "full": ["--backbone", "deit_small_patch16_224", "--img", "480", "--batches", "4", "16", "--amp", "fp16",
                        "--steps", "20", "--warmup", "3", "--eval-images", "10"]},
    "memory": {"small": ["--batch", "8", "--img", "224", "--classes", "20", "90", "--amp", "off", "bf16", "--steps",
                         "3"],
               "full": ["--batch", "64", "--img", "224", "--classes", "20", "90", "--amp", "off", "bf16", "--steps",
                        "10",
                        "--warmup", "2", "--step-amp", "bf16"]},
}
SCRIPTS = dict(phase1="bench_phase1.py", camgen="bench_camgen.py", crf="bench_crf.py", phase2="bench_phase2.py",
               memory="bench_memory.py")
DEVICE_BENCHES = ("phase1", "camgen", "phase2", "memory")      # run on every device; crf and demo are CPU-only
ALL = ("phase1", "camgen", "crf", "phase2", "memory", "demo")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    import timm
    import torch
    gpus = [torch.cuda.get_device_name(i)
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                timm=timm.__version__,
                python=platform.python_version(), cpu=cpu_model(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(),
                gpus=gpus, cuda=torch.version.cuda, load_average_start=round(os.getloadavg()[0], 2))


def slug(s: str) -> str: return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def run_script(name: str, argv: list[str], timeout: float) -> dict:
    "Run one bench script with --out <tmp json>; -> dict(status, command, seconds, result | error)."
    script = BENCH / SCRIPTS[name]
    rel = f"python bench/{SCRIPTS[name]} {shlex.join(argv)}"
    if not script.is_file():
        return dict(status="skipped", command=rel, note=f"{script.relative_to(ROOT)} not found")
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, str(script), *argv, "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                            os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "MPLBACKEND": "Agg"}
        t0 = time.time()
        print(f"== {rel}", flush=True)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(status="failed", command=rel, seconds=round(time.time() - t0, 1),
                        error=f"timed out after {timeout:.0f} s")
        dt = round(time.time() - t0, 1)
        print("\n".join("   " + l for l in r.stdout.strip().splitlines()[-14:]), flush=True)
        if r.returncode != 0 or not out.is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-12:]
            print(f"   FAILED (exit {r.returncode})\n" + "\n".join("   " + l for l in tail), flush=True)
            return dict(status="failed", command=rel, seconds=dt, error="\n".join(tail))
        return dict(status="ok", command=rel, seconds=dt, result=json.loads(out.read_text()))


# --- rows: (benchmark, setting, ours, baseline, ratio) ----------------------------------------------------------------
def _f(v, nd=1): return "–" if v is None else f"{v:,.{nd}f}"


def rows_phase1(r: dict) -> list[dict]:
    res = {x["model"]: x for x in r["result"]["results"]}
    a = r["result"]["args"]
    st = f"{a['backbone']}, batch {a['batch']}, {a['img']} px, amp {a['amp']}"
    base, fast, ref = res.get("timm_vit"), res.get("weaktr_fast"), res.get("weaktr_reference")
    out = []
    if fast and base:
        out.append(dict(bench="Phase-1 train step, img/s (WeakTr fast vs plain timm ViT)", setting=st,
                        ours=_f(fast["img_per_s"]),
                        baseline=_f(base["img_per_s"]), ratio=fast["img_per_s"] / base["img_per_s"], better="higher"))
        kind = "GPU max allocated" if "cuda" in fast["memory_kind"] else "peak RSS rise"
        out.append(dict(bench=f"Phase-1 train step, peak memory MiB ({kind})", setting=st,
                        ours=_f(fast["peak_mem_mib"], 0),
                        baseline=_f(base["peak_mem_mib"], 0),
                        ratio=fast["peak_mem_mib"] / base["peak_mem_mib"] if base["peak_mem_mib"] > 0 else None,
                        better="lower"))
    if ref and base:
        out.append(dict(bench="Phase-1 train step, img/s (WeakTr reference attention vs plain timm ViT)", setting=st,
                        ours=_f(ref["img_per_s"]), baseline=_f(base["img_per_s"]),
                        ratio=ref["img_per_s"] / base["img_per_s"],
                        better="higher"))
    return out


def rows_camgen(r: dict) -> list[dict]:
    x = r["result"]
    st = (f"{x['backbone']}, {x['image_hw'][0]}x{x['image_hw'][1]}, scales {x['scales']} x flip, {x['images']} images, "
          f"batch {x['batch']}, {x['amp']}; max abs diff {x['max_abs_diff']:.1e}")
    return [dict(bench="CAM generation, img/s (batched vs per-image reference)", setting=st,
                 ours=_f(x["batched_img_s"], 2),
                 baseline=_f(x["reference_img_s"], 2), ratio=x["speedup"], better="higher")]


def rows_crf(r: dict) -> list[dict]:
    x = r["result"]
    runs = x["runs"]
    one = next((q for q in runs if q["workers"] == 1), runs[0])
    st = (f"{x['images']} voc-mini images ({x['mean_kpx']} kpx), CRF {x['crf']}, {x['cpus']} CPUs, "
          f"load {x['load_average']:.1f}")
    return [dict(bench=f"pseudo labels (threshold + CRF), img/s ({q['workers']} workers vs 1)", setting=st,
                 ours=_f(q["images_per_s"], 2), baseline=_f(one["images_per_s"], 2),
                 ratio=q["images_per_s"] / one["images_per_s"], better="higher") for q in runs if q is not one]


def rows_phase2(r: dict) -> list[dict]:
    res, a, out = r["result"]["results"], r["result"]["args"], []
    for kit in (q for q in res if q["part"] == "train" and q["path"] == "kit"):
        ref = next((q for q in res if q["part"] == "train" and q["path"] == "reference" and q["batch"] == kit["batch"]),
                   None)
        if not ref: continue
        st = f"{a['backbone']}, batch {kit['batch']}, {a['img']} px, kit amp {kit['amp']} / reference amp {ref['amp']}"
        out.append(dict(bench="Phase-2 train step, img/s (kit vs reference attention)", setting=st,
                        ours=_f(kit["img_per_s"]),
                        baseline=_f(ref["img_per_s"]), ratio=kit["img_per_s"] / ref["img_per_s"], better="higher"))
        out.append(dict(bench="Phase-2 train step, peak memory MiB", setting=st, ours=_f(kit["peak_mem_mib"], 0),
                        baseline=_f(ref["peak_mem_mib"], 0),
                        ratio=kit["peak_mem_mib"] / ref["peak_mem_mib"] if ref["peak_mem_mib"] > 0 else None,
                        better="lower"))
    ev = next((q for q in res if q["part"] == "eval"), None)
    if ev:
        st = (f"{a['backbone']}, {ev['images']} images {ev['image_hw'][0]}x{ev['image_hw'][1]}, window "
              f"{ev['window']}/{ev['stride']}, 6 ratios x flip x 2 outputs, window batch {ev['window_batch']}; max abs "
              f"prob diff {ev['max_abs_prob_diff']:.1e}")
        out.append(dict(bench="evaluation, img/s (batched windows vs window by window)", setting=st,
                        ours=_f(ev["batched_img_per_s"], 2), baseline=_f(ev["window_by_window_img_per_s"], 2),
                        ratio=ev["speedup"], better="higher"))
    return out


def rows_memory(r: dict) -> list[dict]:
    x, out = r["result"], []
    by = {(q["model"], q["classes"], q["amp"]): q for q in x["saved"]}
    for (kind, C, amp), q in by.items():
        if kind != "weaktr_fast": continue
        st = f"{x['args']['backbone']}, batch {x['args']['batch']}, {x['args']['img']} px, C {C}, amp {amp}"
        for base, what in (("timm_vit", "plain timm ViT"), ("weaktr_reference", "WeakTr reference path")):
            b = by.get((base, None if base == "timm_vit" else C, amp))
            if b: out.append(dict(bench=f"Phase-1 saved-for-backward MiB (WeakTr fast vs {what})", setting=st,
                                  ours=_f(q["saved_mib"], 0), baseline=_f(b["saved_mib"], 0),
                                  ratio=q["saved_mib"] / b["saved_mib"], better="lower"))
    for s in x.get("steps", []):
        st = f"{x['args']['backbone']}, batch {s['batch']}, {x['args']['img']} px, C {s['classes']}, amp {s['amp']}"
        out.append(dict(bench="Phase-1 train step, img/s (fast path vs its code before issue 14)", setting=st,
                        ours=_f(s["img_per_s"]["after"], 2), baseline=_f(s["img_per_s"]["before"], 2),
                        ratio=s["after_vs_before"], better="higher"))
    return out


def demo_row(path: Path) -> tuple[dict, list[dict]]:
    if not path.is_file():
        return dict(status="skipped", note=f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} not found "
                                            "(run the demo first: `./kit demo`, or pass --demo)"), []
    s = json.loads(path.read_text())
    total = s.get("stage_seconds_total") or s.get("wall_s")
    st = f"{s.get('machine', '?')}, device {s.get('device', '?')}, {s.get('date', '?')}; from {path.name}"
    rec = dict(status="ok", command=f"read {path}", result=dict(stage_seconds_total=total, wall_s=s.get("wall_s"),
                                                               stages=s.get("stages"), metrics=s.get("metrics")))
    return rec, [dict(bench="CPU end-to-end demo, seconds (all stages vs the 15-min target)", setting=st,
                      ours=_f(total, 0), baseline=_f(DEMO_TARGET_S, 0), ratio=total / DEMO_TARGET_S if total else None,
                      better="lower")]


ROWS = dict(phase1=rows_phase1, camgen=rows_camgen, crf=rows_crf, phase2=rows_phase2, memory=rows_memory)


def section(key: str, title: str, env: dict, command: str, mode: str, records: dict, rows: list[dict]) -> str:
    L = [f"<!-- bench:{key}:start -->", f"## {title}", "",
         f"{env['date']} · torch {env['torch']} · timm {env['timm']} · Python {env['python']} · {env['cpu_count']} "
         f"CPUs (torch threads per benchmark: {env['bench_threads']}) · load average {env['load_average_start']} at "
         f"the start, {env.get('load_average_end', '?')} at the end · mode `{mode}`", "",
         f"Command: `{command}`", "",
         "| benchmark | setting | ours | baseline | ours / baseline |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = "–" if r["ratio"] is None else f"**{r['ratio']:.2f}x** ({r['better']} is better)"
        cells = [r["bench"], r["setting"], r["ours"], r["baseline"], ratio]
        L.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    L += ["", "Sub-benchmarks (each in its own process):", ""]
    for name, rec in records.items():
        what = rec.get("command", "")
        if rec["status"] == "ok": L.append(f"- {name}: `{what}` ({rec.get('seconds', 0):.0f} s)")
        elif rec["status"] == "skipped": L.append(f"- {name}: skipped: {rec['note']}")
        else: L.append(f"- {name}: `{what}` **failed**: {rec['error'].splitlines()[-1] if rec.get('error') else '?'}")
    L += ["", f"<!-- bench:{key}:end -->"]
    return "\n".join(L)


HEADER = """# Benchmarks

Written by `python bench/run.py` (`./kit bench`); `--update BENCHMARKS.md` replaces the sections of the machine it ran
on and keeps the others. Every number is measured in **one run on one card**, each beside its baseline measured in the
same run: WeakTr's Phase-1 step beside the plain timm ViT, the batched CAM generator beside the per-image reference
path, N CRF workers beside one, the batched sliding-window evaluation beside the window-by-window path, the kit's
Phase-2 step beside explicit (reference) attention. **Targets are judged on the ratio column** (ours / baseline), never
by comparing absolute numbers across machines or runs; batched and reference outputs are asserted equal by the scripts.

`--quick` (default) uses small settings that finish in minutes on a CPU; `--full` uses the issue's sizes on a GPU
(DeiT-S batch 64 at 224 px bf16 for Phase 1, VOC-sized CAM generation, 480-px Phase-2 crops at batch 4 and 16).
CPU sections always use the small settings, one torch thread per benchmark process (`--threads`). The CPU machine
that wrote the section below is shared by several processes (2 cores), so its absolute numbers are noisy; the load
average is recorded. With more torch threads than free cores, OpenMP spin-waiting made small ops up to 30x slower
there (a Phase-2 step: 7.5 s with 2 threads vs 0.23 s with 1, same settings, load 5), hence one thread.

**GPU: pending.** No GPU was available to the session that wrote this file; run
`python bench/run.py --full --update BENCHMARKS.md` on a GPU machine to add its section.
"""


def update_file(path: Path, key: str, text: str) -> None:
    "Replace the section `key` of the markdown file (or append it); create the file with HEADER if missing."
    old = path.read_text() if path.is_file() else HEADER
    pat = re.compile(rf"<!-- bench:{re.escape(key)}:start -->.*?<!-- bench:{re.escape(key)}:end -->", re.S)
    new = pat.sub(lambda m: text, old) if pat.search(old) else old.rstrip("\n") + "\n\n" + text + "\n"
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small settings everywhere (default)")
    g.add_argument("--full", action="store_true",
                   help="the issue's sizes on GPU devices (CPU rows keep the small settings)")
    ap.add_argument("--device", default="auto", help="auto (CPU, plus CUDA when present) | cpu | cuda | cuda:1 ...")
    ap.add_argument("--only", default=",".join(ALL), help=f"comma list of {list(ALL)}")
    ap.add_argument("--demo", action="store_true",
                    help="run the CPU demo first (python -m weaktr.pipeline --device cpu)")
    ap.add_argument("--demo-dir", default="runs/demo", help="demo run folder (its summary.json is read)")
    ap.add_argument("--out", default="runs/bench", help="folder for results.json and the markdown sections")
    ap.add_argument("--update", default=None, metavar="BENCHMARKS.md",
                    help="replace this machine's sections in that file")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per sub-benchmark")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the CPU benchmarks (default 1; 0 = torch's default). On a shared machine "
                         "more threads than free cores make OpenMP spin: small ops ran 30x slower here with 2 threads "
                         "at load 5")
    a = ap.parse_args(argv)
    mode = "full" if a.full else "quick"
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    if bad := [s for s in only if s not in ALL]: ap.error(f"--only: unknown {bad}; choose from {list(ALL)}")
    command = "python bench/run.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    env = environment()
    env["bench_threads"] = a.threads or env["torch_threads"]
    import torch
    if a.device == "auto": devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else: devices = [a.device]
    t0 = time.time()
    out_dir = (ROOT / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    all_json, sections = dict(environment=env, command=command, mode=mode, devices={}), {}
    for dev in devices:
        is_cpu = dev == "cpu"
        size = "full" if (a.full and not is_cpu) else "small"
        records, rows = {}, []
        for name in only:
            if name in DEVICE_BENCHES or (is_cpu and name == "crf"):
                argv_ = [*SETTINGS[name][size]] + ([] if name == "crf" else ["--device", dev])
                if is_cpu and a.threads and name != "crf": argv_ += ["--threads", str(a.threads)]   # crf sets 1 itself
                rec = run_script(name, argv_, a.timeout)
                records[name] = rec
                if rec["status"] == "ok":
                    try: rows += ROWS[name](rec)
                    except (KeyError, TypeError, ZeroDivisionError) as e:
                        rec.update(status="failed", error=f"could not read its JSON: {type(e).__name__}: {e}")
            elif name == "demo" and is_cpu:
                demo_dir = (ROOT / a.demo_dir) if not Path(a.demo_dir).is_absolute() else Path(a.demo_dir)
                if a.demo:
                    cmd = [sys.executable, "-m", "weaktr.pipeline", "--device", "cpu", "--run-dir", str(demo_dir)]
                    print(f"== {shlex.join(cmd)}", flush=True)
                    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
                rec, r = demo_row(demo_dir / "summary.json")
                records[name] = rec
                rows += r
        env["load_average_end"] = round(os.getloadavg()[0], 2)
        if is_cpu: key, title = f"cpu-{slug(env['cpu'])}", f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs)"
        else:
            name = torch.cuda.get_device_name(torch.device(dev))
            key, title = f"gpu-{slug(name)}", f"GPU: {name}"
        sections[key] = section(key, title, env, command, f"{mode} ({size} settings)", records, rows)
        all_json["devices"][dev] = dict(key=key, title=title, settings=size, records=records, rows=rows)
        print("\n" + sections[key] + "\n", flush=True)
    all_json["wall_s"] = round(time.time() - t0, 1)
    (out_dir / "results.json").write_text(json.dumps(all_json, indent=1, default=str))
    for key, text in sections.items(): (out_dir / f"{key}.md").write_text(text + "\n")
    if a.update:
        path = Path(a.update) if Path(a.update).is_absolute() else Path.cwd() / a.update
        for key, text in sections.items(): update_file(path, key, text)
        print(f"updated {path} ({', '.join(sections)})")
    print(f"wrote {out_dir / 'results.json'} in {all_json['wall_s']:.0f} s")
    failed = [f"{d}:{n}" for d, v in all_json["devices"].items() for n,
              r in v["records"].items() if r["status"] == "failed"]
    if failed: print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
