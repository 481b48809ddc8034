"""Every stage's fully resolved flat config, as the runs would get it: a guard for config refactors.

    python tools/resolved_configs.py            # print the JSON
    python tools/resolved_configs.py --check    # exit 1 (and list the differences) if it differs from the snapshot
    python tools/resolved_configs.py --write    # rewrite the snapshot tests/resolved_configs.json (a deliberate change)
    python tools/resolved_configs.py --against OLD.json   # compare with an older dump, modulo the DELIBERATE changes

What is resolved:
* `pipeline:<demo|quick>:<stage>`: the pipeline's stages (`weaktr.pipeline.build_stages`) as papermill runs them: the
  run notebook's defaults (= `config(**stage demo dict)`, checked by `python -m weaktr.grid check-parameters`), then
  the pipeline preset's parameters;
* `notebook:<stage>`: every registered run notebook with its own defaults (pretrain_backbone included);
* `preset:<file>:<stage>`: each stage of each `configs/*.yaml` preset as `export_preset` writes it for `papermill -f`,
  again over the run notebook's defaults;
each as the stage's config dataclass (`cfg_to_dict`, keys sorted) and, for the two training stages, the Learner's
`TrainCfg` derived from it (`<key>:learner`; train_cam on a CPU and on a CUDA device, which differ in `amp="auto"`).
Paths under the repository or a temporary run folder are written relative (`<repo>/...`, `<run>/...`), so the output
does not depend on where the checkout is. `tests/test_presets.py` compares it with the committed snapshot.
"""
from __future__ import annotations

import json, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "resolved_configs.json"


def _rel(v, subs):
    if isinstance(v, str):
        for a, b in subs: v = v.replace(a, b)
        return v
    if isinstance(v, list): return [_rel(x, subs) for x in v]
    if isinstance(v, dict): return {k: _rel(x, subs) for k, x in v.items()}
    return v


def _learner(stage: str, cfg) -> dict:
    "The Learner configs a training stage derives from its config ({} for the other stages)."
    import torch
    from weaktr.core import cfg_to_dict
    if stage == "train_cam":
        from weaktr.train_cam import _train_cfg
        return {dev: cfg_to_dict(_train_cfg(cfg, torch.device(dev))) for dev in ("cpu", "cuda")}
    if stage == "train_seg":
        from weaktr.train_seg import learner_cfg
        return {"any": cfg_to_dict(learner_cfg(cfg))}
    if stage == "pretrain_backbone":
        try: from weaktr.pretrain import pretrain_train_cfg
        except ImportError: return {}                             # a checkout from before the function
        return {"any": cfg_to_dict(pretrain_train_cfg(cfg))}
    return {}


def resolved() -> dict:
    "{key: sorted flat config} for every pipeline stage and every preset stage (see the module text)."
    import yaml
    from weaktr.core import cfg_from_flat, cfg_to_dict
    from weaktr.grid import export_preset, load_preset, notebook_defaults, stage_spec
    from weaktr.pipeline import PRESETS, build_stages
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="weaktr-resolved-")).resolve()
    subs = [(str(tmp), "<run>"), (str(ROOT), "<repo>"), (str(Path.home()), "~")]

    def add(key, kind, params):
        spec = stage_spec(kind)
        flat = {**notebook_defaults(spec.path), **params}
        cls = spec.config_class()
        if cls is None:
            out[key] = _rel(dict(sorted(flat.items())), subs)
            return
        cfg = cfg_from_flat(cls, flat)
        out[key] = _rel(dict(sorted(cfg_to_dict(cfg).items())), subs)
        for dev, tc in _learner(kind, cfg).items():
            out[f"{key}:learner:{dev}"] = _rel(dict(sorted(tc.items())), subs)

    from weaktr.grid import REGISTRY
    for name in REGISTRY:                                         # each run notebook as it stands (the demo's values)
        add(f"notebook:{name}", name, {})
    for pname, preset in PRESETS.items():
        for s in build_stages(tmp / "run", preset, data_root=str(tmp / "data")):
            add(f"pipeline:{pname}:{s.name}", s.kind, s.params)
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for stage in load_preset(path):
            add(f"preset:{path.name}:{stage}", stage, yaml.safe_load(export_preset(path, stage)))
    return out


# Deliberate changes of the composed-configs refactor (issue 11), for `--against` a dump of the code before it:
# SegTrainCfg.val_every was renamed eval_every (the LoopPart field); TrainCfg's "off" sentinels of clip_grad and
# max_steps became 0 (None still means off); fields a stage config gained from a shared part hold that part's default.
DELIBERATE = dict(renamed={"val_every": "eval_every"}, sentinels={"clip_grad": (None, 0.0), "max_steps": (None, 0)})


def legacy(old: dict, new: dict) -> dict:
    "`old` (a dump before the refactor) with the DELIBERATE changes applied: renames, sentinels, fields gained."
    out = {}
    for key, cfg in old.items():
        c = {DELIBERATE["renamed"].get(k, k): v for k, v in cfg.items()}
        for k, (was, now) in DELIBERATE["sentinels"].items():
            if k in c and c[k] == was: c[k] = now
        gained = set(new.get(key, {})) - set(c)
        c.update({k: new[key][k] for k in gained})
        out[key] = dict(sorted(c.items()))
    return out


def gained_fields(old: dict, new: dict) -> dict:
    "{field: sorted set of its values} over the fields the new dump has and the old one lacks (for the report)."
    out = {}
    for key in old:
        for k in set(new.get(key, {})) - {DELIBERATE["renamed"].get(f, f) for f in old[key]}:
            out.setdefault(k, set()).add(repr(new[key][k]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def diff(old: dict, new: dict) -> list[str]:
    "Readable differences between two resolved dumps ([] = identical)."
    lines = [f"{k}: only in the snapshot" for k in old if k not in new]
    lines += [f"{k}: new" for k in new if k not in old]
    for k in old:
        if k not in new: continue
        a, b = old[k], new[k]
        for f in sorted(set(a) | set(b)):
            if a.get(f, "<absent>") != b.get(f, "<absent>"):
                lines.append(f"{k}.{f}: {a.get(f, '<absent>')!r} -> {b.get(f, '<absent>')!r}")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, str(ROOT))
    new = resolved()
    if "--write" in argv:
        SNAPSHOT.write_text(json.dumps(new, indent=1) + "\n")
        print(f"wrote {SNAPSHOT} ({len(new)} configs)")
        return 0
    if "--against" in argv:
        old = json.loads(Path(argv[argv.index("--against") + 1]).read_text())
        d = diff(legacy(old, new), {k: v for k, v in new.items() if k in old})   # keys new since: not compared
        print("\n".join(d) if d else f"{len(new)} resolved configs: identical to the old dump modulo DELIBERATE")
        for k, v in gained_fields(old, new).items(): print(f"  gained {k}: {', '.join(v)}")
        return 1 if d else 0
    if "--check" in argv:
        d = diff(json.loads(SNAPSHOT.read_text()), new)
        print("\n".join(d) if d else f"{len(new)} resolved configs: identical to {SNAPSHOT.name}")
        return 1 if d else 0
    print(json.dumps(new, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
