"Lesson 0a's `cached`: a cache file with a stamp, made once under a lock, read without one, remade when stale or damaged."
import json, os, warnings
import pytest
import course_lib.files as cf
from course_lib.files import cached

def jsave(o, f): f.write(json.dumps(o).encode())
def jload(p): return json.loads(p.read_text())

class Maker:
    def __init__(self): self.n = 0
    def __call__(self): self.n += 1; return {'n': self.n}

def test_made_once_then_read(tmp_path):
    p, make = tmp_path/'r.bin', Maker()
    assert cached(p, {'a': 1}, make, jsave, jload) == {'n': 1}
    assert cached(p, {'a': 1}, make, jsave, jload) == {'n': 1} and make.n == 1
    st = json.loads((tmp_path/'r.bin.json').read_text())
    assert st['key'] == {'a': 1} and st['sha256'] == cf.sha256sum(p)

@pytest.mark.parametrize('damage, why', [('stamp', 'JSONDecodeError'), ('file', 'sha256 does not match'), ('key', "made for {'a': 0}"),
                                        ('empty', 'no sha256 in it')])
def test_a_stale_or_damaged_cache_is_remade_with_one_warning_naming_it(tmp_path, damage, why):
    p, make = tmp_path/'r.bin', Maker()
    cached(p, {'a': 1}, make, jsave, jload)
    s = tmp_path/'r.bin.json'
    if damage == 'stamp': s.write_text(s.read_text()[:10])
    if damage == 'file': p.write_text('{"n": 99}')
    if damage == 'key': s.write_text(json.dumps({**json.loads(s.read_text()), 'key': {'a': 0}}))
    if damage == 'empty': s.write_text('{}')
    with pytest.warns(UserWarning) as ws: assert cached(p, {'a': 1}, make, jsave, jload) == {'n': 2}
    msgs = [str(w.message) for w in ws]
    assert len(msgs) == 1 and msgs[0].startswith(str(p)) and why in msgs[0] and 'making it again' in msgs[0], msgs
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert cached(p, {'a': 1}, make, jsave, jload) == {'n': 2}  # repaired: read quietly

def test_reading_takes_no_lock(tmp_path, monkeypatch):
    "A valid cache in a folder one may only read (a shared class machine): read without taking the lock."
    p, make = tmp_path/'r.bin', Maker()
    cached(p, 'k', make, jsave, jload)
    def no_lock(path): raise PermissionError(13, 'Permission denied', str(path))
    monkeypatch.setattr(cf, 'locked', no_lock)
    assert cached(p, 'k', make, jsave, jload) == {'n': 1} and make.n == 1

def test_a_cache_that_cannot_be_kept_is_made_and_returned_with_a_warning(tmp_path, monkeypatch):
    p, make = tmp_path/'r.bin', Maker()
    def no_lock(path): raise PermissionError(13, 'Permission denied', str(path))
    monkeypatch.setattr(cf, 'locked', no_lock)
    with pytest.warns(UserWarning, match='cannot keep it there'): assert cached(p, 'k', make, jsave, jload) == {'n': 1}
    assert not p.exists()

def test_an_error_while_making_leaves_nothing_behind(tmp_path):
    p = tmp_path/'r.bin'
    def boom(): raise KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt): cached(p, 'k', boom, jsave, jload)
    def bad_save(o, f): f.write(b'half'); raise OSError(28, 'No space left on device')
    with pytest.raises(OSError): cached(p, 'k', Maker(), bad_save, jload)
    assert sorted(os.listdir(tmp_path)) == []
