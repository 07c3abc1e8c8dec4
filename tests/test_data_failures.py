"""The data layer when things go wrong (issue 12): two processes at once, a download cut short, a half-written folder,
a process killed mid-write, a corrupt cache, a data dir that cannot be created, a rejected copy, a damaged gzip."""
import gzip, hashlib, http.server, io, multiprocessing, os, signal, threading, urllib.request, warnings
from pathlib import Path
import numpy as np, pytest, torch
import course_lib.data as cd
from course_lib.data import *
from course_lib.datasets import *
from test_data import make_tar, sha, src_for, leftovers, idx_bytes, write_gz, no_network

def temps(d): return sorted(p.name for p in Path(d).rglob('.*'))

# ---- helpers: processes started at the same moment, a process killed mid-write, a local HTTP server, a tiny CIFAR-10

def race(f, n=2):
    "Run `f()` in `n` forked processes released at the same moment; what each returned, or the exception it raised."
    ctx = multiprocessing.get_context('fork')
    go, q = ctx.Event(), ctx.Queue()
    def child():
        go.wait()
        try: q.put(f())
        except BaseException as e: q.put(e)
    ps = [ctx.Process(target=child) for _ in range(n)]
    for p in ps: p.start()
    go.set()
    res = [q.get(timeout=120) for _ in ps]
    for p in ps: p.join(10)
    return res

def killed_at_replace(f):
    "Run `f()` in a forked child killed by SIGKILL at its first `os.replace`: what a crash mid-write leaves behind."
    pid = os.fork()
    if pid == 0:
        try:
            os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
            f()
        finally: os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f'the child was not killed mid-write (status {status})'

class Handler(http.server.BaseHTTPRequestHandler):
    "Serves `routes[path] = (body, headers, n_sent)`: the status line, the headers, then the first `n_sent` bytes of `body`."
    routes = {}
    def log_message(self, *a): pass
    def do_GET(self):
        body, headers, n = self.routes[self.path]
        self.send_response(200)
        for k, v in headers.items(): self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:n]); self.wfile.flush()
        self.close_connection = True

@pytest.fixture
def server():
    "A local HTTP server on 127.0.0.1; add routes with `serve(path, body, headers, n_sent)`, get the URL back."
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True); th.start()
    def serve(path, body, headers=None, n=None):
        Handler.routes[path] = (body, {'Content-Length': str(len(body))} if headers is None else headers, len(body) if n is None else n)
        return f'http://127.0.0.1:{srv.server_port}{path}'
    yield serve
    srv.shutdown(); srv.server_close(); Handler.routes.clear()

def png(c):
    from PIL import Image
    buf = io.BytesIO(); Image.new('RGB', (32, 32), c).save(buf, 'PNG')
    return buf.getvalue()

def cifar_tgz(path, n_train=3, n_pad=0):
    "A tiny `cifar10.tgz` (2 classes, `n_train` PNGs each in train, 1 in test), with `n_pad` extra small files to make extraction slow."
    files = [('cifar10/labels.txt', b'airplane\nautomobile\n')]
    files += [(f'cifar10/{s}/{c}/{i:04d}.png', png((40*k + i, 10, 10))) for s, n in (('train', n_train), ('test', 1))
              for k, c in enumerate(('airplane', 'automobile')) for i in range(n)]
    files += [(f'cifar10/pad/{i // 100}/{i}.txt', b'x' * 40) for i in range(n_pad)]
    return make_tar(path, files=files), files

def use_cifar(monkeypatch, p):
    "Make the registry's `cifar10` the tiny archive `p` (downloads off: it is found in the mirror)."
    monkeypatch.setitem(cd.DATASETS, 'cifar10', DataSource('cifar10', 'archive', (DataFile('cifar10.tgz', 'http://example.invalid/c.tgz', cd.sha256sum(p)),), folder='cifar10'))
    monkeypatch.setenv('COURSE_OFFLINE', '1')

# ---- two processes, cold cache

def test_two_processes_extract_one_archive_at_once(tmp_path):
    a = make_tar(tmp_path/'big.tgz', files=[(f'big/{i // 100}/{i}.txt', b'x' * 50) for i in range(600)])
    out = tmp_path/'out'
    assert race(lambda: untar_data(a, out)) == [out/'big'] * 2
    assert len(list((out/'big').rglob('*.txt'))) == 600 and [p for p in out.iterdir()] == [out/'big']

def test_two_processes_load_cifar10_at_once(data_env, tmp_path, monkeypatch):
    d, m = data_env
    use_cifar(monkeypatch, cifar_tgz(m/'cifar10.tgz', n_pad=600)[0])
    def load(): return [(tuple(t.shape), int(t.sum())) for t in load_cifar10()]
    rs = race(load)
    assert rs[0] == rs[1] == load() and rs[0][0][0] == (6, 3, 32, 32)
    assert temps(d) == [] or all(t.startswith('.course_lib') for t in temps(d))

# ---- downloads cut short

def test_download_cut_at_half_its_content_length_is_refused(data_env, tmp_path, server):
    d, _ = data_env
    body = os.urandom(4000)
    url = server('/half.bin', body, n=2000)
    s = DataSource('t', 'archive', (DataFile('half.bin', url, None, 'cd' * 32),))  # canonical digest not recorded, as for CIFAR-10
    with pytest.raises(DataNotFoundError) as e: download_data(s)
    assert '2000' in str(e.value) and '4000' in str(e.value) and url in str(e.value)
    assert leftovers(d) == []                                   # no file, no remembered digest, no temporary file
    server('/half.bin', body)                                   # the whole file: accepted, its digest remembered
    with pytest.warns(UserWarning, match=sha(body)): assert download_data(s) == [d/'half.bin']
    assert (d/'half.bin').read_bytes() == body and (d/'half.bin.sha256').read_text().strip() == sha(body)

def test_chunked_download_cut_short_is_a_data_error(data_env, tmp_path, server):
    d, _ = data_env
    url = server('/c.bin', b'7d0\r\n' + b'y' * 2000 + b'\r\n', {'Transfer-Encoding': 'chunked'})  # no final chunk
    Handler.protocol_version = 'HTTP/1.1'
    try:
        with pytest.raises(DataNotFoundError, match='IncompleteRead'): download_data(DataSource('t', 'text', (DataFile('c.bin', url, None, 'cd' * 32),)))
    finally: Handler.protocol_version = 'HTTP/1.0'
    assert leftovers(d) == []

def test_nietzsche_canonical_digest_is_the_mirror_file():
    f = DATASETS['nietzsche'].files[0]
    assert f.sha256 == 'dea01ca2da603db6736fd856c585d073ccf3dca68efe4a59c5e73242cdf0b028'
    for m in mirror_dirs():
        if (m/'nietzsche.txt').is_file(): assert cd.sha256sum(m/'nietzsche.txt') == f.sha256

# ---- half-written folders and what a killed process leaves

def test_half_written_folder_is_detected_and_redone(tmp_path):
    files = [(f'ds/{i:03d}.txt', bytes([i]) * 20) for i in range(40)]
    a = make_tar(tmp_path/'ds.tgz', files=files)
    out = tmp_path/'out'/'ds'; out.mkdir(parents=True)
    for n, b in files[:17]: (tmp_path/'out'/n).write_bytes(b)  # a run stopped after 17 of 40 files...
    (out/'016.txt').write_bytes(b'\x10' * 5)                      # ...half-way through the 17th
    assert untar_data(a, tmp_path/'out') == out
    assert {p.name: p.read_bytes() for p in out.glob('*.txt')} == {Path(n).name: b for n, b in files}
    assert temps(tmp_path/'out') == [] or all(t.startswith('.course_lib') for t in temps(tmp_path/'out'))

def test_complete_folder_extracted_by_hand_is_kept(tmp_path):
    files = [(f'ds/{i:03d}.txt', bytes([i]) * 20) for i in range(10)]
    a = make_tar(tmp_path/'ds.tgz', files=files)
    out = tmp_path/'out'/'ds'; out.mkdir(parents=True)
    for n, b in files: (tmp_path/'out'/n).write_bytes(b)
    (out/'notes.txt').write_text('mine')                          # a complete folder, with a file of the user's
    assert untar_data(a, tmp_path/'out') == out and (out/'notes.txt').read_text() == 'mine'

def test_half_written_cifar_folder_and_its_cache_are_redone(data_env, tmp_path, monkeypatch):
    d, m = data_env
    p, files = cifar_tgz(m/'cifar10.tgz', n_train=4)
    use_cifar(monkeypatch, p)
    for n, b in files[:4]:                                       # labels and 3 of the 8 training images
        (d/n).parent.mkdir(parents=True, exist_ok=True); (d/n).write_bytes(b)
    np.savez(d/'cifar10'/'course_lib_uint8.npz', x_train=np.zeros((3, 3, 32, 32), np.uint8), y_train=np.zeros(3, np.int64),
             x_test=np.zeros((0, 3, 32, 32), np.uint8), y_test=np.zeros(0, np.int64))  # the cache an old run made of them
    xtr, ytr, xte, yte = load_cifar10()
    assert xtr.shape == (8, 3, 32, 32) and ytr.tolist() == [0] * 4 + [1] * 4 and xte.shape == (2, 3, 32, 32)

def test_temporaries_of_a_killed_extraction_are_removed(tmp_path):
    a = make_tar(tmp_path/'ds.tgz', files=[(f'ds/{i}.txt', b'x' * 100) for i in range(30)])
    killed_at_replace(lambda: untar_data(a, tmp_path/'out'))
    assert temps(tmp_path/'out')                                  # what the crash left: a temporary folder
    assert untar_data(a, tmp_path/'out') == tmp_path/'out'/'ds'
    assert [p.name for p in (tmp_path/'out').iterdir()] == ['ds']

def test_temporaries_of_a_killed_cache_write_are_removed(data_env, tmp_path, monkeypatch):
    d, m = data_env
    use_cifar(monkeypatch, cifar_tgz(m/'cifar10.tgz')[0])
    untar_data('cifar10')
    killed_at_replace(load_cifar10)
    assert [t for t in temps(d/'cifar10') if t.startswith('.course_lib_uint8.npz.') and t.endswith('.tmp')]  # a partial cache file
    assert load_cifar10()[0].shape == (6, 3, 32, 32)
    assert sorted(p.name for p in (d/'cifar10').iterdir() if 'course_lib_uint8' in p.name) == ['course_lib_uint8.npz', 'course_lib_uint8.npz.json']

def test_temporaries_of_a_killed_download_are_removed(data_env, tmp_path):
    d, _ = data_env
    s = src_for(tmp_path, content=b'z' * 5000)
    killed_at_replace(lambda: download_data(s))
    assert temps(d)
    assert download_data(s) == [d/'f.txt'] and leftovers(d) == ['f.txt']

# ---- the decoded CIFAR-10 cache damaged

@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_corrupt_cifar_cache_is_rebuilt_with_a_notice(data_env, tmp_path, monkeypatch, damage):
    d, m = data_env
    use_cifar(monkeypatch, cifar_tgz(m/'cifar10.tgz')[0])
    good = load_cifar10()
    cache = d/'cifar10'/'course_lib_uint8.npz'
    raw = cache.read_bytes()
    cache.write_bytes(raw[:len(raw) // 2] if damage == 'truncate' else raw[:len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 1]) + raw[len(raw) // 2 + 1:])
    with pytest.warns(UserWarning) as w: again = load_cifar10()
    notes = [str(x.message) for x in w if str(cache) in str(x.message)]
    assert len(notes) == 1 and '\n' not in notes[0]
    for a, b in zip(good, again): assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert torch.equal(load_cifar10()[0], good[0])           # rebuilt: read quietly next time

# ---- a data dir that cannot be created

@pytest.mark.parametrize('where', ['under_a_file', 'sysfs'])
def test_data_dir_not_creatable(data_env, tmp_path, monkeypatch, where):
    _, m = data_env
    if where == 'under_a_file': (tmp_path/'file').write_text('x'); d = tmp_path/'file'/'data'
    else: d = Path('/sys/course_lib_test_data')
    monkeypatch.setenv('COURSE_DATA', str(d))
    s = src_for(tmp_path)
    (m/'f.txt').write_bytes(b'payload')
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    assert download_data(s) == [m/'f.txt'] and find_data(s) == [m/'f.txt']  # no write needed: the mirror copy is used
    a = make_tar(m/'ds.tgz', files=[('ds/a.txt', b'a')])
    monkeypatch.setitem(cd.DATASETS, 'tds', DataSource('tds', 'archive', (DataFile('ds.tgz', 'http://example.invalid/ds.tgz', cd.sha256sum(a)),), folder='ds'))
    with pytest.raises(OSError) as e: untar_data('tds')                     # extraction must write
    assert str(d) in str(e.value) and 'COURSE_DATA' in str(e.value)
    monkeypatch.undo(); monkeypatch.setenv('COURSE_DATA', str(d)); monkeypatch.setenv('COURSE_DATA_MIRROR', str(m)); monkeypatch.setenv('COURSE_OFFLINE', '0')
    (m/'f.txt').unlink()
    with pytest.raises(OSError) as e: download_data(s)                       # a download must write
    assert str(d) in str(e.value) and 'COURSE_DATA' in str(e.value)

# ---- what the errors say

def test_offline_rejected_copy_is_named_with_both_digests(data_env, tmp_path, monkeypatch):
    d, m = data_env
    s = src_for(tmp_path)
    (m/'f.txt').write_bytes(b'another file of that name')
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(DataNotFoundError) as e: download_data(s)
    msg = str(e.value)
    assert str(m/'f.txt') in msg and sha(b'another file of that name') in msg and sha(b'payload') in msg and 'sha256' in msg

def test_flipped_byte_in_gz_idx_file_is_an_idx_error(tmp_path):
    raw = write_gz(tmp_path/'a.gz', idx_bytes(np.arange(40 * 28 * 28).reshape(40, 28, 28) // 7 % 256)).read_bytes()
    for pos in range(20, len(raw) - 8, max(1, (len(raw) - 28) // 12)):
        b = bytearray(raw); b[pos] ^= 0x55
        p = tmp_path/f'flip{pos}.gz'; p.write_bytes(bytes(b))
        with pytest.raises(IDXError) as e: read_idx(p)
        assert str(p) in str(e.value)

def test_cifar10_offline_names_both_files_and_every_place(data_env, monkeypatch):
    d, m = data_env
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    with pytest.raises(DataNotFoundError) as e: load_cifar10()
    msg = str(e.value)
    for f in ('cifar10.tgz', 'cifar-10-python.tar.gz'): assert str(d/f) in msg and str(m/f) in msg, f
    for folder in ('cifar10', 'cifar-10-batches-py'): assert str(d/folder) in msg, folder


# ---- a student's own image folders (issue 22): classes that do not match, stray files, odd or broken images

def folder_tgz(path, train=('airplane', 'automobile'), test=('airplane', 'automobile'), extra=(), labels=b'airplane\nautomobile\n'):
    files = [('cifar10/labels.txt', labels)] if labels is not None else []
    files += [(f'cifar10/{s}/{c}/{i:04d}.png', png((40*k + i, 10, 10))) for s, cs in (('train', train), ('test', test))
              for k, c in enumerate(cs) for i in range(2)]
    return make_tar(path, files=files + list(extra))

def test_a_class_folder_missing_from_train_is_refused_not_shifted(data_env, monkeypatch):
    d, m = data_env
    use_cifar(monkeypatch, folder_tgz(m/'cifar10.tgz', train=('automobile',)))
    with pytest.raises(ValueError, match=r"cifar10/train: no folder for classes \['airplane'\]"): load_cifar10()
    assert not (d/'cifar10'/'course_lib_uint8.npz').exists()  # nothing cached

def test_a_class_folder_without_images_or_a_stray_folder_is_refused(data_env, monkeypatch):
    d, m = data_env
    use_cifar(monkeypatch, folder_tgz(m/'cifar10.tgz', extra=[('cifar10/test/cats/0.png', png((1, 2, 3))), ('cifar10/train/airplane/notes.txt', b'x')]))
    with pytest.raises(ValueError, match=r"cifar10/test: folders \['cats'\] are not classes"): load_cifar10()

def test_files_that_are_not_images_are_left_out(data_env, monkeypatch):
    d, m = data_env
    use_cifar(monkeypatch, folder_tgz(m/'cifar10.tgz', extra=[('cifar10/train/airplane/.DS_Store', b'\0\0\0\1Bud1'), ('cifar10/train/automobile/Thumbs.db', b'\xd0\xcf')]))
    xtr, ytr, _, _ = load_cifar10()
    assert xtr.shape == (4, 3, 32, 32) and ytr.tolist() == [0, 0, 1, 1]

def test_an_image_of_another_size_or_a_truncated_one_names_its_file(data_env, monkeypatch):
    from PIL import Image
    d, m = data_env
    buf = io.BytesIO(); Image.new('RGB', (30, 32)).save(buf, 'PNG')
    use_cifar(monkeypatch, folder_tgz(m/'cifar10.tgz', extra=[('cifar10/train/automobile/9.png', buf.getvalue())]))
    with pytest.raises(ValueError, match=r'train/automobile/9.png: a 30×32 image, expected 32×32'): load_cifar10()
    jpg = io.BytesIO(); Image.new('RGB', (32, 32), (9, 9, 9)).save(jpg, 'JPEG')
    import shutil; shutil.rmtree(d/'cifar10')
    use_cifar(monkeypatch, folder_tgz(m/'cifar10.tgz', extra=[('cifar10/test/airplane/9.jpg', jpg.getvalue()[:200])]))
    with pytest.raises(ValueError, match=r'test/airplane/9.jpg: cannot read the image'): load_cifar10()

def test_the_cache_follows_what_the_folder_holds(data_env, monkeypatch):
    "A folder fixed or extended after the first load is decoded again (the cache's key is its files' names, sizes and times)."
    d, m = data_env
    use_cifar(monkeypatch, folder_tgz(m/'cifar10.tgz'))
    assert load_cifar10()[0].shape == (4, 3, 32, 32)
    (d/'cifar10'/'train'/'airplane'/'0002.png').write_bytes(png((200, 200, 200)))
    with pytest.warns(UserWarning, match='making it again'): xtr, ytr, _, _ = load_cifar10()
    assert xtr.shape == (5, 3, 32, 32) and ytr.tolist() == [0, 0, 0, 1, 1] and xtr[2, 0, 0, 0] == 200

def test_dogscats_valid_must_have_the_classes_of_train(data_env, monkeypatch, tmp_path):
    from course_lib.datasets import image_folders
    root = tmp_path/'dc'
    for s, cs in (('train', ('cats', 'dogs')), ('valid', ('dogs',))):
        for c in cs:
            (root/s/c).mkdir(parents=True); (root/s/c/'0.png').write_bytes(png((1, 2, 3)))
    with pytest.raises(ValueError, match=r"dc/valid: no folder for classes \['cats'\]"): image_folders(root)
    (root/'valid'/'cats').mkdir(); (root/'valid'/'cats'/'Thumbs.db').write_bytes(b'x')
    with pytest.raises(ValueError, match=r"dc/valid: no images in the folders of classes \['cats'\]"): image_folders(root)
    (root/'valid'/'cats'/'1.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
    tr, va = image_folders(root)
    assert tr.classes == va.classes == ['cats', 'dogs'] and len(va) == 2
    with pytest.raises(ValueError, match=r'valid/cats/1.jpg: cannot read the image'): va[0]
