"""Fault injection for CAM generation and pseudo labels (issue 16): stale outputs after the checkpoint or the CAMs
changed (item 4), CRF workers outliving a hard-killed parent (item 17), and the reference's fp16 numerics by default
(AMP)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import weaktr.core
from weaktr.camgen import CamGenCfg, cams_reference, generate_cams, load_cams
from weaktr.core import ResumeMismatch, amp_dtype, atomic_torch_save, file_sha256
from weaktr.pseudo import PseudoCfg, make_pseudo_labels
from weaktr.synth import make_synthetic, synthetic_dataset
from weaktr.testing import tiny_weaktr

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "synth", n_train=6, n_val=2, size=48, num_classes=3, seed=0)


def _train_phase1(run: Path, seed: int, num_classes: int = 3):
    """What (re-)training Phase 1 into `run` leaves behind: best.pt with new weights under the same path, and
    config.json."""
    run.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(dict(format="weaktr.learner.best/1", model=tiny_weaktr(num_classes, seed=seed).state_dict(),
                           epoch=0),
                      run / "best.pt")
    (run / "config.json").write_text(json.dumps(dict(backbone="deit_tiny_patch16_224", pool="avg")))


def _snapshot(folder: Path, pattern: str) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def _gen_cfg(synth, tmp_path, **kw):
    return CamGenCfg(**{**dict(run_dir=str(tmp_path / "gen"), checkpoint=str(tmp_path / "phase1"), data="synthetic",
                               data_root=str(synth), split="train", scales=(1.0,), amp="off", num_workers=0,
                               device="cpu"), **kw})


# ---------------------------------------------------------------- item 4: stale CAMs and pseudo labels

def test_gen_cams_refuses_stale_cams_after_retraining(synth, tmp_path):
    torch.set_num_threads(1)
    _train_phase1(tmp_path / "phase1", seed=0)
    cfg = _gen_cfg(synth, tmp_path)
    assert generate_cams(cfg)["n_generated"] == 6
    before = _snapshot(tmp_path / "gen" / "cams", "*")
    config_before = (tmp_path / "gen" / "config.json").read_bytes()

    _train_phase1(tmp_path / "phase1", seed=1)                 # re-trained into the same folder: same path, new weights
    with pytest.raises(ResumeMismatch) as e:                   # the old code skipped all 6 images and kept the old maps
        generate_cams(cfg)
    assert "checkpoint_sha256" in str(e.value) and "overwrite=True" in str(e.value)
    assert _snapshot(tmp_path / "gen" / "cams", "*") == before     # refused: nothing changed, not even the record
    assert (tmp_path / "gen" / "config.json").read_bytes() == config_before

    # overwrite=True whose new inputs fail validation (a 4-class checkpoint for 3-class data) keeps the old maps
    _train_phase1(tmp_path / "phase1_c4", seed=0, num_classes=4)
    with pytest.raises(ValueError, match="classes"):
        generate_cams(replace(cfg, checkpoint=str(tmp_path / "phase1_c4"), overwrite=True))
    assert _snapshot(tmp_path / "gen" / "cams", "*") == before

    s = generate_cams(replace(cfg, overwrite=True))               # restart: every map made again from the new weights
    assert (s["n_generated"], s["n_skipped"], s["n_restarted"]) == (6, 0, 6)
    assert s["checkpoint_sha256"] == file_sha256(tmp_path / "phase1" / "best.pt")
    ds = synthetic_dataset(synth, "train")
    new_model = tiny_weaktr(3, seed=1)
    for i in (0, 3):
        smp = ds[i]
        maps, ids = load_cams(tmp_path / "gen" / "cams" / f"{smp['id']}.npz")
        np.testing.assert_allclose(maps, cams_reference(new_model, smp["image"], smp["labels"],
                                                        scales=(1.0,))[ids].numpy(),
                                   atol=1e-5)
    assert generate_cams(cfg)["n_skipped"] == 6                    # same inputs again: plain resume


def test_gen_cams_record_ignores_paths_and_extends(synth, tmp_path):
    "Content, not names: a moved dataset and checkpoint resume; raising max_images extends; other settings refuse."
    torch.set_num_threads(1)
    _train_phase1(tmp_path / "phase1", seed=0)
    cfg = _gen_cfg(synth, tmp_path, max_images=4)
    assert generate_cams(cfg)["n_generated"] == 4
    moved = shutil.copytree(synth, tmp_path / "moved_data")
    shutil.copytree(tmp_path / "phase1", tmp_path / "phase1_copy")
    s = generate_cams(replace(cfg, data_root=str(moved), checkpoint=str(tmp_path / "phase1_copy"), max_images=0))
    assert (s["n_generated"], s["n_skipped"]) == (2, 4)
    for change, field in ((dict(amp="bf16"), "amp"), (dict(cam_dtype="float16"), "cam_dtype"),
                          (dict(refine=False), "refine"), (dict(scales=(1.0, 0.8)), "scales")):
        with pytest.raises(ResumeMismatch, match=field):
            generate_cams(replace(cfg, **change))
    png = moved / "JPEGImages" / "train_00002.png"
    png.write_bytes(png.read_bytes() + b"\0" * 7)
    with pytest.raises(ResumeMismatch, match="data_sha256"):       # the data list's content changed
        generate_cams(replace(cfg, data_root=str(moved)))


def test_pseudo_labels_refuse_stale_labels_after_cams_changed(synth, tmp_path):
    torch.set_num_threads(1)
    _train_phase1(tmp_path / "phase1", seed=0)
    gcfg = _gen_cfg(synth, tmp_path)
    generate_cams(gcfg)
    pcfg = PseudoCfg(run_dir=str(tmp_path / "ps"), cams_dir=str(tmp_path / "gen"), data="synthetic",
                     data_root=str(synth),
                     split="train", threshold_mode="fixed", threshold=0.5, crf="none", workers=1)
    assert make_pseudo_labels(pcfg)["n_written"] == 6
    before = _snapshot(tmp_path / "ps" / "pseudo", "*")

    _train_phase1(tmp_path / "phase1", seed=1)
    generate_cams(replace(gcfg, overwrite=True))                   # new CAMs in the same folder
    with pytest.raises(ResumeMismatch) as e:                       # the old code skipped all 6 and kept the old labels
        make_pseudo_labels(pcfg)
    assert "cams_record_sha256" in str(e.value)
    assert _snapshot(tmp_path / "ps" / "pseudo", "*") == before

    s = make_pseudo_labels(replace(pcfg, overwrite=True))
    assert (s["n_written"], s["n_skipped"], s["n_restarted"]) == (6, 0, 6)
    assert make_pseudo_labels(pcfg)["n_skipped"] == 6              # then it resumes


def test_pseudo_uses_public_resume_api():
    src = (REPO / "weaktr" / "pseudo.py").read_text()
    assert "_check_resume" not in src and "resume_check" in src
    assert callable(weaktr.core.resume_check) and callable(weaktr.core.resume_commit)


# ---------------------------------------------------------------- item 17: CRF workers outlive a hard-killed parent

def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try: stat = (d / "stat").read_text()
            except OSError: continue
            fields = stat[stat.rindex(")") + 2:].split()             # after "pid (comm) ": state, ppid, ...
            if int(fields[1]) == pid and fields[0] != "Z": out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    "Running (a zombie waiting for a reaper holds no memory: counts as gone)."
    try: stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError: return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pseudo_workers_die_with_a_hard_killed_parent(synth, tmp_path):
    generate_cams(CamGenCfg(run_dir=str(tmp_path / "gen"), data="synthetic", data_root=str(synth), split="train",
                            scales=(1.0,), amp="off", smoke=True, device="cpu"))
    script = tmp_path / "pseudo_job.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import weaktr.pseudo as P
        _crf = P.crf_label
        def slow_crf(*a, **k):                      # a long CRF, so the kill lands while the workers are busy
            time.sleep(300); return _crf(*a, **k)
        P.crf_label = slow_crf
        P.make_pseudo_labels(P.PseudoCfg(run_dir={str(tmp_path / 'ps')!r}, cams_dir={str(tmp_path / 'gen')!r},
                                         data="synthetic", data_root={str(synth)!r}, split="train",
                                         threshold_mode="fixed", crf="voc", workers=2, score=False))
        """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    workers = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(workers) < 2 and proc.poll() is None:
            time.sleep(0.3)
            workers = _children(proc.pid)
        out = proc.stdout.read().decode()[-2000:] if proc.poll() is not None else ''
        assert len(workers) == 2, f"expected 2 pool workers, found {workers}; job output: {out}"
        time.sleep(1.0)                                              # workers initialised and inside the slow CRF
        os.kill(proc.pid, signal.SIGKILL)                            # a hard kill of the main process
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers): time.sleep(0.2)
        alive = [w for w in workers if _alive(w)]
        assert not alive, f"pool workers {alive} outlived their killed parent"
    finally:
        if proc.poll() is None: proc.kill()
        for w in workers:                                            # only the two processes this test caused
            if _alive(w):
                try: os.kill(w, signal.SIGKILL)
                except ProcessLookupError: pass
        proc.stdout.close()


# ---------------------------------------------------------------- AMP: the reference's numerics by default

def test_amp_auto_is_the_references_fp16_even_where_bf16_is_supported(monkeypatch):
    # an A100/H100: the old "auto" picked bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype("auto", torch.device("cuda")) == torch.float16
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("bf16", torch.device("cuda")) == torch.bfloat16              # bf16 stays an option


def test_every_amp_mode_runs_cam_generation_on_cpu(synth, tmp_path):
    "off, fp16 and bf16 autocast all run on the CPU (the old code refused fp16 there), store float32 maps by default,"
    "and stay near the fp32 maps (fp16 much nearer than bf16)."
    torch.set_num_threads(1)
    _train_phase1(tmp_path / "phase1", seed=0)
    maps = {}
    for amp in ("off", "fp16", "bf16"):
        s = generate_cams(_gen_cfg(synth, tmp_path, run_dir=str(tmp_path / f"gen_{amp}"), amp=amp, scales=(1.0, 0.8)))
        assert s["amp"] == {"off": "fp32", "fp16": "fp16", "bf16": "bf16"}[amp] and s["n_generated"] == 6
        with np.load(tmp_path / f"gen_{amp}" / "cams" / "train_00000.npz") as z: assert z["maps"].dtype == np.float32
        maps[amp] = np.concatenate([load_cams(p)[0].ravel()
                                    for p in sorted((tmp_path / f"gen_{amp}" / "cams").glob("*.npz"))])
    d16, dbf = np.abs(maps["fp16"] - maps["off"]).max(), np.abs(maps["bf16"] - maps["off"]).max()
    print(f"max |CAM - fp32|: fp16 {d16:.4f}, bf16 {dbf:.4f}")
    assert 0 < d16 < 0.02 and d16 < dbf < 0.2
    s = generate_cams(_gen_cfg(synth, tmp_path, run_dir=str(tmp_path / "gen_f16store"), cam_dtype="float16"))
    with np.load(tmp_path / "gen_f16store" / "cams" / "train_00000.npz") as z: assert z["maps"].dtype == np.float16


def test_train_cam_amp_follows_core_amp_dtype():
    "Phase-1 training resolves amp like CAM generation: auto = fp16 on CUDA, off on CPU; fp16 (GradScaler) runs on CPU."
    from weaktr.train_cam import CamTrainCfg, _train_cfg
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _train_cfg(CamTrainCfg(amp="auto"), cpu).amp == "off"
    assert _train_cfg(CamTrainCfg(amp="auto"), cuda).amp == "fp16"
    assert _train_cfg(CamTrainCfg(amp="fp16"), cpu).amp == "fp16"       # was a ValueError: "needs CUDA"
    assert _train_cfg(CamTrainCfg(amp="bf16"), cpu).amp == "bf16"
