"Lesson 8a's maps and pointing game (course_lib.cam): exact recipes, failure paths, and the planted bugs they must catch."
import copy
import numpy as np, pytest, torch, torchvision
from torch import nn
import torch.nn.functional as F
from course_lib.core import *
from course_lib.transfer import cam_model, freeze_to, frozen_bns
from course_lib.weights import effnet_body
from course_lib.cam import *


def small_model(seed=0, arch='resnet18'):
    torch.manual_seed(seed)
    return cam_model(torchvision.models.get_model(arch, weights=None))

def pretrained_like(model):
    "Give the batch-norm layers running statistics that differ from a fresh layer's, as a pretrained body's do."
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g)); m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


# ---- CAM
def seed_cam(model, x):
    "The lesson's numpy recipe, one image at a time, then the same bilinear upsampling."
    res = []
    for xi in x:
        with SaveFeatures(model.head) as sf, torch.no_grad(): py = np.exp(model(xi[None]).numpy()[0])
        feat = np.maximum(0, sf.features.numpy()[0])
        f2 = np.dot(np.rollaxis(feat, 0, 3), py)
        f2 -= f2.min(); f2 /= f2.max()
        res.append(torch.from_numpy(f2))
    return upsample(torch.stack(res).float(), x.shape[-2:])

@pytest.mark.parametrize('shape', [(3, 3, 64, 64), (2, 3, 96, 64), (1, 3, 224, 224)])
def test_cam_shape_normalisation_and_the_lesson_recipe(shape):
    model = pretrained_like(small_model()).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    maps = cam(model, x)
    assert maps.shape == (shape[0],) + shape[2:]
    torch.testing.assert_close(maps, seed_cam(model, x), atol=1e-5, rtol=0)
    with SaveFeatures(model.head) as sf: cam(model, x)
    small = torch.einsum('bchw,bc->bhw', sf.features.relu(), model(x).exp().detach())
    assert small.shape[1:] == (shape[2] // 32, shape[3] // 32)
    mm = minmax(small)
    torch.testing.assert_close(mm.amin((1, 2)), torch.zeros(len(x))); torch.testing.assert_close(mm.amax((1, 2)), torch.ones(len(x)))
    assert not model.head._forward_hooks
    for cls in (0, 1, torch.arange(shape[0]) % 2):
        want = sf.features.relu()[range(shape[0]), torch.as_tensor(cls).expand(shape[0])]
        torch.testing.assert_close(cam(model, x, cls), upsample(minmax(want), shape[2:]), atol=1e-5, rtol=0)

def test_cam_restores_the_model_mode_and_removes_its_hooks():
    model = small_model(); freeze_to(model, -4); model.train()
    for m in frozen_bns(model): m.eval()
    modes = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 64, 64)
    cam(model, x); grad_cam(model, x, body_output(model)); cam_maps(model, x, 0)
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())

def modes_seen(model, f):
    "The `training` flag of every module with one, as each forward of `f()` saw it."
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(mod.training)) for m in model.modules()
             if isinstance(m, (nn.BatchNorm2d, nn.Dropout))]
    try: f()
    finally:
        for h in hooks: h.remove()
    return seen

@pytest.mark.parametrize('maps', ['cam', 'grad_cam', 'cam_maps'])
def test_maps_are_made_in_eval_mode(maps):
    "In training mode batch norm would use the batch's statistics (and move its running ones): the maps of a model left training."
    model = pretrained_like(small_model()); model.train()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    f = {'cam': lambda m: cam(m, x), 'grad_cam': lambda m: grad_cam(m, x, body_output(m)), 'cam_maps': lambda m: cam_maps(m, x, 1)[0]['Grad-CAM']}[maps]
    before = {k: v.clone() for k, v in model.named_buffers()}
    seen = modes_seen(model, lambda: f(model))
    assert seen and not any(seen)
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    assert model.training
    ref = copy.deepcopy(model).eval()
    torch.testing.assert_close(f(model), f(ref), atol=1e-6, rtol=0)

def test_cam_preds_is_get_preds_with_the_lessons_cam():
    from course_lib.training import Dataset, batch_dl
    from course_lib.cuda import DeviceCallback, BatchTransformXCallback
    model = pretrained_like(small_model()).eval()
    x = torch.randint(0, 256, (10, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 1] * 5)
    norm = lambda t: t.float() / 127.5 - 1
    cbs = [DeviceCallback('cpu'), BatchTransformXCallback(norm)]
    p, yy, maps = cam_preds(model, batch_dl(Dataset(x, y), 4), cbs, (64, 96))
    assert torch.equal(yy, y) and maps.shape == (10, 64, 96) and p.shape == (10, 2)
    with torch.no_grad(): torch.testing.assert_close(p, model(norm(x)).exp(), atol=1e-5, rtol=0)
    torch.testing.assert_close(maps, cam(model, norm(x)), atol=1e-5, rtol=0)
    assert not model.head._forward_hooks

def test_minmax_constant_map_is_zero():
    f = torch.stack([torch.full((3, 3), 2.), torch.arange(9.).view(3, 3)])
    torch.testing.assert_close(minmax(f)[0], torch.zeros(3, 3))
    torch.testing.assert_close(minmax(f)[1], torch.arange(9.).view(3, 3) / 8)

def test_save_features_removable_and_context_manager():
    model = small_model()
    sf = SaveFeatures(model.head); model(torch.randn(1, 3, 64, 64))
    assert sf.features.shape == (1, 2, 2, 2) and not sf.features.requires_grad
    sf.remove(); assert not model.head._forward_hooks
    with pytest.raises(RuntimeError):
        with SaveFeatures(model.head): raise RuntimeError
    assert not model.head._forward_hooks


# ---- issue 22: 1×1 maps, layers without a grid, class counts
def test_cam_on_photos_too_small_for_a_map_says_so():
    "32-pixel photos give a 1×1 feature map: an error, not maps of zeros."
    model = small_model().eval()
    for f in (lambda x: cam(model, x), lambda x: grad_cam(model, x, body_output(model)), lambda x: cam_maps(model, x, 0)):
        with pytest.raises(ValueError, match=r'outputs of shape \(2, \d+, 1, 1\) for \(32, 32\) photos: a map needs a feature map'): f(torch.randn(2, 3, 32, 32))
    assert cam(model, torch.randn(2, 3, 32, 64)).shape == (2, 32, 64)  # 1×2: a map

def test_grad_cam_names_the_layers_that_make_a_map():
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    for layer, got in ((model[-3], r'outputs of shape \(2, 2, 1, 1\)'), (model[-2], r'outputs of shape \(2, 2\)'), (model[-1], 'no output before the class scores')):
        with pytest.raises(ValueError, match=f'layer {type(layer).__name__} gives {got} .*a layer before the pool: of the body, or the head conv'): grad_cam(model, x, layer)
    for layer in (model.head, body_output(model), model[4][0].conv1, model[0]): assert grad_cam(model, x, layer).shape == (2, 64, 64)

def test_class_labels_of_the_wrong_count_are_named():
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    for f in (lambda c: cam(model, x, c), lambda c: grad_cam(model, x, body_output(model), c), lambda c: cam_maps(model, x, c)):
        with pytest.raises(ValueError, match='cls has 3 classes for 2 photos, expected one class or one per photo'): f([0, 1, 1])
        with pytest.raises(ValueError, match='cls has 4 classes for 2 photos'): f(torch.zeros(2, 2, dtype=torch.long))
        with pytest.raises(ValueError, match=r'cls=\[0, 2\], expected classes from 0 to 1'): f([0, 2])
        assert f(torch.tensor([1, 0])) is not None and f(1) is not None


# ---- Grad-CAM
def test_grad_cam_matches_pytorch_grad_cam_on_the_scores():
    import pytorch_grad_cam as pgc  # a dev requirement: missing, the test fails
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    model = pretrained_like(small_model()).eval()
    x = torch.randn(3, 3, 128, 96, generator=torch.Generator().manual_seed(0))
    norm01 = lambda t: (t - t.amin((1, 2), keepdim=True)) / (t.amax((1, 2), keepdim=True) - t.amin((1, 2), keepdim=True))
    for layer in (body_output(model), model[-6], model[4][0].conv1, model.head):
        for c in (0, 1):
            ours = grad_cam(model, x, layer, cls=c)
            with pgc.GradCAM(model=pre_softmax(model), target_layers=[layer]) as g:  # the class score before the softmax, as in the paper
                theirs = torch.from_numpy(g(input_tensor=x, targets=[ClassifierOutputTarget(c)] * len(x)))
            assert ours.shape == theirs.shape == (3, 128, 96)
            torch.testing.assert_close(norm01(ours), norm01(theirs), atol=1e-4, rtol=0, equal_nan=True)  # a map of zeros: nan in both

def test_grad_cam_records_no_graph_below_its_layer():
    "The body below the layer runs without a graph (no gradient is needed there); the modes are as they were after."
    model = small_model().eval()
    seen = {}
    hooks = [model[k].register_forward_hook(lambda mod, inp, out, k=k: seen.setdefault(k, []).append(torch.is_grad_enabled())) for k in (0, 4, -4)]
    x = torch.randn(2, 3, 64, 64)
    grad_cam(model, x, body_output(model)); cam_maps(model, x, 0); grad_cam(model, x, model[4])
    for h in hooks: h.remove()
    assert seen == {0: [False] * 3, 4: [False, False, False], -4: [True] * 3} and torch.is_grad_enabled()
    with torch.no_grad(): grad_cam(model, x, body_output(model)); assert not torch.is_grad_enabled()

def test_grad_cam_at_the_head_conv_is_the_cam_of_the_class():
    model = pretrained_like(small_model()).eval()
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    for cls in (0, 1, torch.tensor([1, 0, 0, 1])):
        torch.testing.assert_close(grad_cam(model, x, model.head, cls), cam(model, x, cls), atol=1e-5, rtol=0)
    with torch.no_grad(): pred = model(x).argmax(1)
    torch.testing.assert_close(grad_cam(model, x, model.head), cam(model, x, pred), atol=1e-5, rtol=0)

def test_cam_maps_are_cam_and_grad_cam_from_one_pass():
    model = pretrained_like(small_model()).eval()
    x, y = torch.randn(4, 3, 96, 64, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 1, 0])
    calls = []
    h = model[0].register_forward_hook(lambda *a: calls.append(1))
    ms, lp = cam_maps(model, x, y)
    h.remove()
    assert len(calls) == 1 and set(ms) == {'CAM', 'Grad-CAM', 'CAM, predicted'}
    torch.testing.assert_close(ms['CAM'], cam(model, x, y), atol=1e-5, rtol=0)
    torch.testing.assert_close(ms['Grad-CAM'], grad_cam(model, x, body_output(model), y), atol=1e-5, rtol=0)
    torch.testing.assert_close(ms['CAM, predicted'], cam(model, x), atol=1e-5, rtol=0)
    with torch.no_grad(): torch.testing.assert_close(lp, model(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(cam_maps(model, x, y, model[-6])[0]['Grad-CAM'], grad_cam(model, x, model[-6], y), atol=1e-5, rtol=0)

def test_maps_of_an_effnet_model():
    "The method does not care about the body: EfficientNet-Lite0's 1280 channels and ReLU6, same maps."
    model = cam_model(effnet_body()[0]).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(4))
    with SaveFeatures(body_output(model)) as sf: maps = cam(model, x)
    assert sf.features.shape == (2, 1280, 3, 3) and maps.shape == (2, 96, 96)
    torch.testing.assert_close(grad_cam(model, x, model.head, 1), cam(model, x, 1), atol=1e-5, rtol=0)
    assert grad_cam(model, x, body_output(model)).shape == (2, 96, 96)


# ---- the pointing game
def test_pointing_hits_ties_are_broken_at_random():
    maps, boxes = torch.zeros(4000, 8, 8), torch.tensor([[0, 0, 4, 4]]).expand(4000, 4)
    test_between(pointing_hits(maps, boxes).float().mean(), 0.2, 0.3, 'hit rate of flat maps on a quarter box')

def test_composites_are_repeatable_and_paste_inside_the_canvas():
    ims = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, ia, ba = composites(ims, 6, 64, 32, seed=3)
    b, ib, bb = composites(ims, 6, 64, 32, seed=3)
    assert torch.equal(a, b) and torch.equal(ia, ib) and torch.equal(ba, bb)
    assert a.shape == (6, 3, 64, 64) and a.dtype == torch.uint8
    assert (ba[:, :2] >= 0).all() and (ba[:, 2:] <= 64).all() and ((ba[:, 2:] - ba[:, :2]) == 32).all()
    for im, i, (y0, x0, y1, x1) in zip(a, ia, ba.tolist()): assert torch.equal(im[:, y0:y1, x0:x1], ims[i])
    g, _, bg = composites(ims, 2, 64, 32, bg='grey')
    outside = torch.ones(64, 64, dtype=torch.bool); outside[bg[0, 0]:bg[0, 2], bg[0, 1]:bg[0, 3]] = False
    assert (g[0][:, outside] == 128).all()

def test_composites_and_the_game_on_one_photo():
    "One photo: grey composites work; a blurred background needs another photo, and says so."
    ims = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    c, idx, boxes = composites(ims, 3, 128, 64, bg='grey')
    assert idx.tolist() == [0, 0, 0] and c.shape == (3, 3, 128, 128)
    with pytest.raises(ValueError, match="bg='blur' pastes each photo on another, blurred: expected 2 photos or more, got 1"): composites(ims, 3, 128, 64)
    model = small_model().eval()
    r = pointing_game(model, ims, torch.tensor([1]), lambda x: x.float() / 255, n=3, bg='grey')
    assert r.hits['CAM'].shape == (3,) and r.chance == 0.25 and isinstance(r, Pointing)

class ColourModel(nn.Module):
    "A stand-in for the game: class 0 photos are dark, class 1 photos bright; its maps light the pixels of the class asked for."
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.zeros(1))

def colour_maps(model, x, cls):
    "Each map is high where the pixels have class `cls`'s colour; the log-probabilities say which colour the photo has."
    want = torch.where(cls == 1, 1., -1.)[:, None, None]
    px = x.mean(1)  # dark -1, grey 0, bright 1
    maps = -(px - want).abs()
    bright = (px > 0.5).flatten(1).any(1)
    return {'colour': maps}, F.one_hot(bright.long(), 2).float().log()

def test_pointing_game_pairs_every_composite_with_its_own_label():
    "More composites than one batch: each batch's maps get their own composites' classes, and their boxes."
    g = torch.Generator().manual_seed(0)
    ys = torch.randint(0, 2, (12,), generator=g)
    ims = torch.where(ys[:, None, None, None] == 1, 255, 0).expand(12, 3, 16, 16).to(torch.uint8)
    r = pointing_game(ColourModel(), ims, ys, lambda x: x.float() / 127.5 - 1, colour_maps, n=45, bg='grey', bs=8)
    assert r.hits['colour'].shape == (45,) and r.right.shape == (45,)
    assert r.rates == {'colour': 1} and r.accuracy == 1 and r.chance == 0.25
    _, idx, _ = composites(ims, 45, 32, 16, 'grey')
    assert (ys[idx] == 1).any() and (ys[idx] == 0).any()  # both classes in the game

def test_full_size_shapes_resnet34_at_224():
    "Full size's shapes (resnet34, 224 pixels, canvas 448) with random weights: a 7×7 map, 14×14 on a composite."
    model = small_model(arch='resnet34').eval()
    x = torch.randn(2, 3, 224, 224)
    with SaveFeatures(model.head) as sf: maps = cam(model, x)
    assert sf.features.shape == (2, 2, 7, 7) and maps.shape == (2, 224, 224) and model.head.in_channels == 512
    ims = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ms, lp = cam_maps(model, ims[:1].float() / 255, 0)
    r = pointing_game(model, ims, torch.tensor([0, 1, 0]), lambda x: x.float() / 255, n=2, bs=1)
    assert all(r.hits[k].shape == (2,) for k in ms) and r.chance == 0.25


# ---- crop and look again
def test_hot_box_is_a_square_around_the_hot_pixels():
    m = torch.zeros(3, 20, 20); m[0, 2, 17] = 1; m[1, 5:9, 3:15] = 1; m[2] = 1
    assert hot_box(m).tolist() == [[0, 14, 6, 20], [1, 3, 13, 15], [0, 0, 20, 20]]
    m = torch.zeros(1, 20, 30); m[0, 10:12, 10:12] = 0.6
    assert hot_box(m, min_size=0.5).tolist() == [[6, 6, 16, 16]]

def test_crop_photo_cuts_the_box_of_the_view_out_of_the_full_photo():
    photo = torch.arange(60 * 80).view(1, 60, 80).expand(3, 60, 80) % 256
    photo = photo.to(torch.uint8)
    # the view: shorter side 60 -> 30, centre square: columns 10..70 of the photo
    got = crop_photo(photo, torch.tensor([0, 0, 15, 15]), 30)
    want = F.interpolate(photo[None, :, 0:30, 10:40].float(), size=(30, 30), mode='bilinear', antialias=True)[0].round().to(torch.uint8)
    assert torch.equal(got, want)
    tall = photo.transpose(1, 2)  # 80×60: rows 10..70
    assert torch.equal(crop_photo(tall, torch.tensor([15, 15, 30, 30]), 30),
                       F.interpolate(tall[None, :, 40:70, 30:60].float(), size=(30, 30), mode='bilinear', antialias=True)[0].round().to(torch.uint8))


# ---- bad input
def test_bad_input_is_named():
    model = small_model()
    with pytest.raises(ValueError, match='expected a normalised float batch'): cam(model, torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match='expected a normalised float batch'): grad_cam(model, torch.zeros(3, 64, 64), body_output(model))
    with pytest.raises(TypeError, match='does not end in the CAM head'): cam(model[:-1], torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError, match='does not end in the CAM head'): cam_maps(model[:-1], torch.zeros(1, 3, 64, 64), 0)
    with pytest.raises(ValueError, match='is not a module of the model'): grad_cam(model, torch.zeros(1, 3, 64, 64), nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match='expected classes from 0 to 1'): grad_cam(model, torch.zeros(1, 3, 64, 64), body_output(model), cls=5)
    with pytest.raises(ValueError, match='cls=-1, expected classes from 0 to 1'): cam(model, torch.zeros(1, 3, 64, 64), cls=-1)
    ims = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bg='snow', expected 'blur' or 'grey'"): composites(ims, 1, 64, 32, bg='snow')
    with pytest.raises(ValueError, match='expected size <= canvas'): composites(ims, 1, 32, 64)
    with pytest.raises(ValueError, match='n=0, expected an integer >= 1'): composites(ims, 0, 64, 32)
