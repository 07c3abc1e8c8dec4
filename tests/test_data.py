"The data layer's failure paths, on small files the tests make themselves."
import gzip, hashlib, io, os, pickle, tarfile, urllib.request, zipfile, warnings
from pathlib import Path
import numpy as np, pytest, torch
import course_lib.data as cd
from course_lib.data import *
from course_lib.datasets import *

def sha(b): return hashlib.sha256(b).hexdigest()

def src_for(tmp_path, fname='f.txt', content=b'payload', digest=None, subdir=''):
    "A one-file DataSource whose canonical URL is a local file:// URL."
    origin = tmp_path/'origin'; origin.mkdir(exist_ok=True)
    (origin/fname).write_bytes(content)
    return DataSource('t', 'text', (DataFile(fname, (origin/fname).as_uri(), digest or sha(content)),), subdir=subdir)

def leftovers(d): return sorted(p.name for p in Path(d).rglob('*'))

def no_network(*a, **k): raise AssertionError('urlopen must not be called')

# ---- download, checksum, atomic write

def test_download_then_found_locally(data_env, tmp_path, monkeypatch):
    d, _ = data_env
    s = src_for(tmp_path, subdir='sub')
    assert download_data(s) == [d/'sub'/'f.txt']
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    assert download_data(s) == [d/'sub'/'f.txt']

def test_checksum_mismatch_keeps_nothing(data_env, tmp_path):
    d, _ = data_env
    s = src_for(tmp_path, digest='ab'*32)
    with pytest.raises(ChecksumError) as e: download_data(s)
    msg = str(e.value)
    assert 'f.txt' in msg and 'ab'*32 in msg and sha(b'payload') in msg
    assert leftovers(d) == []

class Broken:
    "A response that delivers one chunk and then fails, like a dropped connection."
    def __init__(self, exc): self.exc, self.n, self.headers = exc, 0, {'Content-Length': '3000000'}
    def read(self, n):
        self.n += 1
        if self.n == 1: return b'x' * n
        raise self.exc
    def __enter__(self): return self
    def __exit__(self, *a): pass

@pytest.mark.parametrize('exc', [ConnectionResetError('reset by peer'), KeyboardInterrupt()])
def test_interrupted_download_leaves_nothing(data_env, tmp_path, monkeypatch, exc):
    d, _ = data_env
    monkeypatch.setattr(urllib.request, 'urlopen', lambda *a, **k: Broken(exc))
    with pytest.raises((DataNotFoundError, KeyboardInterrupt)) as e: download_data(src_for(tmp_path))
    if isinstance(exc, OSError): assert 'reset by peer' in str(e.value)
    assert leftovers(d) == []

def test_unrecorded_canonical_digest_warns(data_env, tmp_path, monkeypatch):
    d, _ = data_env
    origin = tmp_path/'o'; origin.mkdir(); (origin/'x.bin').write_bytes(b'new')
    s = DataSource('t', 'text', (DataFile('x.bin', (origin/'x.bin').as_uri(), None, 'cd'*32),))
    with pytest.warns(UserWarning, match=sha(b'new')): assert download_data(s) == [d/'x.bin']
    assert (d/'x.bin.sha256').read_text().strip() == sha(b'new')
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert download_data(s) == [d/'x.bin']                  # remembered: found again without a warning
    (d/'x.bin').write_bytes(b'changed')
    with pytest.raises(DataNotFoundError): monkeypatch.setenv('COURSE_OFFLINE', '1'); download_data(s)

def test_unknown_name():
    with pytest.raises(KeyError, match="unknown dataset 'imagenet'"): download_data('imagenet')

# ---- mirror lookup

def test_mirror_lookup_by_file_name(data_env, tmp_path, monkeypatch):
    d, m = data_env
    s = src_for(tmp_path, subdir='fashion-mnist')
    (m/'f.txt').write_bytes(b'payload')
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    assert download_data(s) == [m/'f.txt']        # found in the mirror root, used in place
    (m/'fashion-mnist').mkdir(); (m/'fashion-mnist'/'f.txt').write_bytes(b'payload')
    assert download_data(s) == [m/'fashion-mnist'/'f.txt']  # the dataset's subfolder comes first
    assert leftovers(d) == []

def test_mirror_with_wrong_digest_is_skipped(data_env, tmp_path, monkeypatch):
    d, m = data_env
    s = src_for(tmp_path)
    (m/'f.txt').write_bytes(b'another dataset with the same file name')
    with pytest.warns(UserWarning, match='ignoring this copy'): assert download_data(s) == [d/'f.txt']
    assert (d/'f.txt').read_bytes() == b'payload'

def test_several_mirrors_in_order(data_env, tmp_path, monkeypatch):
    d, m = data_env
    m2 = tmp_path/'m2'; m2.mkdir(); (m2/'f.txt').write_bytes(b'payload')
    monkeypatch.setenv('COURSE_DATA_MIRROR', os.pathsep.join([str(m), str(m2)]))
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    assert download_data(src_for(tmp_path)) == [m2/'f.txt']

def test_system_dirs_are_searched(data_env, tmp_path, monkeypatch):
    sysd = tmp_path/'usr-share'; sysd.mkdir(); (sysd/'f.txt').write_bytes(b'payload')
    s = src_for(tmp_path)
    s = DataSource(s.name, s.kind, s.files, system_dirs=(str(sysd),))
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    assert download_data(s) == [sysd/'f.txt']

def test_fashion_mnist_registry_searches_debian_dir():
    assert '/usr/share/datasets/fashion-mnist' in DATASETS['fashion_mnist'].system_dirs

# ---- nothing found

def test_nothing_found_offline_lists_places(data_env, tmp_path, monkeypatch):
    d, m = data_env
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    with pytest.raises(DataNotFoundError) as e: download_data(src_for(tmp_path))
    msg = str(e.value)
    assert str(d/'f.txt') in msg and str(m/'f.txt') in msg and 'COURSE_DATA_MIRROR' in msg and 'COURSE_OFFLINE=1' in msg

def test_nothing_found_network_down(data_env, tmp_path, monkeypatch):
    def down(*a, **k): raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(urllib.request, 'urlopen', down)
    with pytest.raises(DataNotFoundError, match='Name or service not known') as e: download_data(src_for(tmp_path))
    assert 'COURSE_DATA_MIRROR' in str(e.value) and 'file://' in str(e.value)

# ---- extraction

def make_tar(path, files=(), syms=(), hards=(), mode='w:gz'):
    with tarfile.open(path, mode) as t:
        for n, b in files:
            ti = tarfile.TarInfo(n); ti.size = len(b); t.addfile(ti, io.BytesIO(b))
        for n, target in syms:
            ti = tarfile.TarInfo(n); ti.type = tarfile.SYMTYPE; ti.linkname = target; t.addfile(ti)
        for n, target in hards:
            ti = tarfile.TarInfo(n); ti.type = tarfile.LNKTYPE; ti.linkname = target; t.addfile(ti)
    return path

@pytest.mark.parametrize('kw,msg', [
    (dict(files=[('a/../../evil', b'x')]), 'outside the destination'),
    (dict(files=[('a/f', b'x')], syms=[('a/l', '../../outside')]), 'outside the destination'),
    (dict(files=[('a/f', b'x')], syms=[('a/l', '/etc/passwd')]), 'link to an absolute path'),
    (dict(files=[('a/f', b'x')], hards=[('a/h', '../x')]), 'outside the destination'),
])
def test_tar_traversal_refused(tmp_path, kw, msg):
    out = tmp_path/'out'
    with pytest.raises(ValueError, match=msg) as e: untar_data(make_tar(tmp_path/'bad.tgz', **kw), out)
    assert 'bad.tgz' in str(e.value)
    assert not out.exists() or leftovers(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.tgz'] + (['out'] if out.exists() else [])

def test_tar_absolute_member_lands_inside(tmp_path):
    out = untar_data(make_tar(tmp_path/'abs.tgz', files=[('/tmp/evil', b'x'), ('/tmp/b', b'y')]), tmp_path/'out')
    assert out == tmp_path/'out'/'tmp' and (out/'evil').read_bytes() == b'x'

def test_zip_traversal_refused(tmp_path):
    with zipfile.ZipFile(tmp_path/'bad.zip', 'w') as z: z.writestr('../evil.txt', 'x')
    with pytest.raises(ValueError, match='".." in a zip'): untar_data(tmp_path/'bad.zip', tmp_path/'out')
    assert not (tmp_path/'out').exists() and not (tmp_path.parent/'evil.txt').exists()

def test_untar_tar_gz_and_zip_idempotent(tmp_path):
    a = make_tar(tmp_path/'ds.tar.gz', files=[('ds/a.txt', b'a'), ('ds/b/c.txt', b'c')], syms=[('ds/l', 'a.txt')])
    out = untar_data(a, tmp_path/'out')
    assert out == tmp_path/'out'/'ds' and (out/'b'/'c.txt').read_bytes() == b'c' and (out/'l').read_bytes() == b'a'
    (out/'a.txt').write_bytes(b'edited')
    assert untar_data(a, tmp_path/'out') == out and (out/'a.txt').read_bytes() == b'edited'  # not extracted again
    with zipfile.ZipFile(tmp_path/'z.zip', 'w') as z: z.writestr('zz/x.txt', 'x')
    assert (untar_data(tmp_path/'z.zip', tmp_path/'out')/'x.txt').read_text() == 'x'
    assert sorted(p.name for p in (tmp_path/'out').iterdir()) == ['ds', 'zz']  # no temporary folders left

def test_untar_flat_archive_goes_in_stem_folder(tmp_path):
    a = make_tar(tmp_path/'flat.tgz', files=[('x.txt', b'x'), ('y.txt', b'y')])
    assert sorted(p.name for p in untar_data(a, tmp_path/'out').iterdir()) == ['.course_lib_complete', 'x.txt', 'y.txt']
    assert (tmp_path/'out'/'flat').is_dir()

def test_untar_missing_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.tgz'): untar_data(tmp_path/'nope.tgz', tmp_path/'out')

# ---- IDX

def idx_bytes(arr, magic=None):
    hdr = magic if magic is not None else bytes([0, 0, 8, arr.ndim])
    return hdr + b''.join(int(s).to_bytes(4, 'big') for s in arr.shape) + arr.astype(np.uint8).tobytes()

def write_gz(path, b):
    with gzip.open(path, 'wb') as f: f.write(b)
    return path

def test_idx_roundtrip(tmp_path):
    a = np.arange(2*28*28).reshape(2, 28, 28) % 256
    assert torch.equal(read_idx(write_gz(tmp_path/'a.gz', idx_bytes(a)), 3), torch.from_numpy(a.astype(np.uint8)))

@pytest.mark.parametrize('mk,msg', [
    (lambda a: idx_bytes(a)[:-5], r'need 1568 bytes of data, found 1563 \(truncated\)'),
    (lambda a: idx_bytes(a)[:10], 'truncated IDX header'),
    (lambda a: idx_bytes(a)[:2], 'truncated IDX file'),
    (lambda a: idx_bytes(a, bytes([0, 0, 0x0d, 3])), 'bad IDX magic number 0x00000d03'),
    (lambda a: idx_bytes(a) + b'extra', 'found 1573'),
])
def test_idx_errors(tmp_path, mk, msg):
    a = np.zeros((2, 28, 28))
    with pytest.raises(IDXError, match=msg): read_idx(write_gz(tmp_path/'a.gz', mk(a)))

def test_idx_truncated_gzip(tmp_path):
    p = write_gz(tmp_path/'a.gz', idx_bytes(np.zeros((50, 28, 28))))
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(IDXError, match='truncated or corrupt gzip'): read_idx(p)

def test_idx_dataset_through_mirror(data_env, tmp_path, monkeypatch):
    d, m = data_env
    arrs = [np.random.randint(0, 256, (7, 28, 28)), np.arange(7) % 10, np.random.randint(0, 256, (3, 28, 28)), np.arange(3)]
    files = []
    for f, a in zip(cd._idx_names, arrs):
        b = gzip.compress(idx_bytes(a)); (m/f).write_bytes(b)
        files.append(DataFile(f, 'http://example.invalid/'+f, sha(b)))
    monkeypatch.setitem(cd.DATASETS, 'tiny_idx', DataSource('tiny_idx', 'idx', tuple(files)))
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    xtr, ytr, xte, yte = load_idx_dataset('tiny_idx')
    assert xtr.shape == (7, 28, 28) and ytr.dtype == torch.int64 and ytr.tolist() == list(range(7))
    assert xte.shape == (3, 28, 28)

# ---- CIFAR-10 in both forms

def cifar_pickles_tgz(path, n=4):
    "A tiny tarball in the layout of cifar-10-python.tar.gz."
    members = []
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        d = {b'data': np.random.randint(0, 256, (n, 3072), dtype=np.uint8), b'labels': list(range(n))}
        members.append((f'cifar-10-batches-py/{name}', pickle.dumps(d)))
    return make_tar(path, files=members)

def test_cifar10_from_python_pickles_and_cache(data_env, tmp_path, monkeypatch):
    d, m = data_env
    p = cifar_pickles_tgz(m/'cifar-10-python.tar.gz')
    monkeypatch.setitem(cd.DATASETS, 'cifar10', DataSource('cifar10', 'archive', (DataFile('cifar10.tgz', 'http://example.invalid/c.tgz', 'ab'*32),), folder='cifar10'))
    monkeypatch.setitem(cd.DATASETS, 'cifar10_python', DataSource('cifar10_python', 'archive',
        (DataFile('cifar-10-python.tar.gz', 'http://example.invalid/p.tgz', cd.sha256sum(p)),), folder='cifar-10-batches-py'))
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    xtr, ytr, xte, yte = load_cifar10()
    assert xtr.shape == (20, 3, 32, 32) and xtr.dtype == torch.uint8 and xte.shape == (4, 3, 32, 32)
    assert ytr.tolist() == list(range(4)) * 5
    assert (d/'cifar-10-batches-py'/'course_lib_uint8.npz').exists()
    p.unlink()                                           # later loads read the cache only
    assert torch.equal(load_cifar10()[0], xtr)

def test_cifar10_from_class_folders(data_env, tmp_path, monkeypatch):
    from PIL import Image
    d, m = data_env
    files = [('cifar10/labels.txt', '\n'.join(CIFAR_CLASSES[:2]).encode())]
    for split in ('train', 'test'):
        for c in CIFAR_CLASSES[:2]:
            buf = io.BytesIO(); Image.new('RGB', (32, 32), (200, 10, 10)).save(buf, 'PNG')
            files.append((f'cifar10/{split}/{c}/0001.png', buf.getvalue()))
    p = make_tar(m/'cifar10.tgz', files=files)
    monkeypatch.setitem(cd.DATASETS, 'cifar10', DataSource('cifar10', 'archive', (DataFile('cifar10.tgz', 'http://example.invalid/c.tgz', cd.sha256sum(p)),), folder='cifar10'))
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    xtr, ytr, xte, yte = load_cifar10()
    assert xtr.shape == (2, 3, 32, 32) and ytr.tolist() == [0, 1] and xtr[0, 0, 0, 0].item() == 200

def test_cifar10_nothing_found(data_env, monkeypatch):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    with pytest.raises(DataNotFoundError, match='cifar-10-python.tar.gz'): load_cifar10()

def test_get_data_bad_split(data_env, monkeypatch):
    with pytest.raises(ValueError, match='n_valid=-3'): get_data(n_valid=-3)

def test_download_with_progress_bar(data_env, tmp_path, monkeypatch, capsys):
    d, _ = data_env
    monkeypatch.setattr(cd, 'interactive', lambda: True)
    s = src_for(tmp_path, content=b'z' * (3 << 20))
    assert download_data(s) == [d/'f.txt'] and (d/'f.txt').stat().st_size == 3 << 20
    assert 'f.txt' in capsys.readouterr().out
