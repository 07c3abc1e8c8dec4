import pytest, torch

from course_lib.core import *

def test_listify():
    assert listify(None) == [] and listify('ab') == ['ab'] and listify(range(3)) == [0, 1, 2]
    assert listify({'a': 1}) == [{'a': 1}] and listify(5) == [5]

def test_camel2snake():
    assert camel2snake('AvgStatsCallback') == 'avg_stats_callback'
    assert camel2snake('GRUCell') == 'gru_cell'
    assert camel2snake('LR_Find') == 'lr_find'

def test_stats_of_constant():
    m, s = stats(torch.ones(10))
    assert (m, s) == (1.0, 0.0)

def test_test_between_message():
    with pytest.raises(AssertionError, match=r'loss = 5, expected between 0 and 1'): test_between(5, 0, 1, 'loss')

@pytest.mark.parametrize('val,exp', [('quick', 1), ('medium', 3), ('full', 2), ('QUICK', 1), (' Medium ', 3)])
def test_size_pick(monkeypatch, val, exp):
    monkeypatch.setenv('COURSE_SIZE', val)
    assert size_pick(1, 2, medium=3) == exp
    assert size_pick(1, 2) == (1 if exp == 1 else 2)  # medium defaults to full

def test_size_unset_is_full_with_a_gpu_else_medium(monkeypatch):
    monkeypatch.delenv('COURSE_SIZE', raising=False)
    assert course_size() == ('full' if torch.cuda.is_available() else 'medium')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert course_size() == 'full' and size_pick(1, 2, 3) == 2

def test_size_pick_bad(monkeypatch):
    monkeypatch.setenv('COURSE_SIZE', 'huge')
    with pytest.raises(ValueError, match=r"COURSE_SIZE='huge', expected one of \('quick', 'medium', 'full'\)"): size_pick(1, 2)

def test_default_device(monkeypatch):
    monkeypatch.delenv('COURSE_DEVICE', raising=False)
    assert default_device().type == ('cuda' if torch.cuda.is_available() else 'cpu')
    monkeypatch.setenv('COURSE_DEVICE', 'nonsense')
    with pytest.raises(ValueError, match='COURSE_DEVICE'): default_device()

def test_set_seed_repeats():
    set_seed(3); a = torch.randn(3)
    set_seed(3); assert torch.equal(torch.randn(3), a)
