"The main job's runner, run the way `tools/lessons.sh` runs it: executed copies keep their figures, HTML pages and an index."
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent

def run_lessons(out, *nbs, **env):
    e = {**os.environ, 'COURSE_SIZE': 'quick', **env}
    e.pop('MPLBACKEND', None)  # test.sh exports Agg for nbdev_test; the runner must not depend on it being unset
    return subprocess.run([sys.executable, str(ROOT/'tools'/'run_lessons.py'), '--out', str(out), *map(str, nbs)],
                          capture_output=True, text=True, env=e, timeout=900)

def test_executed_lesson_keeps_its_figures_and_gets_a_page(tmp_path):
    r = run_lessons(tmp_path, ROOT/'nbs'/'01_init.ipynb', MPLBACKEND='Agg')
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'COURSE_SIZE=quick (COURSE_SIZE is set)' in r.stdout
    nb = json.loads((tmp_path/'01_init.ipynb').read_text())
    pngs = [o for c in nb['cells'] for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
    assert len(pngs) >= 1
    page = (tmp_path/'01_init.html').read_text()
    assert 'data:image/png;base64' in page and 'Lesson 1' in page
    index = (tmp_path/'index.html').read_text()
    assert '<a href="01_init.html">Lesson 1: why initialisation matters</a><div class="nb">01_init.ipynb</div>' in index
    assert '<td class="status">ok</td>' in index
    rows = (tmp_path/'summary.tsv').read_text().splitlines()
    assert rows[0].split('\t')[:2] == ['notebook', 'status'] and rows[1].split('\t')[1] == 'ok'
    assert int(rows[1].split('\t')[4]) == len(pngs)
    thumb = tmp_path/'thumbs'/'01_init.png'
    assert thumb.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and 'src="thumbs/01_init.png"' in index

def test_a_failing_lesson_is_reported_and_the_run_fails(tmp_path):
    nb = tmp_path/'99_bad.ipynb'
    nb.write_text(json.dumps({'cells': [{'cell_type': 'code', 'execution_count': None, 'id': 'a', 'metadata': {}, 'outputs': [],
                                         'source': ['import matplotlib.pyplot as plt\n', "plt.plot([1, 2]);\n", "raise ValueError('broken lesson')"]}],
                              'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    r = run_lessons(tmp_path/'out', nb)
    assert r.returncode == 1
    index = (tmp_path/'out'/'index.html').read_text()
    assert 'class="failed"' in index and 'broken lesson' in index
    assert (tmp_path/'out'/'99_bad.html').exists()

def test_bad_size_and_missing_notebook_are_refused(tmp_path):
    r = run_lessons(tmp_path, ROOT/'nbs'/'00_core.ipynb', COURSE_SIZE='huge')
    assert r.returncode != 0 and "COURSE_SIZE='huge'" in r.stderr
    r = run_lessons(tmp_path, tmp_path/'nope.ipynb')
    assert r.returncode != 0 and 'no such notebook' in r.stderr
    r = run_lessons(tmp_path, 'nope')
    assert r.returncode != 0 and 'no such notebook' in r.stderr and 'nope.ipynb' in r.stderr

def test_a_lesson_is_named_without_its_folder(tmp_path):
    r = run_lessons(tmp_path/'out', '00_core', MPLBACKEND='Agg')
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path/'out'/'00_core.ipynb').is_file()

def test_each_planted_failure_still_finds_the_fix_it_undoes(tmp_path):
    "tools/planted.py undoes a fix by a text replacement: each fix must still occur exactly once, or the plant is moot."
    import importlib.util, shutil
    spec = importlib.util.spec_from_file_location('planted', ROOT/'tools'/'planted.py')
    planted = importlib.util.module_from_spec(spec); spec.loader.exec_module(planted)
    for pid, what, f, fix, old, targets, extra in planted.PLANTS:
        for k, (ff, fx, ol) in enumerate(planted.pairs(f, fix, old)):
            copy = tmp_path/pid/str(k)/Path(ff).name
            copy.parent.mkdir(parents=True); shutil.copy(ROOT/ff, copy)
            planted.replace_once(copy, fx, ol)  # SystemExit unless the fix occurs once
            assert copy.read_text(encoding='utf-8') != (ROOT/ff).read_text(encoding='utf-8'), pid


def lesson_nb(path, cells):
    path.write_text(json.dumps({'cells': [{'cell_type': t, 'id': f'c{i}', 'metadata': {}, 'source': src, **({'execution_count': None, 'outputs': []} if t == 'code' else {})}
                                          for i, (t, src) in enumerate(cells)], 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    return path

def test_index_shows_title_key_figure_and_the_2018_figure_beside_ours(tmp_path):
    nb = lesson_nb(tmp_path/'42_demo.ipynb', [
        ('markdown', '# Lesson 42: a demo\n\n> what it shows'),
        ('code', 'import matplotlib.pyplot as plt\nplt.plot([0, 1], [0, 1], color="red");'),
        ('code', '#| figure: key\nplt.figure(); plt.plot([0, 1], [1, 0], color="blue");'),
        ('code', 'plt.figure(); plt.plot([0, 1], [0, 0], color="green");'),
        ('code', 'from course_lib.core import headline\nheadline("valid accuracy", 0.97654, lesson=0.99)\nheadline("params", 123)')])
    r = run_lessons(tmp_path/'out', nb)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = tmp_path/'out'
    index = (out/'index.html').read_text()
    assert '<a href="42_demo.html">Lesson 42: a demo</a>' in index
    assert '<td class="ours">0.9765</td><td class="lesson">0.99</td>' in index and '<td class="ours">123</td><td class="lesson">&ndash;</td>' in index
    from PIL import Image
    im = Image.open(out/'thumbs'/'42_demo.png').convert('RGB')
    colours = {im.getpixel((x, y)) for x in range(im.width) for y in range(im.height)}
    blue = any(b > 150 and r < 100 for r, g, b in colours); red = any(r > 150 and g < 100 and b < 100 for r, g, b in colours)
    assert blue and not red, 'the marked cell\'s figure, not the first or the last'
    assert (out/'summary.tsv').read_text().splitlines()[1].split('\t')[3] == 'valid accuracy = 0.9765 (2018: 0.99); params = 123'

CHROMIUM = next((p for p in ('/usr/bin/chromium', '/usr/bin/chromium-browser') if os.path.exists(p)), None)

@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_index_renders_in_a_real_browser(tmp_path):
    "Headless Chromium loads the index: the page has its rows, and the thumbnail is drawn (not a broken image)."
    nb = lesson_nb(tmp_path/'43_pic.ipynb', [('markdown', '# Lesson 43: a picture'),
        ('code', 'import matplotlib.pyplot as plt\nplt.imshow([[0, 1], [1, 0]], cmap="autumn"); plt.axis("off");')])
    assert run_lessons(tmp_path/'out', nb).returncode == 0
    flags = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
             '--disable-component-update', '--disable-sync', f'--user-data-dir={tmp_path/"profile"}', '--window-size=1200,800']
    url = (tmp_path/'out'/'index.html').as_uri()
    dom = subprocess.run([CHROMIUM, *flags, '--dump-dom', url], capture_output=True, text=True, timeout=120).stdout
    assert 'Lesson 43: a picture' in dom and 'thumbs/43_pic.png' in dom
    shot = tmp_path/'shot.png'
    subprocess.run([CHROMIUM, *flags, f'--screenshot={shot}', url], capture_output=True, timeout=120)
    import numpy as np
    from PIL import Image
    px = np.asarray(Image.open(shot).convert('RGB')).astype(int)
    warm = int(((px[..., 0] > 200) & (px[..., 2] < 80)).sum())  # the thumbnail's red-to-yellow pixels
    assert warm > 1000, f'only {warm} pixels of the thumbnail drawn'
