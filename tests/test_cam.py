import copy, json, os, socket, urllib.request, warnings
import numpy as np, pytest, torch, torchvision
from torch import nn
import torch.nn.functional as F
from course_lib.core import *
from course_lib.data import ChecksumError
from course_lib.training import Dataset
from course_lib.callbacks import *
from course_lib.cuda import DeviceCallback, BatchTransformXCallback
from course_lib.training import batch_dl
from course_lib.anneal import SGDW
import course_lib.cam as camlib
from course_lib.cam import *


def small_model(seed=0, arch='resnet18'):
    torch.manual_seed(seed)
    return cam_model(torchvision.models.get_model(arch, weights=None))

def fake_data(n=32, sz=32, bs=8, c=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, sz, sz, generator=g), torch.randint(0, c, (n,), generator=g)
    return DataBunch(batch_dl(Dataset(x, y), bs, shuffle=True, generator=g), batch_dl(Dataset(x[:bs], y[:bs]), bs), c=c)

def pretrained_like(model):
    "Give the batch-norm layers running statistics that differ from a fresh layer's, as a pretrained body's do."
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g)); m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model

def train(model, cbs, epochs=2, data=None):
    Runner([DeviceCallback('cpu')] + cbs).fit(epochs, Learner(model, SGDW(model.parameters(), 0.1), F.nll_loss, data or fake_data()))

def buffers(model): return {k: v.clone() for k, v in model.named_buffers()}


# ---- frozen batch norm
def test_frozen_body_keeps_every_buffer_with_bnfreeze():
    model = pretrained_like(small_model()); freeze_to(model, -4)
    before, params = buffers(model), {k: p.clone() for k, p in model.named_parameters()}
    train(model, [BnFreeze()])
    after = buffers(model)
    assert after.keys() == before.keys() and len(after) == 3 * 20  # running mean, var and batch count of 20 layers
    for k in before: assert torch.equal(after[k], before[k]), k
    changed = {k for k, p in model.named_parameters() if not torch.equal(p, params[k])}
    assert changed == {'8.weight', '8.bias'}  # only the head's convolution learnt

def test_without_bnfreeze_the_frozen_body_statistics_drift():
    model = pretrained_like(small_model()); freeze_to(model, -4)
    before = buffers(model)
    train(model, [])
    assert all(not torch.equal(v, before[k]) for k, v in model.named_buffers())

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
    freeze_to(model, 8); assert trainable() == [False] * 6 + [True]
    freeze_to(model, 5); assert trainable() == [False] * 3 + [True] * 4
    unfreeze(model); assert trainable() == [True] * 7
    freeze_to(model, 12); assert not any(trainable())
    for bad in (13, -13, 1.5, True, None):
        with pytest.raises(ValueError, match='expected an integer from -12 to 12'): freeze_to(model, bad)


# ---- CAM
def seed_cam(model, x):
    "The lesson's numpy recipe, one image at a time, then the same bilinear upsampling."
    res = []
    for xi in x:
        with SaveFeatures(model[-4]) as sf, torch.no_grad(): py = np.exp(model(xi[None]).numpy()[0])
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
    assert maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps, seed_cam(model, x), atol=1e-5, rtol=0)
    with SaveFeatures(model[-4]) as sf: cam(model, x)
    small = torch.einsum('bchw,bc->bhw', sf.features.relu(), model(x).exp().detach())
    assert small.shape[1:] == (shape[2] // 32, shape[3] // 32)
    mm = minmax(small)
    torch.testing.assert_close(mm.amin((1, 2)), torch.zeros(len(x))); torch.testing.assert_close(mm.amax((1, 2)), torch.ones(len(x)))
    assert not model[-4]._forward_hooks
    for cls in (0, 1, torch.arange(shape[0]) % 2):
        want = sf.features.relu()[range(shape[0]), torch.as_tensor(cls).expand(shape[0])]
        torch.testing.assert_close(cam(model, x, cls), upsample(minmax(want), shape[2:]), atol=1e-5, rtol=0)

def test_cam_restores_the_model_mode_and_removes_its_hook():
    model = small_model(); freeze_to(model, -4); model.train()
    for m in frozen_bns(model): m.eval()
    modes = [m.training for m in model.modules()]
    cam(model, torch.randn(2, 3, 64, 64)); grad_cam(model, torch.randn(2, 3, 64, 64), model[-5])
    assert [m.training for m in model.modules()] == modes
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())

def test_minmax_constant_map_is_zero():
    f = torch.stack([torch.full((3, 3), 2.), torch.arange(9.).view(3, 3)])
    torch.testing.assert_close(minmax(f)[0], torch.zeros(3, 3))
    torch.testing.assert_close(minmax(f)[1], torch.arange(9.).view(3, 3) / 8)

def test_save_features_removable_and_context_manager():
    model = small_model()
    sf = SaveFeatures(model[-4]); model(torch.randn(1, 3, 64, 64))
    assert sf.features.shape == (1, 2, 2, 2) and not sf.features.requires_grad
    sf.remove(); assert not model[-4]._forward_hooks
    with pytest.raises(RuntimeError):
        with SaveFeatures(model[-4]): raise RuntimeError
    assert not model[-4]._forward_hooks


# ---- Grad-CAM against the grad-cam package
def test_grad_cam_matches_pytorch_grad_cam():
    import pytorch_grad_cam as pgc  # a dev requirement: missing, the test fails
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    model = pretrained_like(small_model()).eval()
    x = torch.randn(3, 3, 128, 96, generator=torch.Generator().manual_seed(0))
    norm01 = lambda t: (t - t.amin((1, 2), keepdim=True)) / (t.amax((1, 2), keepdim=True) - t.amin((1, 2), keepdim=True))
    for layer in (model[-5], model[-6], model[4][0].conv1, model[-4]):
        for c in (0, 1):
            ours = grad_cam(model, x, layer, cls=c)
            with pgc.GradCAM(model=model, target_layers=[layer]) as g:
                theirs = torch.from_numpy(g(input_tensor=x, targets=[ClassifierOutputTarget(c)] * len(x)))
            assert ours.shape == theirs.shape == (3, 128, 96)
            torch.testing.assert_close(norm01(ours), norm01(theirs), atol=1e-4, rtol=0)

def test_grad_cam_at_the_head_conv_is_the_channel_difference():
    model = pretrained_like(small_model()).eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with SaveFeatures(model[-4]) as sf, torch.no_grad(): pred = model(x).argmax(1)
    f = sf.features
    diff = (f[range(4), pred] - f[range(4), 1 - pred]).relu()
    torch.testing.assert_close(grad_cam(model, x, model[-4]), upsample(minmax(diff), (64, 64)), atol=1e-5, rtol=0)


# ---- the pretrained body: offline, no network
@pytest.fixture
def no_network(monkeypatch):
    "Every socket connection, URL opening and torch hub download raises; `attempts` counts them."
    attempts = []
    def refuse(*a, **k):
        attempts.append(a)
        raise OSError('network is unreachable (test)')
    for obj, name in ((socket.socket, 'connect'), (socket.socket, 'connect_ex'), (socket, 'create_connection'),
                      (urllib.request, 'urlopen'), (torch.hub, 'download_url_to_file'), (torch.hub, 'load_state_dict_from_url')):
        monkeypatch.setattr(obj, name, refuse)
    return attempts

@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path/'torch'))
    return tmp_path/'torch'

def fake_cifar_data(bs=128, n_train=None, n_valid=None, seed=0, **kwargs):
    "CIFAR-10's shapes and types, 64 random images unless `n_train` says otherwise."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 256, (n_train or 64, 3, 32, 32), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n_train or 64,), generator=g)
    return DataBunch(batch_dl(Dataset(x, y), bs, shuffle=True, generator=g), batch_dl(Dataset(x[:16], y[:16]), 16), c=10)

def test_offline_makes_no_network_call(data_env, torch_home, no_network, monkeypatch, capsys):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    monkeypatch.setattr(camlib, 'cifar_data', fake_cifar_data)
    sd, why = imagenet_state('resnet34')
    assert sd is None and 'COURSE_OFFLINE=1' in why
    model, norm, source = pretrained_resnet('resnet18', epochs=1, n_train=32, bs=16)
    out = capsys.readouterr().out
    assert out.count('No ImageNet weights for resnet18') == 1 and 'CIFAR-10 instead' in out
    assert source.startswith('CIFAR-10 pretraining') and isinstance(model, torchvision.models.ResNet)
    assert no_network == []

def test_offline_path_of_the_notebook_makes_no_network_call(data_env, torch_home, no_network, monkeypatch):
    "The real weights API on the offline path: the cache is empty and nothing is downloaded, for every architecture."
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    for arch in RESNETS:
        sd, why = imagenet_state(arch)
        assert sd is None and why.startswith('not in the torch cache') and arch in why
    assert no_network == [] and not torch_home.exists()

def test_full_size_path_resnet34_at_224(data_env, torch_home, no_network, monkeypatch, capsys):
    "Full size's arguments (resnet34, 224 pixels, batches of 64, canvas 448) on a few random images, 2 epochs of pretraining instead of 30: the code path of a full run."
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    monkeypatch.setattr(camlib, 'cifar_data', lambda bs=128, n_train=None, n_valid=None, seed=0: fake_cifar_data(bs, 16, n_valid, seed))
    body, norm, source = pretrained_resnet('resnet34', epochs=2)
    assert 'No ImageNet weights for resnet34' in capsys.readouterr().out and source.startswith('CIFAR-10 pretraining (2 epochs')
    model = cam_model(body); freeze_to(model, -4)
    assert model[-4].in_channels == 512 and len(frozen_bns(model)) == 36
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, generator=g), torch.tensor([0, 1, 0, 1])
    data = DataBunch(batch_dl(Dataset(x, y), 64), batch_dl(Dataset(x, y), 64), c=2)
    before = buffers(model)
    Runner([DeviceCallback('cpu', channels_last=True), BatchTransformXCallback(norm), BnFreeze()]).fit(1, Learner(model, SGDW(model.parameters(), 1e-2), F.nll_loss, data))
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    with SaveFeatures(model[-4]) as sf: maps = cam(model, norm(x[:2]))
    assert sf.features.shape == (2, 2, 7, 7) and maps.shape == (2, 224, 224)
    assert grad_cam(model, norm(x[:2]), model[-5]).shape == (2, 224, 224)
    r = pointing_game(model, x, y, norm, {'CAM': cam}, n=1)
    assert r['chance'] == 0.25 and 0 <= r['CAM'] <= 1
    assert no_network == []

def test_online_without_a_network_tries_then_falls_back(data_env, torch_home, no_network):
    sd, why = imagenet_state('resnet18')
    assert sd is None and 'download failed' in why and len(no_network) >= 1

def test_weights_from_a_path_and_a_bad_cached_file(tmp_path, torch_home, no_network, monkeypatch):
    monkeypatch.setenv('COURSE_OFFLINE', '1')
    m = torchvision.models.resnet18(weights=None)
    torch.save(m.state_dict(), tmp_path/'mine.pth')
    sd, where = imagenet_state('resnet18', path=tmp_path/'mine.pth')
    assert where == str(tmp_path/'mine.pth') and torch.equal(sd['fc.weight'], m.fc.weight)
    p = weights_path('resnet18'); p.parent.mkdir(parents=True)
    assert p.parent == torch_home/'hub'/'checkpoints' and p.name == 'resnet18-f37072fd.pth'
    torch.save(m.state_dict(), p)  # right name, wrong contents: its digest does not start with f37072fd
    with pytest.raises(ChecksumError, match='does not start with f37072fd'): imagenet_state('resnet18')
    with pytest.raises(FileNotFoundError, match='does not exist'): imagenet_state('resnet18', path=tmp_path/'none.pth')
    assert no_network == []

def test_cifar_pretraining_is_cached_checked_and_redone_when_corrupt(data_env, monkeypatch):
    monkeypatch.setattr(camlib, 'cifar_data', fake_cifar_data)
    kw = dict(epochs=1, n_train=32, bs=16, silent=True)
    m1, info = cifar_resnet('resnet18', **kw)
    path = data_env[0]/'models'/'resnet18-cifar10-32px-32x1-seed0.pth'
    meta = json.loads(path.with_suffix('.json').read_text())
    assert meta['sha256'] == info['sha256'] == camlib.sha256sum(path) and meta['cfg']['epochs'] == 1 and 0 <= meta['valid_acc'] <= 1
    umask = os.umask(0); os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600: others sharing the data dir can read it
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(f'.{path.name}.') and not p.name.endswith('.lock')]  # no temporaries left
    with monkeypatch.context() as mp:
        mp.setattr(Runner, 'fit', lambda *a, **k: pytest.fail('trained again instead of reading the cache'))
        m2, _ = cifar_resnet('resnet18', **kw)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    path.write_bytes(path.read_bytes()[:-10] + b'0123456789')
    with pytest.warns(UserWarning, match='sha256 does not match'): _, info3 = cifar_resnet('resnet18', **kw)
    assert json.loads(path.with_suffix('.json').read_text())['sha256'] == info3['sha256'] == camlib.sha256sum(path)


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
    g, _, bg = composites(ims, 2, 64, 32, bg='grey')
    outside = torch.ones(64, 64, dtype=torch.bool); outside[bg[0, 0]:bg[0, 2], bg[0, 1]:bg[0, 3]] = False
    assert (g[0][:, outside] == 128).all()


# ---- bad input
def test_bad_input_is_named():
    model = small_model()
    with pytest.raises(ValueError, match='expected a normalised float batch'): cam(model, torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match='expected a normalised float batch'): grad_cam(model, torch.zeros(3, 64, 64), model[-5])
    with pytest.raises(TypeError, match='does not end in the CAM head'): cam(model[:-1], torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match='is not a module of the model'): grad_cam(model, torch.zeros(1, 3, 64, 64), nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match='expected classes from 0 to 1'): grad_cam(model, torch.zeros(1, 3, 64, 64), model[-5], cls=5)
    with pytest.raises(ValueError, match=r'cls=\[-1\], expected classes from 0 to 1'): cam(model, torch.zeros(1, 3, 64, 64), cls=-1)
    with pytest.raises(TypeError, match='is not a torchvision ResNet'): cam_model(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(ValueError, match="arch='vgg16', expected a torchvision ResNet"): resnet_weights('vgg16')
    with pytest.raises(ValueError, match="arch='resnet9', expected a torchvision ResNet"): cifar_resnet('resnet9', 1)
    with pytest.raises(ValueError, match='epochs=0, expected an integer >= 1'): cifar_resnet('resnet18', 0)
    with pytest.raises(ValueError, match='res=16, expected an image size of at least 32'): cifar_resnet('resnet18', 1, res=16)
    with pytest.raises(ValueError, match='sz=16, expected an image size of at least 32'): dogscats_data(16, 8)
    ims = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bg='snow', expected 'blur' or 'grey'"): composites(ims, 1, 64, 32, bg='snow')
    with pytest.raises(ValueError, match='expected 0 < size <= canvas'): composites(ims, 1, 32, 64)

def test_resnet50_head_takes_2048_channels():
    model = cam_model(torchvision.models.resnet50(weights=None))
    assert model[-4].in_channels == 2048 and model[-4].out_channels == 2
    assert cam(model, torch.randn(1, 3, 64, 64)).shape == (1, 64, 64)
