"""The canonical downloads, not the offline mirror: small archives in each canonical layout, through the loaders and
through the lessons' own check cells (run from the notebooks as they are)."""
import hashlib, io, json, pickle, tarfile
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
import course_lib.datasets as ds
from course_lib.datasets import load_dogscats, load_cifar10, CIFAR_CLASSES

NBS = Path(__file__).resolve().parent.parent/'nbs'

def photo(w, h, fmt, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO(); Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()

def tgz(path, files):
    with tarfile.open(path, 'w:gz') as t:
        for name, data in files:
            if data is None:
                ti = tarfile.TarInfo(name); ti.type = tarfile.DIRTYPE; t.addfile(ti); continue
            ti = tarfile.TarInfo(name); ti.size = len(data); t.addfile(ti, io.BytesIO(data))
    return path

def fastai_dogscats(path, n_train=6, n_valid=3):
    "fast.ai's `dogscats` layout: train/ and valid/ per class, PNG and JPEG of several sizes, and folders that are not classes."
    files, k = [], 0
    for split, n in (('train', n_train), ('valid', n_valid)):
        for c in ('cats', 'dogs'):
            for i in range(n):
                k += 1
                fmt, ext = ('PNG', 'png') if i % 2 else ('JPEG', 'jpg')
                files.append((f'dogscats/{split}/{c}/{c[:-1]}.{k}.{ext}', photo(300 + 37 * i, 260 + 29 * (k % 5), fmt, k)))
    files += [(f'dogscats/sample/{s}/{c}/{c[:-1]}.{i}.jpg', photo(120, 90, 'JPEG', 100 + i)) for s in ('train', 'valid') for c in ('cats', 'dogs') for i in range(2)]
    files += [(f'dogscats/test1/{i}.jpg', photo(200, 150, 'JPEG', 200 + i)) for i in range(3)]
    files += [('dogscats/models', None), ('dogscats/models/tmp.h5', b'not an image')]
    return tgz(path, files)

def downloaded(data, archive):
    "Leave `archive` in the data folder as a download from the canonical URL leaves it: its digest remembered beside it."
    (data/(archive.name + '.sha256')).write_text(hashlib.sha256(archive.read_bytes()).hexdigest() + '\n')
    return archive

def check_cell(nb, marker):
    "The source of the one code cell of notebook `nb` that contains `marker`."
    cells = [''.join(c['source']) for c in json.loads((NBS/nb).read_text())['cells'] if c['cell_type'] == 'code']
    found = [c for c in cells if marker in c]
    assert len(found) == 1, f'{len(found)} cells of {nb} contain {marker!r}'
    return found[0]

@pytest.fixture
def agg():
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    yield
    plt.close('all')

def test_fastai_dogscats_layout_loads_its_classes_only(data_env):
    data, _ = data_env
    downloaded(data, fastai_dogscats(data/'dogscats.tgz'))
    train, valid = load_dogscats()
    assert (train.classes, valid.classes) == (['cats', 'dogs'], ['cats', 'dogs'])
    assert (len(train), len(valid)) == (12, 6)  # sample/, test1/ and models/ left out
    assert all('/sample/' not in p and '/test1/' not in p for p, _ in train.samples + valid.samples)
    sizes = {train[i][0].size for i in range(len(train))}
    assert len(sizes) > 3  # photos of their own sizes, PNG and JPEG alike

def test_lesson_0c_dogscats_checks_hold_on_the_fastai_layout(data_env, agg):
    data, _ = data_env
    downloaded(data, fastai_dogscats(data/'dogscats.tgz', n_train=5, n_valid=2))
    ns = {}
    exec('from course_lib.datasets import *\nfrom fastcore.test import *\nimport numpy as np, torch\n', ns)
    exec(check_cell('00c_datasets.ipynb', 'train_ds, valid_ds = load_dogscats()'), ns)  # the lesson's cell, as it is
    assert ns['counts'] == [[5, 5], [2, 2]]

def test_lesson_0c_dogscats_checks_fail_on_an_unbalanced_copy(data_env, agg):
    data, _ = data_env
    arch = fastai_dogscats(data/'full.tgz')
    with tarfile.open(arch) as t: members = [(m.name, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]
    downloaded(data, tgz(data/'dogscats.tgz', [(n, d) for n, d in members if not ('/train/dogs/' in n and n.endswith('.png'))]))
    ns = {}
    exec('from course_lib.datasets import *\nfrom fastcore.test import *\nimport numpy as np, torch\n', ns)
    with pytest.raises(AssertionError): exec(check_cell('00c_datasets.ipynb', 'train_ds, valid_ds = load_dogscats()'), ns)

def toronto_pickles(path, n=20, seed=0):
    "The Toronto `cifar-10-python.tar.gz` layout: 5 training batches and a test batch, pickled dicts, images in no class order."
    rng = np.random.default_rng(seed)
    files, data = [], {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        x, y = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        data[name] = (x, y)
        files.append((f'cifar-10-batches-py/{name}', pickle.dumps({b'data': x, b'labels': y, b'batch_label': name.encode()})))
    files.append(('cifar-10-batches-py/batches.meta', pickle.dumps({b'label_names': [c.encode() for c in CIFAR_CLASSES]})))
    files.append(('cifar-10-batches-py/readme.html', b'<html></html>'))
    return tgz(path, files), data

def test_toronto_pickles_keep_their_order_and_pixels(data_env, monkeypatch):
    data, _ = data_env
    arch, raw = toronto_pickles(data/'cifar-10-python.tar.gz')
    f = ds.DATASETS['cifar10_python'].files[0]
    monkeypatch.setitem(ds.DATASETS, 'cifar10_python', ds.DataSource(**{**ds.DATASETS['cifar10_python'].__dict__,
        'files': (ds.DataFile(f.fname, f.url, hashlib.sha256(arch.read_bytes()).hexdigest()),)}))
    x, y, xt, yt = load_cifar10()
    want_y = sum((raw[f'data_batch_{i}'][1] for i in range(1, 6)), [])
    assert y.tolist() == want_y and yt.tolist() == raw['test_batch'][1]           # the batches' order, not sorted by class
    assert torch.equal(x[0], torch.from_numpy(raw['data_batch_1'][0][0].reshape(3, 32, 32)))  # red, green, blue planes
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.uint8

def test_lesson_7_std_bound_allows_for_the_rounding_of_the_printed_figure():
    "The original images' red std is 0.2470322: above the 0.24703 the lesson printed, within its rounding."
    cell = check_cell('07_cifar.ipynb', 'for ours, lesson in zip(std,')
    ns = {}
    exec('from course_lib.core import *\nimport torch\n', ns)
    ns['std'] = torch.tensor([0.2470322, 0.2434851, 0.2615877])  # the canonical training set's stds
    line = next(l for l in cell.splitlines() if l.startswith('for ours, lesson in zip(std,'))
    exec(line, ns)
    ns['std'] = torch.tensor([0.2470400, 0.2434851, 0.2615877])  # past the rounding: refused
    with pytest.raises(AssertionError): exec(line, ns)
