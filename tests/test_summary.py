import copy, math, gc
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import *
from course_lib.training import Dataset, get_dls, accuracy
from course_lib.callbacks import *
from course_lib.accel import MixedPrecision
from course_lib.summary import *
from conftest import image_learn, image_data, view, n_hooks


def test_model_summary_restores_state():
    learn = image_learn()
    learn.model.train()
    run = Runner([view(), MixedPrecision()])
    s = model_summary(run, learn)
    assert [r[2] for r in s.rows] == ['4x14x14', '8x7x7', '8x1x1', '8', '10']  # the model's children
    s = model_summary(run, learn, learn.data, find_all=True)
    assert [r[2] for r in s.rows][:2] == ['4x14x14', '4x14x14'] and s.rows[-1][2] == '10'  # every leaf: conv, then its ReLU
    assert learn.model.training and n_hooks(learn.model) == 0 and not torch.is_autocast_enabled('cpu')
    assert s.total == sum(p.numel() for p in learn.model.parameters()) and 'Total params' in repr(s)

def test_model_summary_tuple_outputs_and_chosen_modules():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = nn.LSTM(784, 5, batch_first=True), nn.Linear(5, 10)
        def forward(self, x): return self.out(self.rnn(x[:, None])[0][:, -1])
    model = Seq()
    s = model_summary(Runner(), image_learn(model=model))
    assert s.rows[0][:3] == ('rnn', 'LSTM', '1x5, 32x5, 32x5')  # output, then h and c (layers x bs x nh), first dim dropped
    s = model_summary(Runner(), image_learn(model=model), mods=[model.out])
    assert [r[0] for r in s.rows] == ['out']

def test_model_summary_data_is_a_databunch_or_a_loader():
    learn = image_learn()
    other = image_data(n=32, bs=4)  # validation batches of 8
    run = Runner([view()])
    for data in (other, other.valid_dl):
        rows = model_summary(run, learn, data).rows
        assert len(rows) == 5 and rows[0][2] == '4x14x14'
    single = image_learn(model=nn.Linear(784, 10))
    assert [r[1:3] for r in model_summary(Runner(), single).rows] == [('Linear', '10')]  # no children: the model itself

def test_model_summary_puts_back_every_module_mode():
    "A frozen layer kept in eval mode inside a training model stays in eval mode (issue 21: modes restored per module)."
    learn = image_learn()
    learn.model.train(); learn.model[0].eval()
    model_summary(Runner([view()]), learn)
    assert learn.model.training and not learn.model[0].training and all(m.training for m in learn.model[1:].modules())
