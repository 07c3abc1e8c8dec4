import os, pytest

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
