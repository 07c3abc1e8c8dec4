"""Run the lesson notebooks headless, the way a student's main job does: each in a Jupyter kernel (working directory
nbs/, matplotlib's inline backend so every figure is kept), then write to an output folder the executed copies, an
HTML page per lesson, `index.html` (one row per lesson: its title and a link to its page, status, time, a thumbnail
of its key figure, its headline figures beside the 2018 lesson's) and `summary.md` / `summary.tsv`.

A lesson's key figure is the first figure of a cell marked `#| figure: key` (else its last figure); its headline
figures are the `headline: name = value` lines it prints, with `(2018: x)` where the 2018 lesson gave the figure.

Cells tagged `#| eval: false` are skipped, as are cells tagged with a flag that is not on (`#| cuda`).
Size and flags follow the device the lessons train on (`course_lib.core.default_device`, so `COURSE_DEVICE=cpu` on a GPU
box gives the CPU's): COURSE_SIZE if set, else `full` on CUDA and `medium` on the CPU; COURSE_FLAGS if set
(space-separated), else `cuda` on CUDA and none on the CPU. On a box whose GPU torch cannot use, it says so first.

Each notebook runs in a Jupyter kernel (nbclient), or with `--engine execnb` in a child Python process through execnb's
in-process shell, for a machine with nbdev's packages but no Jupyter (the GPU check: tools/gpu_check.sh). execnb keeps
figures; a cell that draws a figure loses what it printed, so headlines are best printed in a cell of their own."""
import argparse, base64, html, io, json, os, re, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'
FLAGS = ('cuda',)
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
    return d.get('eval', '').lower() == 'false' or any(k in FLAGS and k not in flags for k in d)

def device():
    "The device the lessons will train on, as `course_lib` picks it (`COURSE_DEVICE`, else CUDA when torch can use it)."
    from course_lib.core import default_device
    try: return default_device()
    except ValueError as e: sys.exit(str(e))

def pick_size(dev):
    "COURSE_SIZE if set, else `full` on CUDA and `medium` on the CPU; and the reason, to print."
    if s := os.environ.get('COURSE_SIZE', '').strip().lower():
        if s not in ('quick', 'medium', 'full'): sys.exit(f"COURSE_SIZE={s!r}, expected one of 'quick', 'medium', 'full'")
        return s, 'COURSE_SIZE is set'
    return ('full', f'the lessons train on {dev}') if dev.type == 'cuda' else ('medium', f'the lessons train on {dev} (full size is for a GPU)')

def default_flags(dev):
    if 'COURSE_FLAGS' in os.environ: return set(os.environ['COURSE_FLAGS'].split())
    return {'cuda'} if dev.type == 'cuda' else set()

_head = re.compile(r'^headline: (.*?) = (.*?)(?: \(2018: (.*)\))?$')

def headlines(nb):
    "The `(name, value, 2018 value or '')` of each `headline: name = value (2018: x)` line the lesson printed."
    out = []
    for c in nb.cells:
        for o in c.get('outputs', []):
            if o.get('output_type') != 'stream': continue
            out += [(m[1], m[2], m[3] or '') for l in o.get('text', '').splitlines() if (m := _head.match(l))]
    return out

def fmt_headlines(hs): return '; '.join(f'{n} = {v}' + (f' (2018: {l})' if l else '') for n, v, l in hs)

def title(nb):
    "The lesson's title: its first markdown heading."
    for c in nb.cells:
        if c.cell_type == 'markdown' and (m := re.search(r'^#\s+(.+)$', c.source, re.M)): return m[1].strip()
    return ''

def pngs(cell): return [o['data']['image/png'] for o in cell.get('outputs', []) if 'image/png' in o.get('data', {})]

def n_figures(nb): return sum(len(pngs(c)) for c in nb.cells)

def key_figure(nb):
    "The lesson's key figure as PNG bytes: the first figure of a cell marked `#| figure: key`, else its last figure (None without one)."
    marked = [p for c in nb.cells if c.cell_type == 'code' and directives(c).get('figure') == 'key' for p in pngs(c)]
    figs = marked[:1] or [p for c in nb.cells for p in pngs(c)][-1:]
    return base64.b64decode(figs[0]) if figs else None

def thumbnail(png, path, width=360):
    "Write `png` scaled down to at most `width` pixels wide to `path`."
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert('RGB')
    if im.width > width: im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    im.save(path)

def to_html(nb, path):
    "Render executed notebook `nb` to a standalone HTML page at `path` (figures embedded)."
    from nbconvert import HTMLExporter
    body, _ = HTMLExporter(template_name='lab').from_notebook_node(nb)
    path.write_text(body, encoding='utf-8')

def read_nb(path):
    try: import nbformat
    except ImportError: from execnb.nbio import read_nb; return read_nb(path)
    return nbformat.read(path, as_version=4)

def write_nb(nb, path):
    try: import nbformat
    except ImportError: from execnb.nbio import write_nb; return write_nb(nb, path)
    nbformat.write(nb, path)

def _last_line(text):
    last = [l for l in re.sub(r'\x1b\[[0-9;]*m', '', text).strip().splitlines() if l.strip()]
    return last[-1][:150] if last else 'error'

def run_jupyter(nb, timeout):
    "Run `nb`'s cells in a Jupyter kernel (working directory nbs/), in place; 'ok' or why it failed."
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from jupyter_client.manager import KernelManager
    with tempfile.TemporaryDirectory(prefix='course_kernel.') as d:
        # the kernel talks over local sockets (IPC), not TCP: nothing listens on the network
        km = KernelManager(kernel_name='python3', transport='ipc', ip=os.path.join(d, 'k'))
        client = NotebookClient(nb, km=km, timeout=timeout, resources={'metadata': {'path': str(NBS)}})
        try: client.execute(); return 'ok'
        except CellExecutionError as e: return 'FAILED: ' + _last_line(str(e))
        except Exception as e: return f'FAILED: {type(e).__name__}: {str(e)[:150]}'
        finally:
            if km.has_kernel: km.shutdown_kernel(now=True)

def run_execnb(path, nb, timeout):
    "Run `nb` with execnb's shell in a child process (working directory nbs/); the executed notebook and 'ok' or why not."
    with tempfile.TemporaryDirectory(prefix='course_execnb.') as d:
        src, dst = Path(d)/path.name, Path(d)/('out-' + path.name)
        write_nb(nb, src)
        try: r = subprocess.run([sys.executable, __file__, '--execnb-one', str(src), str(dst)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired: return nb, f'FAILED: stopped after {timeout}s'
        out = read_nb(dst) if dst.is_file() else nb
        return out, 'ok' if r.returncode == 0 else 'FAILED: ' + _last_line(r.stderr or r.stdout)

def _execnb_one(src, dst):
    "The child of `run_execnb`: run the notebook `src` in this process, save it with its outputs to `dst`."
    from execnb.shell import CaptureShell
    from execnb.nbio import read_nb, write_nb  # execnb's own: its shell wants its notebook objects
    os.chdir(NBS)
    sys.path.insert(0, str(NBS))
    os.environ['MPLBACKEND'] = 'module://matplotlib_inline.backend_inline'
    nb, err = read_nb(src), None
    try: CaptureShell().run_all(nb, exc_stop=True)
    except BaseException as e: err = e
    write_nb(nb, dst)
    if err is not None: sys.exit(f'{type(err).__name__}: {err}')

def run(path, out_dir, flags, timeout, engine='jupyter'):
    nb = read_nb(path)
    kept = [c for c in nb.cells if not (c.cell_type == 'code' and skip_cell(c, flags))]
    nskip = len(nb.cells) - len(kept)
    nb.cells = kept
    start = time.time()
    if engine == 'jupyter': status = run_jupyter(nb, timeout); runnable = nb
    else: runnable, status = run_execnb(path, nb, timeout)
    secs = time.time() - start
    write_nb(runnable, out_dir/path.name)
    try: to_html(runnable, out_dir/(path.stem + '.html'))
    except Exception as e: status += f' (no HTML page: {type(e).__name__}: {str(e)[:100]})'
    thumb = ''
    if (png := key_figure(runnable)) is not None:
        (out_dir/'thumbs').mkdir(exist_ok=True)
        thumbnail(png, out_dir/'thumbs'/(path.stem + '.png')); thumb = f'thumbs/{path.stem}.png'
    hs = headlines(runnable)
    return dict(notebook=path.name, status=status, seconds=f'{secs:.1f}', headline=fmt_headlines(hs) or '-',
                figures=str(n_figures(runnable)), skipped=str(nskip), title=title(runnable), thumb=thumb,
                page=path.stem + '.html', headlines=hs)

COLS = ('notebook', 'status', 'seconds', 'headline', 'figures', 'skipped', 'title', 'thumb')

def _figures_html(hs):
    "The headline figures as a small table: name, this run's value, the 2018 lesson's."
    if not hs: return '-'
    e, any18 = html.escape, any(l for _, _, l in hs)
    head = '<tr><th></th><th>this run</th><th>2018 lesson</th></tr>' if any18 else ''
    return (f'<table class="figs">{head}' + ''.join(f'<tr><td>{e(n)}</td><td class="ours">{e(v)}</td>'
            + (f'<td class="lesson">{e(l) or "&ndash;"}</td>' if any18 else '') + '</tr>' for n, v, l in hs) + '</table>')

def write_index(out, rows, size, flags, total):
    e = html.escape
    def tr(r):
        img = f'<a href="{e(r["page"])}"><img src="{e(r["thumb"])}" alt="key figure of {e(r["notebook"])}"></a>' if r['thumb'] else 'no figure'
        return (f'<tr class="{"ok" if r["status"] == "ok" else "failed"}"><td class="lesson-title"><a href="{e(r["page"])}">{e(r["title"] or r["notebook"])}</a>'
                f'<div class="nb">{e(r["notebook"])}</div></td><td class="status">{e(r["status"])}</td><td class="time">{e(r["seconds"])} s</td>'
                f'<td class="thumb">{img}</td><td>{_figures_html(r["headlines"])}</td><td>{e(r["figures"])}</td></tr>')
    n_ok = sum(r['status'] == 'ok' for r in rows)
    (out/'index.html').write_text(f'''<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>course_lib run: {e(out.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}
tr.failed td{{background:#fdd}} tr.ok td.status{{color:#070}} td.time{{white-space:nowrap}} td.thumb img{{max-width:360px;display:block}} .nb{{color:#666;font-size:85%}}
table.figs td,table.figs th{{border:none;padding:1px 6px;font-size:90%}} td.lesson{{color:#555}}</style></head><body>
<h1>course_lib lessons, size {e(size)}</h1>
<p>{n_ok} of {len(rows)} lessons ran; {total:.0f} s in all. Cell flags on: {e(" ".join(sorted(flags)) or "none")}.
Each lesson's title links to its executed page, every figure included; the picture is its key figure, and its
headline figures stand beside the 2018 lesson's where the lesson gave one.</p>
<table><tr><th>lesson</th><th>status</th><th>time</th><th>key figure</th><th>headline figures</th><th>figures</th></tr>
{"".join(tr(r) for r in rows)}
</table></body></html>
''', encoding='utf-8')

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', help='folder for the executed notebooks, their HTML pages and the summary (default: COURSE_RUN_DIR, '
                                 'else runs/<date>-<size>)')
    p.add_argument('--timeout', type=int, default=None, help='seconds allowed per cell (jupyter) or notebook (execnb); default: no limit')
    p.add_argument('--engine', choices=('jupyter', 'execnb'), default='jupyter', help='how to run each notebook (see above)')
    p.add_argument('--execnb-one', nargs=2, help=argparse.SUPPRESS)
    p.add_argument('notebooks', nargs='*', help='notebooks to run, as paths or names in nbs/ (default: every nbs/[0-9]*.ipynb)')
    a = p.parse_args()
    if a.execnb_one: return _execnb_one(*a.execnb_one)
    from course_lib.core import gpu_note
    if note := gpu_note(): print(note, flush=True)
    dev = device()
    size, why = pick_size(dev)
    os.environ['COURSE_SIZE'] = size
    os.environ['MPLBACKEND'] = 'module://matplotlib_inline.backend_inline'  # figures become image/png outputs
    out = Path(a.out or os.environ.get('COURSE_RUN_DIR') or ROOT/'runs'/f'{time.strftime("%Y%m%d-%H%M%S")}-{size}')
    out.mkdir(parents=True, exist_ok=True)
    def find(n):  # a path, or a notebook's name in nbs/ with or without .ipynb
        p = Path(n)
        return p if p.is_file() else NBS/(p.name if p.suffix == '.ipynb' else p.name + '.ipynb')
    nbs = [find(n) for n in a.notebooks] or sorted(NBS.glob('[0-9]*.ipynb'))
    if missing := [str(n) for n in nbs if not n.is_file()]: sys.exit(f'no such notebook: {", ".join(missing)}')
    flags = default_flags(dev)
    print(f"COURSE_SIZE={size} ({why}); cell flags on: {' '.join(sorted(flags)) or 'none'}")
    print(f'Running {len(nbs)} notebooks into {out}', flush=True)
    rows, t0 = [], time.time()
    for nb in nbs:
        r = run(nb.resolve(), out, flags, a.timeout, a.engine)
        rows.append(r)
        print(f"  {r['notebook']}: {r['status']} in {r['seconds']}s, {r['figures']} figures  {r['headline']}", flush=True)
    table = ['| ' + ' | '.join(COLS) + ' |', '|' + '---|' * len(COLS)] + ['| ' + ' | '.join(r[k] for k in COLS) + ' |' for r in rows]
    (out/'summary.md').write_text('\n'.join(table) + '\n')
    (out/'summary.tsv').write_text('\n'.join('\t'.join(r) for r in [COLS] + [[r[k] for k in COLS] for r in rows]) + '\n')
    write_index(out, rows, size, flags, time.time() - t0)
    print('\n'.join(table)); print(f'Open {out/"index.html"} in a browser: one page per lesson, figures included.')
    sys.exit(0 if all(r['status'] == 'ok' for r in rows) else 1)

if __name__ == '__main__': main()
