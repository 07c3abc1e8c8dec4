import random
import numpy as np, pytest, torch

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
    assert size_pick(quick=1, full=2, medium=3) == exp

def test_size_pick_is_keyword_only_and_needs_every_size(monkeypatch):
    monkeypatch.setenv('COURSE_SIZE', 'quick')
    with pytest.raises(TypeError, match='positional'): size_pick(1, 2, 3)
    with pytest.raises(TypeError, match="'medium'"): size_pick(quick=1, full=2)

def test_size_unset_follows_the_device_the_lessons_use(monkeypatch):
    monkeypatch.delenv('COURSE_SIZE', raising=False); monkeypatch.delenv('COURSE_DEVICE', raising=False)
    assert course_size() == ('full' if torch.cuda.is_available() else 'medium')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert course_size() == 'full' and size_pick(quick=1, medium=3, full=2) == 2
    monkeypatch.setenv('COURSE_DEVICE', 'cpu')  # a GPU box told to train on its CPU: the CPU's size
    assert course_size() == 'medium'

def test_size_pick_bad(monkeypatch):
    monkeypatch.setenv('COURSE_SIZE', 'huge')
    with pytest.raises(ValueError, match=r"COURSE_SIZE='huge', expected one of \('quick', 'medium', 'full'\)"): size_pick(quick=1, medium=2, full=3)

def test_default_device(monkeypatch):
    monkeypatch.delenv('COURSE_DEVICE', raising=False)
    assert default_device().type == ('cuda' if torch.cuda.is_available() else 'cpu')
    monkeypatch.setenv('COURSE_DEVICE', 'nonsense')
    with pytest.raises(ValueError, match='COURSE_DEVICE'): default_device()

def test_set_seed_repeats():
    set_seed(3); a = torch.randn(3)
    set_seed(3); assert torch.equal(torch.randn(3), a)


# --- test_near: the course's rule (torch.allclose, rtol 1e-3, atol 1e-5), both settable

def test_test_near_is_relative_and_absolute():
    test_near(torch.tensor(1e4), torch.tensor(1e4 + 5.))         # within 1e-3 relative: a large logit
    with pytest.raises(AssertionError, match='not close'): test_near(1e4, 1e4 + 20.)
    test_near(1e-6, 2e-6)                                         # within 1e-5 absolute
    with pytest.raises(AssertionError, match='not close'): test_near(1e4, 1e4 + 5., 1e-5)  # eps alone: absolute only
    test_near(1e4, 1e4 + 5., rtol=1e-3)
    with pytest.raises(AssertionError, match='not close'): test_near(1., 1.1, rtol=0.05)  # rtol alone: relative only
    for a in (torch.randn(20) * 1e3, torch.randn(5, 3)):
        b = a * (1 + 5e-4)
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)  # the same rule
        test_near(a, b)

def test_test_near_on_lists_arrays_shapes_and_nan():
    test_near([1., torch.tensor(2.), np.float32(3.)], (1., 2., 3.))
    test_near(np.ones(3), torch.ones(3))
    with pytest.raises(AssertionError, match=r'\[1\]'): test_near([1., 2.], [1., 3.])  # names the item
    with pytest.raises(AssertionError, match='2 items and 1 items'): test_near([1., 2.], [1.])
    with pytest.raises(AssertionError, match=r'shapes \(3,\) and \(2,\)'): test_near(torch.ones(3), torch.ones(2))
    with pytest.raises(AssertionError, match='not close'): test_near(float('nan'), float('nan'))
    test_near(float('inf'), float('inf'))

def test_test_near_zero():
    test_near_zero(torch.tensor([1e-4, -1e-4]))
    test_near_zero(0.01, tol=0.02)
    with pytest.raises(AssertionError, match='not near zero'): test_near_zero(torch.tensor([0., 2e-3]))

def test_rng_states_round_trip():
    s = rng_states()
    a = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_states(s)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])

# --- second pass: one integer check, one DDP unwrap, generator states that a checkpoint can keep

def test_check_int():
    assert check_int(bs=3) == 3 and check_int(a=1, b=2) == (1, 2) and check_int(0, n=0) == 0
    import numpy as np
    assert check_int(bs=np.int64(4)) == 4 and type(check_int(bs=np.int64(4))) is int
    for bad in (0, -1, 2.0, True, None, '3'):
        with pytest.raises(ValueError, match=rf'bs={bad!r}, expected an integer >= 1'): check_int(bs=bad)
    with pytest.raises(ValueError, match='n=5, expected an integer from 0 to 4'): check_int(0, 4, n=5)

def test_rng_states_survive_a_weights_only_file():
    import io, random
    import numpy as np
    s = rng_states()
    a = (torch.rand(2), random.random(), np.random.rand())
    buf = io.BytesIO(); torch.save(s, buf); buf.seek(0)
    set_rng_states(torch.load(buf, weights_only=True))
    b = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    with pytest.raises(Exception): set_rng_states({**s, 'torch': s['torch'][:10]}, check=True)
    assert torch.rand(2).tolist() != a[0].tolist()  # the failed check changed nothing: the sequence went on

def test_unwrap():
    m = torch.nn.Linear(2, 2)
    assert unwrap(m) is m
