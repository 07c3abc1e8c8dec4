import os, pytest, torch

@pytest.fixture
def data_env(tmp_path, monkeypatch):
    "A private data dir and an empty mirror dir; downloads allowed unless a test turns them off."
    d, m = tmp_path/'data', tmp_path/'mirror'
    d.mkdir(); m.mkdir()
    monkeypatch.setenv('COURSE_DATA', str(d))
    monkeypatch.setenv('COURSE_DATA_MIRROR', str(m))
    monkeypatch.setenv('COURSE_OFFLINE', '0')
    return d, m

def pytest_pycollect_makeitem(collector, name, obj):
    "Collect only test functions defined in the test file, not helpers like `test_eq` brought in by `import *`."
    if callable(obj) and name.startswith('test') and getattr(obj, '__module__', None) != collector.obj.__name__: return []

def count_syncs(monkeypatch):
    "Count calls of the Tensor methods that read a value back to Python (a GPU sync); `monkeypatch.undo()` stops it."
    counts = {}
    for name in ('item', 'cpu', 'tolist', 'numpy', '__float__', '__bool__'):
        orig = getattr(torch.Tensor, name)
        def wrap(self, *a, _orig=orig, _n=name, **k):
            counts[_n] = counts.get(_n, 0) + 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrap)
    return counts
