"""Run the lesson notebooks headless (Jupyter kernel, working directory nbs/), save the executed copies and a
summary table (notebook, status, seconds, headline figure) in an output folder.

Cells tagged `#| eval: false` are skipped, as are cells tagged with a flag that is not on (`#| slow`, `#| cuda`).
Flags on: COURSE_FLAGS if set (space-separated), else `slow` at full size plus `cuda` when a GPU is present."""
import argparse, os, re, sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
_directive = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')

def directives(cell):
    "The `#| name [value]` lines at the top of a cell, as a dict."
    res = {}
    for line in cell.source.splitlines():
        if not line.strip(): continue
        m = _directive.match(line)
        if not m: break
        res[m.group(1)] = m.group(2)
    return res

def skip_cell(cell, flags):
    d = directives(cell)
    return d.get('eval', '').lower() == 'false' or any(k in ('slow', 'cuda') and k not in flags for k in d)

def default_flags():
    if 'COURSE_FLAGS' in os.environ: return set(os.environ['COURSE_FLAGS'].split())
    import torch
    return ({'slow'} if os.environ.get('COURSE_SIZE', 'full') == 'full' else set()) | ({'cuda'} if torch.cuda.is_available() else set())

def headlines(nb):
    "The `headline: name = value` lines the lesson printed."
    out = []
    for c in nb.cells:
        for o in c.get('outputs', []):
            if o.get('output_type') == 'stream': out += [l[len('headline: '):] for l in o.get('text', '').splitlines() if l.startswith('headline: ')]
    return '; '.join(out)

def run(path, out_dir, flags, timeout):
    nb = nbformat.read(path, as_version=4)
    skipped = []
    for c in nb.cells:
        if c.cell_type == 'code' and skip_cell(c, flags):
            skipped.append(c); c.metadata['course_skipped'] = True
    kept = [c for c in nb.cells if not c.metadata.get('course_skipped')]
    runnable = nbformat.v4.new_notebook(cells=kept, metadata=nb.metadata)
    start, status = time.time(), 'ok'
    client = NotebookClient(runnable, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(NBS)}})
    try: client.execute()
    except CellExecutionError as e:
        last = [l for l in re.sub(r'\x1b\[[0-9;]*m', '', str(e)).strip().splitlines() if l.strip()]
        status = 'FAILED: ' + (last[-1][:150] if last else 'error')
    except Exception as e: status = f'FAILED: {type(e).__name__}: {str(e)[:150]}'
    secs = time.time() - start
    nbformat.write(runnable, out_dir/path.name)
    return status, secs, headlines(runnable), len(skipped)

def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--out', required=True, help='folder for the executed notebooks and the summary')
    p.add_argument('--timeout', type=int, default=None, help='seconds allowed per cell (default: no limit)')
    p.add_argument('notebooks', nargs='*', help='notebooks to run (default: every nbs/[0-9]*.ipynb)')
    a = p.parse_args()
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    nbs = [Path(n) for n in a.notebooks] or sorted(NBS.glob('[0-9]*.ipynb'))
    flags = default_flags()
    print(f"Running {len(nbs)} notebooks, COURSE_SIZE={os.environ.get('COURSE_SIZE', 'full')}, flags on: {sorted(flags) or 'none'}, into {out}")
    rows = []
    for nb in nbs:
        status, secs, head, nskip = run(nb.resolve(), out, flags, a.timeout)
        rows.append((nb.name, status, f'{secs:.1f}', head or '-', str(nskip)))
        print(f'  {nb.name}: {status} in {secs:.1f}s  {head}', flush=True)
    hdr = ('notebook', 'status', 'seconds', 'headline', 'cells skipped')
    table = ['| ' + ' | '.join(hdr) + ' |', '|' + '---|' * len(hdr)] + ['| ' + ' | '.join(r) + ' |' for r in rows]
    (out/'summary.md').write_text('\n'.join(table) + '\n')
    (out/'summary.tsv').write_text('\n'.join('\t'.join(r) for r in [hdr] + rows) + '\n')
    print('\n'.join(table)); print(f'Executed notebooks and summary in {out}')
    sys.exit(0 if all(r[1] == 'ok' for r in rows) else 1)

if __name__ == '__main__': main()
