import copy, math, gc
from functools import partial
import pytest, torch
from torch import nn, optim
import torch.nn.functional as F
from course_lib.core import *
from course_lib.training import Dataset, get_dls, accuracy
from course_lib.callbacks import *
from course_lib.progress import *
from conftest import image_learn, view


def test_progress_syncs_only_at_display(host_reads, capsys):
    from course_lib.cuda import DeviceCallback
    from conftest import DEVICE
    run = Runner([DeviceCallback(DEVICE), view(), ProgressCallback(show=True, every=4), *host_reads.cbs])
    run.fit(1, image_learn())
    # 6 training batches: the loss is read at batch 4 and at the end of the pass (6); none in validation
    assert host_reads.in_batches == 2
    assert 'loss ' in capsys.readouterr().out

def test_progress_silent_in_ci(monkeypatch, capsys):
    monkeypatch.setenv('CI', 'true')
    run = Runner([view(), ProgressCallback()])
    run.fit(1, image_learn())
    assert capsys.readouterr().out == '' and run.progress.rows == []

def test_progress_table_rows(capsys):
    run = Runner([view(), AvgStatsCallback(accuracy, silent=True), ProgressCallback(show=True)])
    run.fit(2, image_learn())
    rows = run.progress.rows
    assert [r['epoch'] for r in rows] == [0, 1] and 'valid_accuracy' in rows[0] and 'time' in rows[0]
    run = Runner([view(), ProgressCallback(show=True)])
    run.fit(1, image_learn())
    assert list(run.progress.rows[0]) == ['epoch', 'smooth_loss', 'time']
    with pytest.raises(ValueError, match='every=0'): ProgressCallback(every=0)
