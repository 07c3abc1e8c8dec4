import math
from functools import partial
import numpy as np
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.training import Dataset
from course_lib.callbacks import *
from course_lib.cuda import DeviceCallback, BatchTransformXCallback
from course_lib.anneal import ParamScheduler, sched_lin
import course_lib.vision as vision
from course_lib.vision import *
from course_lib.training import batch_dl, evaluating, confusion_matrix
from course_lib.anneal import SGDW


def images(n=16, c=3, h=32, w=32, seed=0):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

def symmetric_pad(x, pad):
    "numpy's 'symmetric' padding of the last two axes (OpenCV's BORDER_REFLECT: the edge pixel repeated)."
    return torch.from_numpy(np.pad(x.numpy(), [(0, 0)] * (x.dim() - 2) + [(pad, pad)] * 2, mode='symmetric'))

def loop_reference(xb, pad, generator):
    "The same augmentation image by image, drawing the random numbers in the same order."
    bs, _, h, w = xb.shape
    u = torch.rand(bs, 3, generator=generator)  # three numbers per image: the offsets, then the flip
    dy, dx, flip = (u[:, 0] * (2*pad + 1)).long(), (u[:, 1] * (2*pad + 1)).long(), u[:, 2] < 0.5
    out = [symmetric_pad(xb[i], pad)[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(bs)]
    return torch.stack([o.flip(2) if f else o for o, f in zip(out, flip)])


@pytest.mark.parametrize('shape', [(2, 3, 8, 8), (1, 1, 5, 7), (4, 2, 3, 1)])
@pytest.mark.parametrize('pad', [0, 1, 3, 8])
@pytest.mark.parametrize('dtype', [torch.uint8, torch.int32, torch.float32])
def test_pad_reflect_is_numpy_symmetric(shape, pad, dtype):
    "Reflection with the edge repeated, as OpenCV's BORDER_REFLECT, for pads wider than the image too, any dtype."
    x = images(*shape).to(dtype)
    out = pad_reflect(x, pad)
    assert out.dtype == dtype and out.shape == (*shape[:2], shape[2] + 2*pad, shape[3] + 2*pad)
    assert torch.equal(out, symmetric_pad(x, pad))

@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_flip_pad_crop_keeps_the_memory_layout(fmt):
    xb = images(8).contiguous(memory_format=fmt)
    assert flip_pad_crop(xb, generator=torch.Generator().manual_seed(0)).is_contiguous(memory_format=fmt)

@pytest.mark.parametrize('x,pad,msg', [(images(2), -1, 'pad=-1, expected an integer >= 0'), (images(2), 2.0, 'pad=2.0'),
                                       (torch.arange(5), 1, r'\(5,\), expected …×h×w')])
def test_pad_reflect_bad_input(x, pad, msg):
    with pytest.raises(ValueError, match=msg): pad_reflect(x, pad)

def test_pad_reflect_is_not_torch_reflect():
    row = torch.arange(1, 5)[None, None]
    assert pad_reflect(row, 2)[0, 2].tolist() == [2, 1, 1, 2, 3, 4, 4, 3]
    assert F.pad(row.float(), (2, 2), mode='reflect')[0, 0].tolist() == [3, 2, 1, 2, 3, 4, 3, 2]
    assert torch.equal(reflect(torch.arange(-3, 7), 4), torch.tensor([2, 1, 0, 0, 1, 2, 3, 3, 2, 1]))

def test_flip_pad_crop_crops_are_crops_of_the_reflected_image():
    "Each output is one of the 2*(2*pad+1)**2 flipped or plain crops of the symmetric-padded image (no black border)."
    h, pad = 8, 2
    x = torch.arange(h * h).view(1, 1, h, h) + 1  # every pixel different, none 0
    padded = symmetric_pad(x, pad)[0, 0]
    crops = {}
    for dy in range(2*pad + 1):
        for dx in range(2*pad + 1):
            c = padded[dy:dy + h, dx:dx + h]
            crops[c.numpy().tobytes()], crops[c.flip(1).numpy().tobytes()] = (dy, dx, 0), (dy, dx, 1)
    out = flip_pad_crop(x.expand(200, 1, h, h), pad, generator=torch.Generator().manual_seed(0))
    found = [crops.get(o[0].contiguous().numpy().tobytes()) for o in out]
    assert None not in found
    assert len({f[:2] for f in found}) == (2*pad + 1) ** 2 and 0 < sum(f[2] for f in found) < 200


@pytest.mark.parametrize('shape,pad', [((16, 3, 32, 32), None), ((5, 1, 12, 20), 3), ((4, 3, 8, 8), 0), ((1, 2, 9, 7), 1)])
@pytest.mark.parametrize('dtype', [torch.uint8, torch.float32, torch.float64])
def test_flip_pad_crop_matches_the_per_image_loop(shape, pad, dtype):
    xb = images(*shape).to(dtype)
    g = torch.Generator().manual_seed(3)
    ref = loop_reference(xb, shape[2] // 8 if pad is None else pad, torch.Generator().set_state(g.get_state()))
    out = flip_pad_crop(xb, pad, generator=g)
    assert out.shape == xb.shape and out.dtype == dtype
    assert torch.equal(out, ref)

def test_flip_pad_crop_same_generator_same_batch_other_seed_other_batch():
    xb = images(64)
    a, b = (flip_pad_crop(xb, generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, flip_pad_crop(xb, generator=torch.Generator().manual_seed(8)))
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(flip_pad_crop(xb, generator=g), flip_pad_crop(xb, generator=g))  # the state moves on

def test_flip_pad_crop_is_per_image():
    "Flips and offsets differ between the images of one batch: some images are flipped and some are not, offsets vary."
    xb = images(1).expand(64, -1, -1, -1).contiguous()  # 64 copies of one image
    out = flip_pad_crop(xb, generator=torch.Generator().manual_seed(0))
    assert len({o.numpy().tobytes() for o in out}) > 32
    u = draw(64, 3, torch.Generator().manual_seed(0))  # the numbers flip_pad_crop drew
    dy, dx, flip = (u[:, 0] * 9).long(), (u[:, 1] * 9).long(), u[:, 2] < 0.5
    assert 0 < flip.sum() < 64 and (plain_count := (dy.eq(4) & dx.eq(4)).sum()) > 0, plain_count
    plain = dy.eq(4) & dx.eq(4) & ~flip  # no shift, no flip: the image itself
    assert all(torch.equal(out[i], xb[i]) for i in torch.where(plain)[0])
    mirrored = dy.eq(4) & dx.eq(4) & flip
    assert all(torch.equal(out[i], xb[i].flip(2)) for i in torch.where(mirrored)[0])

def test_flip_pad_crop_uses_the_global_rng_without_a_generator():
    xb = images(32)
    torch.manual_seed(1); a = flip_pad_crop(xb)
    torch.manual_seed(1); b = flip_pad_crop(xb)
    assert torch.equal(a, b)

@pytest.mark.parametrize('xb,kw,msg', [(torch.zeros(3, 32, 32), {}, 'expected a batch of images'),
                                       (torch.zeros(2, 3, 8, 8), dict(pad=-1), 'pad=-1, expected an integer >= 0'),
                                       (torch.zeros(2, 3, 8, 8), dict(pad=1.5), 'pad=1.5')])
def test_flip_pad_crop_bad_input(xb, kw, msg):
    with pytest.raises(ValueError, match=msg): flip_pad_crop(xb, **kw)


def test_cifar_stats_match_a_direct_computation():
    x = images(40, seed=2)
    m, s = cifar_stats(x, bs=7)
    xf = x.double().div(255).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(m, xf.mean(1).float())
    torch.testing.assert_close(s, xf.std(1, unbiased=False).float())

@pytest.mark.parametrize('x', [torch.zeros(4, 3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.uint8), [[1, 2]]])
def test_cifar_stats_bad_input(x):
    with pytest.raises(ValueError, match='expected uint8 images'): cifar_stats(x)

def test_normalize_round_trip_and_statistics():
    x = images(64)
    norm = Normalize(*cifar_stats(x))
    xn = norm(x)
    assert xn.dtype == torch.float32
    torch.testing.assert_close(xn.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.decode(xn), x.float() / 255, atol=1e-6, rtol=0)
    assert norm.decode(xn * 10).max() <= 1 and norm.decode(xn * 10).min() >= 0

@pytest.mark.parametrize('xb,msg', [(images(4, c=1), r'\(4, 1, 32, 32\), expected images bs×3×h×w'),         # grey: not 3 channels out
                                    (images(4).flatten(1), r'\(4, 3072\), expected images'),                      # flat: not a 3×bs×3072 broadcast
                                    (images(4, c=4), r'\(4, 4, 32, 32\), expected images bs×3×h×w'),            # RGBA
                                    (torch.zeros(32, 32), r'\(32, 32\), expected images'),
                                    (torch.zeros(4, 32, 32, 3), r'\(4, 32, 32, 3\)')])                          # channels last in the shape
def test_normalize_checks_rank_and_channels(xb, msg):
    norm = Normalize([0.5] * 3, [0.25] * 3)
    with pytest.raises(ValueError, match=msg): norm(xb)
    with pytest.raises(ValueError, match=msg): norm.decode(xb.float())

def test_normalize_takes_one_image_and_other_channel_counts():
    norm = Normalize([0.5] * 3, [0.25] * 3)
    x = images(2)
    torch.testing.assert_close(norm(x[0]), norm(x)[0])
    assert Normalize([0.5] * 4, [0.25] * 4)(images(2, c=4)).shape == (2, 4, 32, 32)
    assert Normalize([0.5], [0.25])(images(2, c=1)).shape == (2, 1, 32, 32)

@pytest.mark.parametrize('mean,std,msg', [([0.5, 0.5], [0.2] * 3, 'one value per channel'), ([0.5], [0.], 'expected positive'),
                                          ([0.5], [float('nan')], 'expected positive'), (0.5, 0.2, 'one value per channel')])
def test_normalize_bad_input(mean, std, msg):
    with pytest.raises(ValueError, match=msg): Normalize(mean, std)


def test_batch_dl_one_pass_covers_every_item_once():
    ds = Dataset(images(50), torch.arange(50))
    dl = batch_dl(ds, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    ys = [yb for _, yb in dl]
    assert [len(y) for y in ys] == [16, 16, 16, 2] and len(dl) == 4
    assert sorted(torch.cat(ys).tolist()) == list(range(50))
    assert torch.equal(torch.cat([yb for _, yb in batch_dl(ds, 16)]), torch.arange(50))

@pytest.mark.parametrize('bs', [0, -1, 2.5, True, None])
def test_batch_dl_bad_bs(bs):
    with pytest.raises(ValueError, match=rf'bs={bs!r}, expected an integer >= 1'): batch_dl(Dataset(images(4), torch.arange(4)), bs)

@pytest.fixture
def fake_cifar(monkeypatch):
    "`cifar_data` on 200 random training and 100 test images instead of the real files."
    x, xv = images(200, seed=1), images(100, seed=2)
    y, yv = torch.arange(200) % 10, torch.arange(100) % 10
    monkeypatch.setattr(vision, '_load_cifar10', lambda: (x, y, xv, yv))
    return x, y, xv, yv

def test_cifar_data_subsets_and_seeds(fake_cifar):
    data = cifar_data(bs=32, n_train=64, n_valid=50, seed=3)
    assert (len(data.train_ds), len(data.valid_ds), data.c) == (64, 50, 10)
    assert data.train_dl.dataset.x.dtype == torch.uint8
    assert len(data.valid_dl) == 1  # validation batches of 2*bs
    again = cifar_data(bs=32, n_train=64, n_valid=50, seed=3)
    assert torch.equal(data.train_ds.y, again.train_ds.y) and torch.equal(next(iter(data.train_dl))[1], next(iter(again.train_dl))[1])
    assert not torch.equal(data.train_ds.y, cifar_data(bs=32, n_train=64, n_valid=50, seed=4).train_ds.y)
    assert len(cifar_data(bs=32).train_ds) == 200

def test_cifar_data_validation_set_in_order_every_pass(fake_cifar):
    "The test images come in the dataset's order, the same every pass (shuffling them changes nothing in the accuracy but breaks every pairing of predictions with images)."
    for kw in (dict(), dict(n_valid=60, seed=5)):
        data = cifar_data(bs=16, **kw)
        for _ in range(2):
            xs, ys = zip(*data.valid_dl)
            assert torch.equal(torch.cat(xs), data.valid_ds.x) and torch.equal(torch.cat(ys), data.valid_ds.y)
    assert torch.equal(cifar_data(bs=16).valid_ds.x, fake_cifar[2])  # all of them: in the files' order

@pytest.mark.parametrize('kw,msg', [(dict(n_train=0), 'n_train=0, expected an integer from 1 to 200'),
                                    (dict(n_train=201), 'n_train=201'), (dict(n_valid=2.5), 'n_valid=2.5'),
                                    (dict(bs=0), 'bs=0')])
def test_cifar_data_bad_input(fake_cifar, kw, msg):
    with pytest.raises(ValueError, match=msg): cifar_data(**kw)


class Seen(Callback):
    _order = 5
    def begin_fit(self): self.xs = {True: [], False: []}
    def after_pred(self): self.xs[self.in_train].append(self.xb.clone())

def tiny_learn(n=32):
    x, y = images(n), torch.arange(n) % 10
    data = DataBunch(batch_dl(Dataset(x, y), 16), batch_dl(Dataset(x, y), 16), c=10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    return Learner(model, SGDW(model.parameters(), lr=0.01, wd=1e-4), F.cross_entropy, data)

def test_augmentation_in_training_only():
    learn = tiny_learn()
    norm = Normalize([0.5] * 3, [0.25] * 3)
    run = Runner(cifar_cbs(norm, seed=0, device='cpu') + [Seen()])
    run.fit(1, learn)
    x = learn.data.train_ds.x
    g = torch.Generator().manual_seed(0)
    assert torch.equal(torch.cat(run.seen.xs[True]), torch.cat([norm(flip_pad_crop(x[:16], generator=g)), norm(flip_pad_crop(x[16:], generator=g))]))
    assert torch.equal(torch.cat(run.seen.xs[False]), norm(x))
    assert not torch.equal(torch.cat(run.seen.xs[True]), norm(x))

def test_cifar_cbs_order_and_no_aug():
    norm = Normalize([0.5] * 3, [0.25] * 3)
    cbs = cifar_cbs(norm)
    assert [type(cb) for cb in sorted(cbs, key=lambda cb: cb._order)] == [DeviceCallback, AugmentCallback, BatchTransformXCallback]
    assert [type(cb) for cb in cifar_cbs(norm, aug=False)] == [DeviceCallback, BatchTransformXCallback]
    with pytest.raises(TypeError, match='not callable'): AugmentCallback(3)


def test_sgdw_step_is_decoupled_decay_then_momentum_sgd():
    w0, g1, g2 = (torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(3))
    w = nn.Parameter(w0.clone())
    opt = SGDW([w], lr=0.1, momentum=0.9, wd=0.01)
    for g in (g1, g2): w.grad = g.clone(); opt.step()
    w1 = w0 * (1 - 1e-3) - 0.1 * g1
    torch.testing.assert_close(w.detach(), w1 * (1 - 1e-3) - 0.1 * (0.9 * g1 + g2), atol=1e-14, rtol=0)

def test_sgdw_wd_is_a_param_group_hyper_parameter():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = SGDW([{'params': [a]}, {'params': [b], 'wd': 0.}], lr=0.5, wd=0.1)
    assert [pg['wd'] for pg in opt.param_groups] == [0.1, 0.]
    c = nn.Parameter(torch.ones(3)); opt.add_param_group({'params': [c]})
    assert opt.param_groups[-1]['wd'] == 0.1
    for p in (a, b, c): p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((3,), 0.95)); torch.testing.assert_close(b.detach(), torch.ones(3))
    sd = opt.state_dict()
    opt3 = SGDW([{'params': [nn.Parameter(torch.ones(3))]}, {'params': [nn.Parameter(torch.ones(3))]}, {'params': [nn.Parameter(torch.ones(3))]}], lr=0.5)
    opt3.load_state_dict(sd)
    assert [pg['wd'] for pg in opt3.param_groups] == [0.1, 0., 0.1]

def test_sgdw_skips_parameters_without_gradient():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = SGDW([a, b], lr=0.5, wd=0.1)
    a.grad = torch.zeros(2); opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and not torch.equal(a.detach(), torch.ones(2))

def test_sgdw_scheduled_by_param_scheduler():
    learn = tiny_learn()
    run = Runner([BatchTransformXCallback(Normalize([0.5] * 3, [0.25] * 3)), ParamScheduler('wd', sched_lin(1e-2, 0.))])
    run.fit(2, learn)
    assert learn.opt.param_groups[0]['wd'] == pytest.approx(1e-2 / 4)  # the last of 4 batches: pos 3/4

@pytest.mark.parametrize('kw,err,msg', [(dict(wd=-0.1), ValueError, 'wd=-0.1'), (dict(wd=float('nan')), ValueError, 'wd=nan'),
                                        (dict(weight_decay=1e-4), TypeError, 'SGDW takes wd')])
def test_sgdw_bad_input(kw, err, msg):
    with pytest.raises(err, match=msg): SGDW([nn.Parameter(torch.ones(2))], lr=0.1, **kw)


def test_get_preds_and_tta():
    learn = tiny_learn()
    norm = Normalize([0.5] * 3, [0.25] * 3)
    cbs = cifar_cbs(norm, seed=0, device='cpu')
    model, dl = learn.model, learn.data.valid_dl
    p, y = get_preds(model, dl, cbs)
    torch.testing.assert_close(p, model(norm(learn.data.valid_ds.x)).softmax(-1))
    assert torch.equal(y, learn.data.valid_ds.y) and model.training
    pa, _ = get_preds(model, dl, cbs, aug=True)
    assert not torch.equal(pa, p)
    p0, pt, y2 = tta(model, dl, cifar_cbs(norm, seed=1, device='cpu'), n_aug=2)
    g = torch.Generator().manual_seed(1)
    x = learn.data.valid_ds.x
    def aug_pass(): return torch.cat([model(norm(flip_pad_crop(x[i:i+16], generator=g))).softmax(-1) for i in (0, 16)])
    with torch.no_grad(): expected = (p + aug_pass() + aug_pass()) / 3
    torch.testing.assert_close(pt, expected)
    assert torch.equal(p0, p) and torch.equal(y2, y)

@pytest.mark.parametrize('n_aug,k', [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_tta_counts_the_plain_prediction_ceil_n_aug_over_4_times(n_aug, k):
    "fastai 0.7's TTA: the plain prediction repeated ceil(n_aug/4) times, then the mean of all."
    learn = tiny_learn()
    norm = Normalize([0.5] * 3, [0.25] * 3)
    model, dl = learn.model, learn.data.valid_dl
    p, _ = get_preds(model, dl, cifar_cbs(norm, seed=2, device='cpu'))
    cbs = cifar_cbs(norm, seed=2, device='cpu')
    augs = [get_preds(model, dl, cbs, aug=True)[0] for _ in range(n_aug)]
    _, pt, _ = tta(model, dl, cifar_cbs(norm, seed=2, device='cpu'), n_aug=n_aug)
    torch.testing.assert_close(pt, (k * p + sum(augs)) / (k + n_aug))

@pytest.mark.parametrize('dl', [[], batch_dl(Dataset(images(0), torch.zeros(0, dtype=torch.long)), 8)])
def test_get_preds_and_tta_on_an_empty_loader(dl):
    learn = tiny_learn()
    norm = Normalize([0.5] * 3, [0.25] * 3)
    with pytest.raises(ValueError, match='the loader gave no batches'): get_preds(learn.model, dl, cifar_cbs(norm, device='cpu'))
    with pytest.raises(ValueError, match='the loader gave no batches'): tta(learn.model, dl, cifar_cbs(norm, device='cpu'))
    assert learn.model.training

def test_get_preds_restores_the_mode_when_the_model_raises():
    class Boom(nn.Module):
        def forward(self, x): raise RuntimeError('boom')
    m = Boom().train()
    with pytest.raises(RuntimeError, match='boom'): get_preds(m, [(torch.zeros(2, 3), torch.zeros(2))])
    assert m.training

def test_get_preds_puts_back_each_modules_mode():
    m = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    m[1].eval()                                   # frozen batch norm in a training model (lesson 8's BnFreeze)
    bn = m[1].running_mean.clone()
    p, _ = get_preds(m, [(torch.randn(4, 2, 3), torch.zeros(4))])
    assert [o.training for o in m.modules()] == [True, True, False, True, True]
    assert torch.equal(m[1].running_mean, bn)
    assert p.shape == (4, 3) and torch.allclose(p.sum(1), torch.ones(4))

def test_augment_callback_is_a_batch_transform_for_training_only():
    cb = AugmentCallback(lambda x: x + 1)
    assert isinstance(cb, BatchTransformXCallback) and cb._order == 1
    class Run: xb = torch.zeros(2)
    run = Run(); cb.set_runner(run)
    run.in_train = False; cb.begin_batch(); assert torch.equal(run.xb, torch.zeros(2))
    run.in_train = True; cb.begin_batch(); assert torch.equal(run.xb, torch.ones(2))
    assert torch.equal(cb.transform_batch(torch.zeros(2), 0)[0], torch.ones(2))
    with pytest.raises(TypeError, match="tfm='flip' is not callable"): AugmentCallback('flip')

def test_tta_bad_input():
    learn = tiny_learn()
    norm = Normalize([0.5] * 3, [0.25] * 3)
    with pytest.raises(ValueError, match='no AugmentCallback'): tta(learn.model, learn.data.valid_dl, cifar_cbs(norm, aug=False))
    with pytest.raises(ValueError, match='n_aug=0'): tta(learn.model, learn.data.valid_dl, cifar_cbs(norm), n_aug=0)


def test_confusion_matrix():
    pred, targ = torch.tensor([0, 2, 1, 1, 2]), torch.tensor([0, 1, 1, 2, 2])
    assert confusion_matrix(pred, targ, 3).tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 1]]
    assert confusion_matrix(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match='2 predictions for 3 targets'): confusion_matrix(pred[:2], targ[:3], 3)
    with pytest.raises(ValueError, match=r'outside 0\.\.1'): confusion_matrix(pred, targ, 2)


# --- the random numbers of the batch augmentations, and lesson 8's side-on augmentation (moved here from transfer)

def test_draw_draws_on_the_generators_device_and_hands_over_on_the_batchs():
    g = torch.Generator().manual_seed(3)
    u = draw(5, 2, g, torch.device('cpu'))
    assert u.shape == (5, 2) and (0 <= u).all() and (u < 1).all()
    assert torch.equal(u, torch.rand(5, 2, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(4); a = draw(3, 1)
    torch.manual_seed(4); assert torch.equal(a, draw(3, 1))  # no generator: the default one

def test_flip_pad_crop_offsets_reach_both_ends():
    "Offsets run from 0 to 2*pad, both ends included (fastai 0.7's never reached the right and bottom borders)."
    g = torch.Generator().manual_seed(0)
    u = draw(4000, 3, g)
    off = (u[:, :2] * 9).long()
    assert off.min() == 0 and off.max() == 8 and set(off.flatten().tolist()) == set(range(9))

def warp_args(monkeypatch, n=400, **kw):
    "The zoom, angle, flip and shift `side_on` hands `warp` for `n` images, and the lighting it hands `lighting`."
    got = {}
    def spy_warp(xb, zoom, deg, flip, shift): got.update(zoom=zoom, deg=deg, flip=flip, shift=shift); return xb.float()
    def spy_light(xb, b, c): got.update(b=b, c=c); return xb
    monkeypatch.setattr(vision, 'warp', spy_warp); monkeypatch.setattr(vision, 'lighting', spy_light)
    side_on(torch.zeros(n, 3, 8, 8), generator=torch.Generator().manual_seed(0), **kw)
    return got

def test_side_on_turns_both_ways_zooms_in_and_flips_half(monkeypatch):
    a = warp_args(monkeypatch)
    deg, zoom, flip, shift = a['deg'], a['zoom'], a['flip'], a['shift']
    assert deg.min() < -5 and deg.max() > 5 and deg.abs().max() <= 10          # both ways, up to 10 degrees
    assert 0.65 < (deg != 0).float().mean() < 0.85                               # three times in four
    assert zoom.min() >= 1 and zoom.max() <= 1.1 and (zoom > 1).any()             # zoom in only, up to max_zoom
    assert 0.65 < (zoom != 1).float().mean() < 0.85
    assert 0.4 < flip.float().mean() < 0.6 and shift.abs().max() <= 1 and shift.min() < -0.5 < 0.5 < shift.max()
    b, c = a['b'], a['c']
    assert b.abs().max() <= 0.05 and b.min() < 0 < b.max()                      # brightness up and down by up to 5%
    assert c.min() >= 1 / 1.05 - 1e-6 and c.max() <= 1.05 + 1e-6 and c.min() < 1 < c.max()

def test_side_on_p_and_ranges_are_the_arguments(monkeypatch):
    a = warp_args(monkeypatch, max_zoom=2., deg=30., light=0., p=1.)
    assert (a['deg'] != 0).all() and a['deg'].abs().max() > 20 and (a['zoom'] > 1).all() and a['zoom'].max() > 1.8
    assert (a['b'] == 0).all() and torch.allclose(a['c'], torch.ones(400))
    a = warp_args(monkeypatch, p=0.)
    assert (a['deg'] == 0).all() and (a['zoom'] == 1).all()

def test_pipeline_cbs_seeds_the_augmentation_on_the_pipelines_device():
    norm = Normalize([0.5] * 3, [0.25] * 3)
    cbs = pipeline_cbs(norm, side_on, seed=5, device='cpu', channels_last=True)
    assert [type(cb).__name__ for cb in cbs] == ['DeviceCallback', 'AugmentCallback', 'BatchTransformXCallback']
    assert cbs[0].fmt == torch.channels_last and cbs[1].tfm.keywords['generator'].device == cbs[0].device
    assert [type(cb).__name__ for cb in pipeline_cbs(norm)] == ['DeviceCallback', 'BatchTransformXCallback']
    x = images(4, h=16, w=16)
    a, b = (pipeline_cbs(norm, side_on, seed=5, device='cpu')[1].tfm(x) for _ in range(2))
    assert torch.equal(a, b)

# --- behaviour the mutation run found unpinned (issue 30)

def test_cifar_data_shuffles_training_each_epoch_and_defaults_to_batches_of_128(fake_cifar):
    data = cifar_data(n_train=200)
    assert data.train_dl.sampler.batch_size == 128 and data.valid_dl.sampler.batch_size == 256
    e1, e2 = (torch.cat([yb for _, yb in data.train_dl]) for _ in range(2))
    assert sorted(e1.tolist()) == sorted(fake_cifar[1].tolist()) and not torch.equal(e1, e2)  # every image, in a new order
    assert not torch.equal(e1, data.train_ds.y)

def test_cifar_subsets_depend_on_the_seed_only_not_on_the_global_generator(fake_cifar):
    torch.manual_seed(0); a = cifar_data(bs=16, n_train=50, n_valid=30, seed=7)
    torch.manual_seed(1); b = cifar_data(bs=16, n_train=50, n_valid=30, seed=7)
    assert torch.equal(a.valid_ds.x, b.valid_ds.x) and torch.equal(a.train_ds.x, b.train_ds.x)
    assert torch.equal(next(iter(a.train_dl))[1], next(iter(b.train_dl))[1])  # the shuffle too

def test_cifar_data_hands_loader_arguments_to_both_loaders(fake_cifar):
    data = cifar_data(bs=16, pin_memory=True)
    assert data.train_dl.pin_memory and data.valid_dl.pin_memory

def test_tta_defaults_to_four_augmented_passes_and_the_plain_one_once():
    learn = tiny_learn()
    norm = Normalize([0.5] * 3, [0.25] * 3)
    model, dl = learn.model, learn.data.valid_dl
    p, _ = get_preds(model, dl, cifar_cbs(norm, seed=2, device='cpu'))
    cbs = cifar_cbs(norm, seed=2, device='cpu')
    augs = [get_preds(model, dl, cbs, aug=True)[0] for _ in range(4)]
    torch.testing.assert_close(tta(model, dl, cifar_cbs(norm, seed=2, device='cpu'))[1], (p + sum(augs)) / 5)

def test_pad_reflect_takes_a_single_image_plane():
    im = images(1)[0, 0]
    assert torch.equal(pad_reflect(im, 2), symmetric_pad(im[None], 2)[0])

def test_get_preds_hands_back_cpu_tensors_from_a_gpu_pipeline():
    "Under the CUDA stand-in: the model runs on the device, the probabilities and targets come back on the CPU."
    import sys
    from conftest import STANDIN
    sys.path.insert(0, str(STANDIN))
    from cuda_standin import standin
    with standin():
        learn = tiny_learn()
        norm, model = Normalize([0.5] * 3, [0.25] * 3), learn.model.cuda()
        p, y = get_preds(model, learn.data.valid_dl, cifar_cbs(norm))
        assert p.device.type == y.device.type == 'cpu' and p.shape == (32, 10)
        p0, pt, y0 = tta(model, learn.data.valid_dl, cifar_cbs(norm, seed=1))
        assert {t.device.type for t in (p0, pt, y0)} == {'cpu'}
        cpu_model = tiny_learn().model  # on the CPU, fed a GPU pipeline: runs where it is
        assert get_preds(cpu_model, learn.data.valid_dl, cifar_cbs(norm))[0].device.type == 'cpu'
