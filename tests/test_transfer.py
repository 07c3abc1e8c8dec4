"Lesson 8's data, head, freezing, augmentation and cached fine-tuning (course_lib.transfer): failure paths and exact behaviour."
from collections import OrderedDict
from pathlib import Path
import numpy as np, pytest, torch, torchvision
from torch import nn
import torch.nn.functional as F
import torchvision.transforms as T
from course_lib.core import *
from fastcore.test import test_close
from course_lib.data import untar_data
from course_lib.datasets import load_dogscats, open_image
from course_lib.training import Dataset, batch_dl
from course_lib.callbacks import *
from course_lib.cuda import DeviceCallback, BatchTransformXCallback
from course_lib.anneal import SGDW
import course_lib.transfer as tr
from course_lib.transfer import *
from course_lib.weights import Weights, effnet_body, models_dir
from course_lib.vision import Normalize, warp, lighting, side_on
from dogscats_archive import make_dogscats, counts
from lesson8_models import small_model, fake_data, pretrained_like, train, buffers



NORM = Normalize((0.5,) * 3, (0.25,) * 3)


# ---- the head (issue 22: replaced fc, one class; planted bug: max pooling)
def test_cam_model_takes_a_resnet_whose_fc_was_replaced():
    for fc in (nn.Identity(), nn.Sequential(nn.Linear(512, 100), nn.ReLU(), nn.Linear(100, 7))):
        m = torchvision.models.resnet18(weights=None); m.fc = fc
        model = cam_model(m)
        assert model[-4].in_channels == 512 and len(model) == 12
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 2)

def test_cam_model_refuses_fewer_than_two_classes():
    for c in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=f'c={c!r}, expected an integer >= 2'): cam_model(torchvision.models.resnet18(weights=None), c=c)
    assert cam_model(torchvision.models.resnet18(weights=None), c=3)(torch.randn(1, 3, 64, 64)).shape == (1, 3)

def test_cam_model_takes_sequential_bodies_and_refuses_others():
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2))
    assert cam_model(body)[-4].in_channels == 16
    with pytest.raises(TypeError, match='Linear is not a body cam_model takes'): cam_model(nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r'outputs of shape \(1, 10\)'): cam_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)))

@pytest.mark.parametrize('make', [lambda: small_model(), lambda: cam_model(effnet_body()[0])], ids=['resnet18', 'efficientnet-lite0'])
def test_cam_head_averages_the_grid(make):
    "Each class's score is the grid average of its channel of the head conv: the lesson's AdaptiveAvgPool2d, not a max."
    model = make().eval()
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    feats = []
    h = model[-4].register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad(): out = model(x)
    h.remove()
    assert feats[0].shape == (3, 2, 3, 3)
    torch.testing.assert_close(out, feats[0].mean((2, 3)).log_softmax(1), atol=1e-5, rtol=0)

def test_the_head_has_names_and_is_found_by_them():
    model = small_model()
    assert list(model._modules)[-4:] == list(HEAD) and head_at(model) == len(model) - 4 == 8
    assert model.head is model[-4] and isinstance(model.head, nn.Conv2d) and isinstance(model.log_softmax, nn.LogSoftmax)
    assert all(k.startswith(('head.',)) or k.split('.')[0].isdigit() for k in model.state_dict())

def changed_heads(model):
    "Models whose head is not the lesson's: a layer added after the head conv, a linear layer instead, the head conv renamed."
    ms = list(model._modules.items())
    yield nn.Sequential(OrderedDict(ms[:-1] + [('drop', nn.Dropout()), ms[-1]]))
    yield nn.Sequential(OrderedDict(ms[:-4] + [('pool', nn.AdaptiveAvgPool2d(1)), ('flatten', nn.Flatten()), ('head', nn.Linear(512, 2)),
                                               ('log_softmax', nn.LogSoftmax(1))]))
    yield nn.Sequential(*[m for _, m in ms])  # the same layers, by position only

def test_a_changed_head_is_an_error_not_a_wrong_layer_trained():
    "Issue 30: with the head found by position, a changed head trained the wrong layer with no error."
    for bad in changed_heads(small_model()):
        with pytest.raises(TypeError, match='does not end in the CAM head'): head_at(bad)
        with pytest.raises(TypeError, match='does not end in the CAM head'): fine_tune(bad, fake_data(sz=64, uint8=True), NORM, silent=True)

def test_resnet50_head_takes_2048_channels():
    model = cam_model(torchvision.models.resnet50(weights=None))
    assert model[-4].in_channels == 2048 and model[-4].out_channels == 2


# ---- freezing and batch norm
def test_frozen_body_keeps_every_buffer_with_bnfreeze():
    model = pretrained_like(small_model()); freeze_to(model, -4)
    before, params = buffers(model), {k: p.clone() for k, p in model.named_parameters()}
    train(model, [BnFreeze()])
    after = buffers(model)
    assert after.keys() == before.keys() and len(after) == 3 * 20  # running mean, var and batch count of 20 layers
    for k in before: assert torch.equal(after[k], before[k]), k
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, params[k])}
    assert changed == {'head.weight', 'head.bias'}  # only the head's convolution learnt

def test_without_bnfreeze_the_frozen_body_statistics_drift():
    model = pretrained_like(small_model()); freeze_to(model, -4)
    before = buffers(model)
    train(model, [])
    assert all(not torch.equal(v, before[k]) for k, v in model.named_buffers())

def test_bnfreeze_keeps_batch_norms_without_parameters_in_a_frozen_group():
    "fastai 0.7 froze every batch norm of a frozen group, `affine=False` included."
    torch.manual_seed(0)
    body = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, affine=False), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(8, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU()))
    model = pretrained_like(cam_model(body)); freeze_to(model, -4)
    assert frozen_bns(model) == [model[0][1], model[1][1]]
    before = buffers(model)
    train(model, [BnFreeze()])
    for k, v in model.named_buffers(): assert torch.equal(v, before[k]), k

def test_bn_freeze_keeps_every_batch_norm_of_an_unfrozen_model():
    model = pretrained_like(small_model()); unfreeze(model)
    assert frozen_bns(model) == []
    bn_freeze(model)
    before, params = buffers(model), {k: p.clone() for k, p in model.named_parameters()}
    train(model, [BnFreeze()], epochs=1)
    for k, v in model.named_buffers(): assert torch.equal(v, before[k]), k
    assert not torch.equal(model[0].weight, params['0.weight'])  # the body learns
    bn_freeze(model, False)
    assert frozen_bns(model) == []

def test_unfrozen_bn_layers_train_again():
    model = pretrained_like(small_model()); freeze_to(model, -4)
    train(model, [BnFreeze()], epochs=1)
    unfreeze(model)
    assert frozen_bns(model) == []
    before = buffers(model)
    train(model, [BnFreeze()], epochs=1)
    assert all(not torch.equal(v, before[k]) for k, v in model.named_buffers())

def test_freeze_to_counts_layer_groups_from_either_end():
    model = small_model()
    trainable = lambda: [any(p.requires_grad for p in g.parameters()) for g in model if list(g.parameters())]
    freeze_to(model, -4); assert trainable() == [False] * 6 + [True]
    assert [m.trainable for m in model] == [False] * 8 + [True] * 4
    freeze_to(model, 8); assert trainable() == [False] * 6 + [True]
    freeze_to(model, 5); assert trainable() == [False] * 3 + [True] * 4
    unfreeze(model); assert trainable() == [True] * 7
    freeze_to(model, 12); assert not any(trainable())
    for bad in (13, -13, 1.5, True, None):
        with pytest.raises(ValueError, match='expected an integer from -12 to 12'): freeze_to(model, bad)


# ---- the 2018 augmentation on the device
IMS = torch.randint(0, 256, (3, 3, 16, 24), generator=torch.Generator().manual_seed(0)).float()
ONE, ZERO, NO = torch.ones(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool)

def test_warp_identity_flip_and_zoom_on_non_square_images():
    torch.testing.assert_close(warp(IMS, ONE, ZERO, NO, torch.zeros(3, 2)), IMS, atol=1e-3, rtol=0)
    torch.testing.assert_close(warp(IMS, ONE, ZERO, ~NO, torch.zeros(3, 2)), IMS.flip(3), atol=1e-3, rtol=0)
    z = warp(IMS, 2 * ONE, ZERO, NO, torch.tensor([[-1., 1.]] * 3))  # top-right quarter
    torch.testing.assert_close(z[..., 1:-1, 1:-1], F.interpolate(IMS[..., :8, 12:], scale_factor=2, mode='bilinear')[..., 1:-1, 1:-1], atol=1e-3, rtol=0)

def test_warp_rotates_in_pixels_not_in_normalised_coordinates():
    sq = IMS[..., :16]
    torch.testing.assert_close(warp(sq, ONE, torch.full((3,), 90.), NO, torch.zeros(3, 2)), sq.rot90(1, (2, 3)), atol=1e-3, rtol=0)
    torch.testing.assert_close(warp(sq, ONE, torch.full((3,), -90.), NO, torch.zeros(3, 2)), sq.rot90(-1, (2, 3)), atol=1e-3, rtol=0)
    # a non-square image turned by 180 degrees is its double flip: a rotation in normalised coordinates would shear it
    torch.testing.assert_close(warp(IMS, ONE, torch.full((3,), 180.), NO, torch.zeros(3, 2)), IMS.flip(2, 3), atol=1e-3, rtol=0)

def test_lighting_is_fastai_0_7s():
    def fastai_lighting(im, b, c):  # fastai 0.7, transforms.py
        if b==0 and c==1: return im
        mu = np.average(im)
        return np.clip((im-mu)*c+mu+b,0.,1.).astype(np.float32)
    b, c = torch.tensor([0.05, -0.05, 0.3]), torch.tensor([1.05, 1/1.05, 2.])
    want = np.stack([fastai_lighting(im.numpy() / 255, bi.item(), ci.item()) for im, bi, ci in zip(IMS, b, c)])
    torch.testing.assert_close(lighting(IMS, b, c) / 255, torch.from_numpy(want), atol=1e-5, rtol=0)

def test_side_on_probabilities_reach_each_image():
    g = lambda: torch.Generator().manual_seed(3)
    xb = IMS[:, :, :, :16].repeat(8, 1, 1, 1)
    plain = side_on(xb, p=0., light=0., generator=g())  # only flips left
    for a, x in zip(plain, xb): assert torch.allclose(a, x, atol=1e-3) or torch.allclose(a, x.flip(2), atol=1e-3)
    flips = sum(not torch.allclose(a, x, atol=1e-3) for a, x in zip(plain, xb))
    assert 0 < flips < len(xb)
    all_on = side_on(xb, max_zoom=2., p=1., light=0., generator=g())
    assert all(not torch.allclose(a, x, atol=1) and not torch.allclose(a, x.flip(2), atol=1) for a, x in zip(all_on, xb))
    torch.testing.assert_close(side_on(xb, generator=g()), side_on(xb, generator=g()))  # seeded: repeatable
    assert side_on(xb.to(torch.uint8), generator=g()).dtype == torch.float32

def test_dogscats_cbs_augment_training_batches_only():
    from course_lib.cuda import prepare_batch
    from course_lib.vision import AugmentCallback
    cbs = dogscats_cbs(NORM, seed=0, device='cpu')
    assert [type(cb).__name__ for cb in cbs] == ['DeviceCallback', 'AugmentCallback', 'BatchTransformXCallback']
    xb = IMS[:, :, :, :16].to(torch.uint8)
    x, _ = prepare_batch(cbs, xb, torch.zeros(3), skip=AugmentCallback)
    torch.testing.assert_close(x, (xb.float() / 255 - 0.5) / 0.25)


# ---- fine-tuning and its cache
def test_fine_tune_trains_the_head_then_everything_with_batch_norm_kept(monkeypatch):
    model = pretrained_like(small_model())
    norm, data = NORM, fake_data(sz=64, uint8=True)
    before, params = buffers(model), {k: p.clone() for k, p in model.named_parameters()}
    from course_lib.anneal import fit_sgdr
    heads = []
    def spy(learn, lr, *a, **k):
        heads.append((lr, a, k.get('cycle_len'), sum(p.requires_grad for p in learn.model.parameters())))
        return fit_sgdr(learn, lr, *a, **k)
    monkeypatch.setattr(tr, 'fit_sgdr', spy)
    hist, lrs = fine_tune(model, data, norm, unfrozen=2, silent=True)
    assert [h['phase'] for h in hist] == ['head', 'head', 'all', 'all']
    assert [(lr, a, cl) for lr, a, cl, _ in heads] == [(1e-2, (1,), None), (1e-2, (1,), 1), ([1e-4, 1e-2], (1,), 2)]
    assert [n for *_, n in heads] == [2, 2, len(params)]
    assert len(lrs) == 2 and len(lrs[0]) == 2 * len(data.train_dl)  # the last phase: two groups, two epochs of batches
    for k, v in model.named_buffers(): assert torch.equal(v.cpu(), before[k]), k  # frozen, then bn_freeze: statistics kept
    assert all(not torch.equal(p.cpu(), params[k]) for k, p in model.named_parameters())  # then every weight learnt (on the fit's device)

def test_fine_tune_gives_the_body_lr_body_and_the_head_lr(monkeypatch):
    "Which rate each part gets: the head conv's parameters are the second group, at `lr`; the body's the first, at `lr_body`."
    model = small_model()
    seen = []
    orig = tr.fit_sgdr
    def spy(learn, lr, *a, **k):
        run = orig(learn, lr, *a, **k)
        seen.append([[id(p) for p in pg['params']] for pg in learn.opt.param_groups])
        return run
    monkeypatch.setattr(tr, 'fit_sgdr', spy)
    hist, (body_lrs, head_lrs) = fine_tune(model, fake_data(sz=64, uint8=True), NORM, lr=0.03, lr_body=3e-5, silent=True)
    body_ids, head_ids = seen[-1]
    assert head_ids == [id(p) for p in model.head.parameters()]
    assert set(body_ids) == {id(p) for n, p in model.named_parameters() if not n.startswith('head.')}
    assert body_lrs[0] == pytest.approx(3e-5) and head_lrs[0] == pytest.approx(0.03)
    assert all(b == pytest.approx(h / 1000) for b, h in zip(body_lrs, head_lrs))  # one cosine for both
    assert head_lrs[-1] < head_lrs[0] / 2  # an SGDR cycle, down towards 0

def test_fine_tune_freezes_the_body_for_the_head_phase(monkeypatch):
    model = small_model()
    trainable = []
    orig = tr.fit_sgdr
    def spy(learn, lr, *a, **k):
        trainable.append({n for n, p in learn.model.named_parameters() if p.requires_grad})
        return orig(learn, lr, *a, **k)
    monkeypatch.setattr(tr, 'fit_sgdr', spy)
    fine_tune(model, fake_data(sz=64, uint8=True), NORM, unfrozen=1, silent=True)
    assert trainable[0] == trainable[1] == {'head.weight', 'head.bias'} and trainable[2] == {n for n, _ in model.named_parameters()}

@pytest.fixture
def small_lesson(data_env, monkeypatch):
    "dogscats_model on 64-pixel random photos and a random resnet18 body; `calls` counts the trainings."
    calls = []
    def body(source='auto', arch='resnet34', path=None, cifar=None):
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None), NORM, Weights('imagenet', 'resnet18', 'test', 'ab' * 32)
    monkeypatch.setattr(tr, 'pretrained_body', body)
    monkeypatch.setattr(tr, 'dogscats_data', lambda sz, bs, n_train=None, seed=0: calls.append(sz) or fake_data(16, sz, bs, uint8=True))
    return calls

def test_dogscats_model_is_cached_under_every_setting_and_the_weights(small_lesson, monkeypatch):
    kw = dict(sz=64, bs=8, unfrozen=0, silent=True)
    m1, _, i1 = dogscats_model(**kw)
    m2, _, i2 = dogscats_model(**kw)
    assert (i1['trained'], i2['trained'], len(small_lesson)) == (True, False, 1)
    assert i1['history'] == i2['history'] and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    dogscats_model(**kw, lr=2e-2); assert len(small_lesson) == 2
    orig = tr.pretrained_body
    monkeypatch.setattr(tr, 'pretrained_body', lambda *a, **k: orig(*a, **k)[:2] + (Weights('imagenet', 'resnet18', 'test', 'cd' * 32),))
    _, _, i3 = dogscats_model(**kw); assert i3['trained'] and len(small_lesson) == 3  # other weights, another model
    names = sorted(p.name for p in models_dir().glob('dogscats-*.pth'))
    assert len(names) == 3 and all(n.startswith('dogscats-resnet18-64px-') for n in names)


# ---- bad input
def test_bad_input_is_named():
    with pytest.raises(ValueError, match='sz=16, expected an integer >= 32'): dogscats_data(16, 8)
    with pytest.raises(ValueError, match='bs=0, expected an integer >= 1'): dogscats_data(64, 0)
    with pytest.raises(TypeError, match='Sequential does not end in the CAM head'): head_at(nn.Sequential(nn.Conv2d(3, 2, 1)))


# ---- the data, on an archive of the full download's layout (issue 29: counts from what was loaded)
@pytest.fixture
def dogscats(data_env, tmp_path):
    "The archive of `make_dogscats` (train/valid plus sample/, test1/, models/, JPEG and PNG), extracted as a download would be."
    untar_data(make_dogscats(tmp_path/'archive'))
    return load_dogscats()

def test_dogscats_data_on_the_full_layout_counts_what_was_loaded(dogscats):
    "Lesson 8's checks, as it writes them, on photos that are not the mirror's."
    tds, vds = dogscats
    data = dogscats_data(64, 4)
    assert (len(data.train_ds), len(data.valid_ds)) == (len(tds), len(vds)) == counts() != (2000, 1000)
    assert data.classes == ['cats', 'dogs'] and data.c == 2
    assert data.valid_ds.y.bincount().tolist() == torch.tensor(vds.targets).bincount().tolist()
    xb, yb = next(iter(data.train_dl))
    assert (xb.shape, xb.dtype) == ((4, 3, 64, 64), torch.uint8)

def test_validation_photos_are_cropped_at_the_centre_and_training_photos_anywhere(dogscats):
    tds, vds = dogscats
    data = dogscats_data(64, 4, seed=1)
    centre = T.Compose([T.Resize(64), T.CenterCrop(64), T.PILToTensor()])
    assert torch.equal(data.valid_ds.x, torch.stack([centre(open_image(f)) for f, _ in vds.samples]))
    xs, ys = [], []
    for _ in range(8):
        for xb, yb in data.train_dl: xs.append(xb); ys.append(yb)
    x, y = torch.cat(xs), torch.cat(ys)
    resized = [T.Compose([T.Resize(64), T.PILToTensor()])(open_image(f)) for f, _ in tds.samples]
    def where(crop):  # (photo, offset) pairs the crop is a copy of
        return [(i, o) for i, r in enumerate(resized) for o in range(max(r.shape[1:]) - 64 + 1)
                if torch.equal(r[:, o:o + 64] if r.shape[1] > r.shape[2] else r[:, :, o:o + 64], crop)]
    found = [where(c) for c in x]
    assert all(len(f) >= 1 for f in found)  # every training batch holds crops of the resized photos
    assert all(y[k] == tds.targets[f[0][0]] for k, f in enumerate(found))  # with their own labels
    offsets = {i: {o for f in found for j, o in f if j == i} for i in range(len(resized))}
    long = [i for i, r in enumerate(resized) if max(r.shape[1:]) - 64 >= 20]
    assert long and all(len(offsets[i]) > 1 for i in long)  # over eight epochs, a long photo is cut at several places

def test_dogscats_data_takes_a_seeded_subset(dogscats):
    tds, _ = dogscats
    a, b, c = dogscats_data(64, 2, n_train=5, seed=0), dogscats_data(64, 2, n_train=5, seed=0), dogscats_data(64, 2, n_train=5, seed=1)
    assert len(a.train_ds) == 5 and len(a.valid_ds) == counts()[1]
    assert a.train_ds.cache.sha256 == b.train_ds.cache.sha256 != c.train_ds.cache.sha256
    with pytest.raises(ValueError, match=f'n_train={len(tds) + 1}, expected an integer from 1 to {len(tds)}'): dogscats_data(64, 2, len(tds) + 1)
