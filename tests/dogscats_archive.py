"A small dogs-vs-cats archive in the layout of fast.ai's full download (`dogscats.tgz`), for the tests of lessons 8 and 8a."
import tarfile
from pathlib import Path
import numpy as np
from PIL import Image

def photo(w, h, seed, mode='RGB'):
    "A w×h photo with smooth colour ramps and some noise (so that every crop of it differs), in `mode`."
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([(x * 255 / w), (y * 255 / h), ((x + y) * 127 / (w + h) + 64)], -1) + g.normal(0, 12, (h, w, 3))
    im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    return im.convert(mode) if mode != 'RGB' else im

def make_dogscats(dest, n_train=(5, 4), n_valid=(3, 4), seed=0):
    "`dest/dogscats.tgz`: train/ and valid/ (cats, dogs: JPEG and PNG photos of 300 to 500 px), sample/, test1/, models/."
    dest, g = Path(dest), np.random.default_rng(seed)
    root = dest/'src'/'dogscats'
    k = 0
    def put(folder, n, cls):
        nonlocal k
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            w, h = (int(v) for v in g.integers(300, 501, 2))
            if k % 5 == 0: h = w  # a square photo now and then
            mode = ('L', 'RGBA', 'RGB')[k % 3] if k % 4 == 1 else 'RGB'
            ext = 'png' if mode == 'RGBA' or k % 4 == 2 else 'jpg'
            photo(w, h, seed * 1000 + k, mode).save(folder/f'{cls}.{k}.{ext}', **({'quality': 90} if ext == 'jpg' else {}))
            k += 1
    for split, ns in (('train', n_train), ('valid', n_valid)):
        for cls, n in zip(('cats', 'dogs'), ns): put(root/split/cls, n, cls[:-1])
    for split in ('train', 'valid'):
        for cls in ('cats', 'dogs'): put(root/'sample'/split/cls, 1, cls[:-1])
    put(root/'test1', 3, 'test')  # unlabelled
    (root/'models').mkdir()
    with tarfile.open(dest/'dogscats.tgz', 'w:gz') as t: t.add(root, arcname='dogscats')
    return dest/'dogscats.tgz'

def counts(n_train=(5, 4), n_valid=(3, 4)): return sum(n_train), sum(n_valid)
