"""Convert between nbdev notebooks and a plain "percent" script, for editing notebooks as text.

    python tools/nbconv.py to-nb  src.py  nbs/01_x.ipynb   # write the notebook (outputs dropped)
    python tools/nbconv.py to-py  nbs/01_x.ipynb  src.py   # write the script

Script format: cells start with a line `# %%` (code) or `# %% [markdown]` (markdown; every line of
the body is prefixed by `# `). Cell tags: `# %% tags=["parameters"]`; cell ids: `# %% id=1a2b3c4d` (kept, so
the exported modules' `# %% ../nbs/x.ipynb #id` lines do not change; a cell without one gets a fresh id).
"""
import json, re, secrets, sys
from pathlib import Path

HDR = re.compile(r'^# %%(?P<md> \[markdown\])?(?: tags=(?P<tags>\[.*?\]))?(?: id=(?P<id>[\w-]+))?\s*$')


def to_nb(src: str, dst: str):
    cells, cur = [], None
    for line in Path(src).read_text().splitlines():
        m = HDR.match(line)
        if m:
            cur = dict(kind='markdown' if m['md'] else 'code', tags=json.loads(m['tags']) if m['tags'] else [],
                       id=m['id'], lines=[])
            cells.append(cur)
            continue
        if cur is None:
            continue
        if cur['kind'] == 'markdown':
            line = line[2:] if line.startswith('# ') else ('' if line == '#' else line)
        cur['lines'].append(line)
    out, seen = [], set()
    for c in cells:
        while c['lines'] and not c['lines'][-1].strip():
            c['lines'].pop()
        while c['lines'] and not c['lines'][0].strip():
            c['lines'].pop(0)
        src_lines = [ln + '\n' for ln in c['lines']]
        if src_lines:
            src_lines[-1] = src_lines[-1][:-1]
        cid = c['id']
        while cid is None or cid in seen:
            cid = secrets.token_hex(4)
        seen.add(cid)
        cell = dict(cell_type=c['kind'], id=cid, metadata={'tags': c['tags']} if c['tags'] else {}, source=src_lines)
        if c['kind'] == 'code':
            cell.update(execution_count=None, outputs=[])
        out.append(cell)
    nb = dict(cells=out, metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')),
              nbformat=4, nbformat_minor=5)
    Path(dst).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')


def to_py(src: str, dst: str):
    nb = json.loads(Path(src).read_text())
    parts = []
    for c in nb['cells']:
        tags = c.get('metadata', {}).get('tags', [])
        hdr = ('# %%' + (' [markdown]' if c['cell_type'] == 'markdown' else '')
               + (f' tags={json.dumps(tags)}' if tags else '') + (f' id={c["id"]}' if c.get('id') else ''))
        body = ''.join(c['source']).splitlines()
        if c['cell_type'] == 'markdown':
            body = [('# ' + ln) if ln else '#' for ln in body]
        parts.append('\n'.join([hdr] + body))
    Path(dst).write_text('\n\n'.join(parts) + '\n')


if __name__ == '__main__':
    cmd, a, b = sys.argv[1:4]
    {'to-nb': to_nb, 'to-py': to_py}[cmd](a, b)
