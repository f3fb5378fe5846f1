"""The pure parts of training (metrics, schedule, epoch item tables, Slurm task layout, GPU
pinning) and the model zoo: every architecture takes uint8 and loads local weights."""

from __future__ import annotations

import numpy as np
import pytest

from hpcpath.config import ModelConfig, TrainConfig
from hpcpath.errors import ConfigError
from hpcpath.train.data import epoch_items
from hpcpath.train.engine import pin_gpu_env
from hpcpath.train.launch import _tasks_per_node
from hpcpath.train.loop import LRSchedule
from hpcpath.train.metrics import epoch_metrics, max_f1


def test_max_f1_matches_brute_force():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    p = np.round(rng.random(300) * 0.6 + y * 0.3, 2)  # ties included
    best, thr = max_f1(y, p)
    brute = max((2 * ((p >= t) & y).sum() / ((p >= t).sum() + y.sum()), t) for t in np.unique(p))
    assert best == pytest.approx(brute[0]) and thr == pytest.approx(brute[1])


def test_epoch_metrics_per_class_and_mean():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    p = np.array([[0.9, 0.2], [0.1, 0.8], [0.7, 0.15], [0.2, 0.1]])
    m = epoch_metrics(y, p, ["a", "b"])
    assert m["val_auc_a"] == 1.0 and m["val_auc_b"] == 0.75 and m["val_auc"] == 0.875
    assert m["val_precision"] == 1.0 and m["val_recall"] == 0.75


def test_lr_schedule_scales_warms_up_and_reduces_on_plateau():
    cfg = TrainConfig(dataset="d", out="o", optimizer={"learning_rate": 0.01, "warmup_epochs": 1,
                                                       "plateau_patience": 2, "plateau_factor": 0.5})
    s = LRSchedule(cfg, size=4)
    s.warmup_steps = 10
    assert s.lr("finetune", 0) == pytest.approx(0.004) and s.lr("finetune", 9) == pytest.approx(0.04)
    for loss in (1.0, 0.9, 0.95, 0.95):  # two epochs without improvement: halve
        s.end_epoch(loss)
    assert s.lr("finetune", 100) == pytest.approx(0.02)
    restored = LRSchedule(cfg, size=4)
    restored.load(s.state())
    assert restored.lr("finetune", 100) == s.lr("finetune", 100)


def test_epoch_items_are_balanced_seeded_and_oversample_hard_negatives():
    labels = np.r_[np.ones(50), np.zeros(500)].astype(np.uint8)
    a, b = epoch_items(labels, 1.0, 0, 3), epoch_items(labels, 1.0, 0, 3)
    np.testing.assert_array_equal(a, b)
    assert (labels[a] == 1).sum() == 50 and (labels[a] == 0).sum() == 50
    assert not np.array_equal(a, epoch_items(labels, 1.0, 0, 4))  # a fresh draw each epoch
    hard = np.array([60, 61])
    c = epoch_items(labels, 1.0, 0, 3, hard, oversample=3)
    assert len(c) == 106 and (np.bincount(c, minlength=551)[hard] >= 3).all()


def test_slurm_task_layout_and_gpu_pinning(monkeypatch):
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2),2")
    assert _tasks_per_node(3) == [4, 4, 2]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert pin_gpu_env(1) == "3"
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pin_gpu_env(0) is None


@pytest.mark.slow
def test_every_architecture_takes_uint8_and_local_weights(tmp_path):
    from hpcpath.train.models import backbones, build_model, set_phase

    for arch, size, ctx in (("resnet50", 32, ()), ("inceptionv3", 75, ()), ("densenet121", 32, ()),
                            ("inceptionv3_multiscale", 75, ("4",))):
        m = build_model(ModelConfig(architecture=arch), size, 3, ctx)
        x = np.random.default_rng(0).integers(0, 255, (2, size, size, 3), dtype=np.uint8)
        y = np.asarray(m([x] * len(m.inputs) if len(m.inputs) > 1 else x))
        assert y.shape == (2, 3) and ((y >= 0) & (y <= 1)).all(), arch
        assert [i.name for i in m.inputs] == (["main", "context_4"] if ctx else ["main"])
        assert len(backbones(m)) == (2 if ctx else 1)
    # pretrained backbone weights from a local file, then fine-tune the top N layers only
    src = build_model(ModelConfig(), 32, 1)
    path = tmp_path / "bb.weights.h5"
    src.get_layer("backbone_main").save_weights(path)
    m = build_model(ModelConfig(weights=str(path), trainable_layers=2), 32, 1)
    for a, b in zip(src.get_layer("backbone_main").get_weights(), m.get_layer("backbone_main").get_weights()):
        np.testing.assert_array_equal(a, b)
    set_phase(m, "head")
    assert [v.path for v in m.trainable_variables] == ["logits/kernel", "logits/bias"]
    set_phase(m, "finetune", 2)
    n_top = len(m.trainable_variables)
    set_phase(m, "finetune", "all")
    assert 2 < n_top < len(m.trainable_variables)
    with pytest.raises(ConfigError, match="does not match the resnet50 backbone"):
        build_model(ModelConfig(architecture="resnet50", weights=str(path)), 32, 1)
    with pytest.raises(ConfigError, match="not found"):
        build_model(ModelConfig(weights=str(tmp_path / "missing.h5")), 32, 1)
    with pytest.raises(ConfigError, match="at least 75 px"):
        build_model(ModelConfig(architecture="inceptionv3"), 64, 1)


def test_set_null_reaches_the_config():
    """``hpcpath train -s balance=null`` keeps every negative (the key's documented null);
    flags left unset change nothing."""
    from hpcpath.cli.train import _overrides

    cfg = TrainConfig.load(None, _overrides(("balance=null",), dataset="d.json", out="o", engine=None))
    assert cfg.balance is None and cfg.engine == "single"
    assert TrainConfig.load(None, _overrides((), dataset="d.json", out="o")).balance == 1.0
