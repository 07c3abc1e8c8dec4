import pytest, torch

from course_lib.core import *

def test_listify():
    assert listify(None) == [] and listify('ab') == ['ab'] and listify(range(3)) == [0, 1, 2]
    assert listify({'a': 1}) == [{'a': 1}] and listify(5) == [5]

def test_camel2snake():
    assert camel2snake('AvgStatsCallback') == 'avg_stats_callback'
    assert camel2snake('GRUCell') == 'gru_cell'

def test_stats_of_constant():
    m, s = stats(torch.ones(10))
    assert (m, s) == (1.0, 0.0)

def test_test_between_message():
    with pytest.raises(AssertionError, match=r'loss = 5, expected between 0 and 1'): test_between(5, 0, 1, 'loss')

@pytest.mark.parametrize('val,exp', [('quick', 1), ('full', 2), ('QUICK', 1), ('', 2)])
def test_size_pick(monkeypatch, val, exp):
    monkeypatch.setenv('COURSE_SIZE', val)
    assert size_pick(1, 2) == exp

def test_size_pick_bad(monkeypatch):
    monkeypatch.setenv('COURSE_SIZE', 'medium')
    with pytest.raises(ValueError, match=r"COURSE_SIZE='medium', expected one of \('quick', 'full'\)"): size_pick(1, 2)

def test_default_device(monkeypatch):
    monkeypatch.delenv('COURSE_DEVICE', raising=False)
    assert default_device().type == ('cuda' if torch.cuda.is_available() else 'cpu')
    monkeypatch.setenv('COURSE_DEVICE', 'nonsense')
    with pytest.raises(ValueError, match='COURSE_DEVICE'): default_device()

def test_set_seed_repeats():
    set_seed(3); a = torch.randn(3)
    set_seed(3); assert torch.equal(torch.randn(3), a)
