import copy, math, gc
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import *
from course_lib.training import Dataset, get_dls, accuracy
from course_lib.callbacks import *
from course_lib.cuda import BatchTransformXCallback
from course_lib.cnn import *
from conftest import image_data, view


def test_general_relu():
    x = torch.linspace(-3, 8, 12)
    assert torch.equal(GeneralRelu()(x), F.relu(x))
    assert torch.allclose(GeneralRelu(leak=0.1)(x), F.leaky_relu(x, 0.1))
    assert GeneralRelu(sub=0.5, maxv=6.)(x).max() == 6. and GeneralRelu(sub=0.5)(x).min() == -0.5
    with pytest.raises(ValueError, match='leak=-1'): GeneralRelu(leak=-1)

def test_get_learn_run_kaiming_for_leak():
    learn, run = get_learn_run([16, 16], image_data(), 0.3, cbs=[view], leak=0.1)
    w = learn.model[1][0].weight
    assert abs(w.std().item() - math.sqrt(2 / (1 + 0.1**2) / w[0].numel())) < 0.02
    assert learn.opt.param_groups[0]['lr'] == 0.3 and any(isinstance(cb, BatchTransformXCallback) for cb in run.cbs)
    with pytest.raises(ValueError, match='nfs='): get_cnn_layers(image_data(), [8, 0])
