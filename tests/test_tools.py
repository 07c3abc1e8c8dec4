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
    assert '<a href="01_init.html">01_init.ipynb</a>' in index and '<td>ok</td>' in index
    rows = (tmp_path/'summary.tsv').read_text().splitlines()
    assert rows[0].split('\t')[:2] == ['notebook', 'status'] and rows[1].split('\t')[1] == 'ok'
    assert int(rows[1].split('\t')[4]) == len(pngs)

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
