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

def test_get_learn_run_uses_plain_sgd_like_the_course():
    learn, run = get_learn_run([8, 16], image_data(), 0.4, conv_layer, cbs=[view])
    assert type(learn.opt) is optim.SGD and learn.opt.defaults['momentum'] == 0 and learn.opt.defaults['lr'] == 0.4
    assert conv_layer is conv2d
    learn, _ = get_learn_run([8, 16], image_data(), 0.04, opt_func=partial(optim.SGD, momentum=0.9))
    assert learn.opt.defaults['momentum'] == 0.9

def test_course_schedule_trains_with_plain_sgd_and_explodes_with_momentum():
    "The lesson's 1cycle peaking at 0.8 on a small net: momentum 0.9 makes each step up to 10x larger."
    from course_lib.anneal import ParamScheduler, Recorder, combine_scheds, sched_cos
    sched = combine_scheds([0.5, 0.5], [sched_cos(0.2, 0.8), sched_cos(0.8, 0.1)])
    def max_loss(**kw):
        torch.manual_seed(0)
        learn, run = get_learn_run([8, 16], image_data(n=512), 0.8, cbs=[view, partial(ParamScheduler, 'lr', sched), Recorder], leak=0.1, sub=0.4, maxv=6., **kw)
        run.fit(2, learn)
        return torch.tensor(run.recorder.losses).nan_to_num(1e30).max().item()
    assert max_loss() < 10 and max_loss(opt_func=partial(optim.SGD, momentum=0.9)) > 100
