"Lesson 6: the vocabulary, windows and the language-model loader (`course_lib.text`)."
import math
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.text import *
from course_lib.callbacks import Runner, Learner, DataBunch, AvgStatsCallback
from course_lib.anneal import Recorder, SGDRCallback, sgdr_cycles

def ids_of(n, seed=0, vs=20):
    return torch.randint(1, vs, (n,), generator=torch.Generator().manual_seed(seed))

def epoch(dl): return list(dl)

@pytest.mark.parametrize('n,bs,bptt', [(1000, 7, 8), (5000, 64, 8), (333, 1, 5), (65, 64, 3), (10_000, 16, 70)])
def test_every_token_an_input_once_targets_shifted(n, bs, bptt):
    ids = torch.arange(n)
    dl = LMLoader(ids, bs, bptt, seed=0)
    L = (n - 1) // bs
    for _ in range(2):
        batches = epoch(dl)
        xs = torch.cat([x for x, _ in batches], 1)
        assert xs.shape == (bs, L)
        assert torch.equal(xs.flatten(), ids[:bs * L])                  # each of the first bs*L tokens once, in order per stream
        for x, y in batches: assert torch.equal(y, x.flatten() + 1)     # ids are positions: the target is the next token
        assert n - bs * L <= bs                                          # only the tail that can't fill a row is left out

def test_len_is_exact_and_has_no_side_effect():
    dl = LMLoader(ids_of(20_000), 32, 8, seed=3)
    for _ in range(5):
        n = len(dl)
        assert len(dl) == n
        assert len(epoch(dl)) == n

def test_epochs_differ_same_seed_same_batches():
    ids = ids_of(20_000)
    a, b = LMLoader(ids, 32, 8, seed=5), LMLoader(ids, 32, 8, seed=5)
    for _ in range(3):
        ea, eb = epoch(a), epoch(b)
        assert len(ea) == len(eb) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(ea, eb))
    c = LMLoader(ids, 32, 8, seed=6)
    assert [x.shape[1] for x, _ in epoch(c)] != [x.shape[1] for x, _ in epoch(LMLoader(ids, 32, 8, seed=5))]
    assert [x.shape[1] for x, _ in epoch(a)] != [x.shape[1] for x, _ in epoch(a)]  # consecutive epochs differ

def test_global_seed_picks_the_loader_seed():
    ids = ids_of(5000)
    torch.manual_seed(0); a = [x.shape[1] for x, _ in LMLoader(ids, 8, 8)]
    torch.manual_seed(0); b = [x.shape[1] for x, _ in LMLoader(ids, 8, 8)]
    assert a == b

def test_bptt_lens_follow_the_rule():
    "The rule element by element, from the same draws: 95% bptt else bptt/2, + 5*N(0,1), truncated, at least 5."
    n, bptt = 50_000, 70
    sl = bptt_lens(n, bptt, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    k = n // 5 + 1
    u, z = torch.rand(k, generator=g), torch.randn(k, generator=g)
    ref = [max(5, int((bptt if u[i] < 0.95 else bptt / 2) + 5 * z[i])) for i in range(len(sl) - 1)]
    assert sl[:-1] == ref
    assert sum(sl) == n and 1 <= sl[-1]
    halves = sum(o < bptt * 0.75 for o in sl[:-1]) / (len(sl) - 1)
    assert 0.035 < halves < 0.065                                       # about 5% at bptt/2 (no overlap at bptt=70)

@pytest.mark.parametrize('bptt', [1, 5, 8, 64])
def test_bptt_lens_cover_n(bptt):
    for n in (1, 4, 5, 6, 99, 1000):
        for rand in (True, False):
            sl = bptt_lens(n, bptt, torch.Generator().manual_seed(n), rand)
            assert sum(sl) == n and all(o >= 1 for o in sl)
            if not rand: assert all(o == bptt for o in sl[:-1])
            else: assert all(o >= 5 for o in sl[:-1])

def test_fixed_bptt_loader():
    dl = LMLoader(torch.arange(1001), 10, 7, rand_bptt=False)
    assert [x.shape[1] for x, _ in dl] == [7] * 14 + [2] and len(dl) == 15

def test_sgdr_ends_each_cycle_at_its_minimum():
    "With the exact len, every SGDR cycle's last batch is at (almost) min_lr and the fit ends at position exactly 1."
    ids = ids_of(8000)
    data = DataBunch(LMLoader(ids, 16, 8, seed=0), LMLoader(ids[:2000], 16, 8, rand_bptt=False))
    model = nn.Embedding(20, 20)
    lm_loss = lambda pred, yb: F.cross_entropy(pred.view(-1, 20), yb)
    run = Runner(cb_funcs=[Recorder, partial(AvgStatsCallback, [], silent=True), partial(SGDRCallback, 0.1, 0.001, 3, cycle_mult=2)])
    run.fit(sum(sgdr_cycles(3, cycle_mult=2)), Learner(model, optim.Adam(model.parameters(), 0.1), lm_loss, data))
    lrs = run.recorder.lrs[-1]
    ends = [i - 1 for i in range(1, len(lrs)) if lrs[i] > lrs[i - 1]] + [len(lrs) - 1]
    assert len(ends) == 3
    for i in ends: assert 0.001 <= lrs[i] < 0.001 + 1e-4
    assert abs(run.n_epochs - 7) < 1e-9

def test_vocab():
    v = Vocab('hello world')
    assert v.itos == ['\0', ' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w'] and len(v) == 9
    ids = v.numericalize('hold!')
    assert ids.dtype == torch.long and ids.tolist() == [4, 6, 5, 2, 0]      # '!' is unknown: 0
    assert v.textify(ids[:4]) == 'hold' and v.textify([4, 3]) == 'he'
    assert Vocab('a\0b').itos == ['\0', 'a', 'b']

def test_split_text_and_windows():
    tr, va = split_text('abcdefghij')
    assert (tr, va) == ('abcdefgh', 'ij')
    x, y = char_windows(torch.arange(10), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y.tolist() == [3, 6, 9]
    x, y = char_windows(torch.arange(10), 4, step=1, seq=True)
    assert len(x) == 6 and torch.equal(y, x + 1)

def test_unigram_nll():
    tr = torch.tensor([1, 1, 1, 2])
    assert abs(unigram_nll(tr, torch.tensor([1, 2]), 3) - -(math.log(4 / 7) + math.log(2 / 7)) / 2) < 1e-12

@pytest.mark.parametrize('kwargs,msg', [
    (dict(bs=0), 'bs=0'), (dict(bptt=0), 'bptt=0'), (dict(bs=2.5), 'bs=2.5'), (dict(bptt=True), 'bptt=True'),
    (dict(ids=torch.arange(5)), 'more than bs'), (dict(ids=torch.rand(100)), '1-d integer tensor'),
    (dict(ids=torch.zeros(10, 10, dtype=torch.long)), '1-d integer tensor'), (dict(ids=[1, 2, 3]), '1-d integer tensor')])
def test_loader_bad_input(kwargs, msg):
    args = dict(ids=torch.arange(100), bs=8, bptt=8) | kwargs
    with pytest.raises((ValueError, TypeError), match=msg): LMLoader(**args)

def test_text_bad_input():
    with pytest.raises(ValueError, match='valid_pct=1.5'): split_text('abc', 1.5)
    with pytest.raises(TypeError, match='expected a str'): split_text(['a'])
    with pytest.raises(ValueError, match='non-empty'): Vocab('')
    with pytest.raises(ValueError, match='step=0'): char_windows(torch.arange(10), 3, step=0)
    with pytest.raises(ValueError, match='more than cs=10'): char_windows(torch.arange(10), 10)

@pytest.mark.parametrize('dtype', [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_loader_serves_any_integer_ids_as_int64(dtype):
    "Ids stored in a smaller integer type come out as int64, the batches the int64 ids give, ready for an embedding and the loss."
    ids = ids_of(2000)
    a, b = epoch(LMLoader(ids.to(dtype), 8, 8, seed=0)), epoch(LMLoader(ids, 8, 8, seed=0))
    assert len(a) == len(b)
    for (x, y), (u, w) in zip(a, b): assert x.dtype == y.dtype == torch.long and torch.equal(x, u) and torch.equal(y, w)
    F.cross_entropy(nn.Embedding(20, 20)(x).view(-1, 20), y)

def test_loader_refuses_bool_ids():
    with pytest.raises(TypeError, match='torch.bool'): LMLoader(torch.ones(100, dtype=torch.bool), 8, 8)

@pytest.mark.parametrize('text,pct,msg', [('ab', 0.2, '2 characters .* give 2 for training and 0 for validation'), ('a', 0.2, '1 for training and 0 for validation'),
                                          ('abc', 0.9, '0 for training and 3 for validation'), ('', 0.5, '0 characters')])
def test_split_text_refuses_an_empty_part(text, pct, msg):
    with pytest.raises(ValueError, match=msg): split_text(text, pct)

def test_streams_are_consecutive_pieces_of_the_text():
    "Row k of every batch continues row k of the one before, and row k starts `k * stream_len` tokens in."
    dl = LMLoader(torch.arange(1001), 10, 7, rand_bptt=False)
    assert dl.stream_len == 100 and not hasattr(dl, 'L')
    x0, y0 = next(iter(dl))
    assert x0[:, 0].tolist() == [k * 100 for k in range(10)] and x0.shape == (10, 7)
    xs = torch.cat([x for x, _ in dl], 1)
    assert torch.equal(xs, torch.arange(1000).view(10, 100))             # stream k: tokens k*100 .. k*100+99, in order
    assert torch.equal(torch.cat([y.view(10, -1) for _, y in dl], 1), xs + 1)  # the last target of stream k: stream k+1's first

def test_split_text_names_a_fraction_outside_zero_to_one():
    for pct in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match=f'valid_pct={pct!r}, expected a fraction strictly between 0 and 1'):
            split_text('abcdef', pct)
    assert split_text('ab', 0.5) == ('a', 'b')  # the shortest text that splits: one character each

def test_numericalize_gives_int64_even_for_an_empty_string():
    v = Vocab('abc')
    for s in ('', 'ab', 'zz'): assert v.numericalize(s).dtype == torch.long, s

def test_unigram_smooths_over_the_whole_vocabulary():
    "Add-one over every token of the vocabulary: one never seen in training still has a probability, 1 / (n + V)."
    assert math.isclose(unigram_nll(torch.tensor([0, 0]), torch.tensor([2]), 3), math.log(5))
    assert math.isclose(unigram_nll(torch.tensor([0, 0]), torch.tensor([0]), 3), -math.log(3 / 5))

def test_random_bptt_lengths_are_clamped_at_exactly_five():
    sl = bptt_lens(20_000, 5, torch.Generator().manual_seed(0))
    assert min(sl[:-1]) == 5 and sl.count(5) > 100  # half the draws around 5 fall below it and are clamped to 5

def test_loader_needs_more_than_bs_tokens_and_makes_exactly_bs_streams():
    with pytest.raises(ValueError, match='8 tokens for bs=8 streams, expected more than bs'): LMLoader(torch.arange(8), 8, 4)
    for n in (9, 10, 17):  # one input per stream (and a token or more left over): still bs streams
        x, y = next(iter(LMLoader(torch.arange(n), 8, 4)))
        assert x.shape[0] == 8 and len(y) == x.numel(), n

def test_loader_names_what_it_was_given():
    with pytest.raises(TypeError, match=r'ids is a Tensor \(3,\) torch\.float32, expected a 1-d integer tensor'):
        LMLoader(torch.ones(3), 2, 4)
    with pytest.raises(TypeError, match=r'ids is a list'): LMLoader([1, 2, 3], 2, 4)
