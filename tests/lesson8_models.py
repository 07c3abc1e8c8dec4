"Small lesson-8 models and data for the tests of transfer and weights: no download, a few seconds on a CPU."
import torch, torchvision
from torch import nn
import torch.nn.functional as F
from course_lib.training import Dataset, batch_dl
from course_lib.callbacks import DataBunch, Learner, Runner
from course_lib.cuda import DeviceCallback
from course_lib.anneal import SGDW
from course_lib.transfer import cam_model

def small_model(seed=0, arch='resnet18'):
    torch.manual_seed(seed)
    return cam_model(torchvision.models.get_model(arch, weights=None))

def fake_data(n=32, sz=32, bs=8, c=2, seed=0, uint8=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, sz, sz), dtype=torch.uint8, generator=g) if uint8 else torch.randn(n, 3, sz, sz, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return DataBunch(batch_dl(Dataset(x, y), bs, shuffle=True, generator=g), batch_dl(Dataset(x[:bs], y[:bs]), bs), c=c)

def pretrained_like(model):
    "Give the batch-norm layers running statistics that differ from a fresh layer's, as a pretrained body's do."
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g)); m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model

def train(model, cbs, epochs=2, data=None):
    Runner([DeviceCallback('cpu')] + cbs).fit(epochs, Learner(model, SGDW(model.parameters(), 0.1), F.nll_loss, data or fake_data()))

def buffers(model): return {k: v.clone() for k, v in model.named_buffers()}
