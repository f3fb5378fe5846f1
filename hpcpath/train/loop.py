"""The training loop, written once for every engine.

One train step and one eval step (:func:`make_steps`), the shape ../shared/GUIDE.md section 2
says both Horovod and tf.distribute need under Keras 3: a plain ``tf.GradientTape``, the
local mean loss divided by ``engine.loss_replicas``, ``engine.reduce_gradients`` (Horovod's
grouped allreduce), ``optimizer.apply``; the step runs through ``engine.run``
(``strategy.run`` for tf.distribute).  Around it, per epoch: this rank's shard of the
epoch's items, the learning rate (ranks x rate, warmup, reduce-on-plateau), validation
predictions gathered from every rank into exact metrics, hard-negative mining, a checkpoint
and the logs (rank 0).
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hpcpath.errors import ClusterError, ConfigError, HpcpathError
from hpcpath.train.checkpoint import latest_checkpoint, read_state, restore_checkpoint, save_checkpoint
from hpcpath.train.data import TrainData, epoch_items, open_train_data, rank_batches, subset, tf_batches
from hpcpath.train.engine import Engine, make_engine
from hpcpath.train.logs import AuditLog, RunLog, rank_sync, ranks_record, weights_checksum
from hpcpath.train.metrics import epoch_metrics
from hpcpath.train.preempt import StopSignal

__all__ = ["train", "TrainResult", "make_steps", "preflight", "LRSchedule"]

STOP_CHECK_STEPS = 10  # ranks agree on a stop signal every this many steps (and at epoch ends)


@dataclass
class TrainResult:
    out: Path
    model_dir: Path | None
    history: list[dict]
    global_step: int
    metrics: dict = field(default_factory=dict)
    resumed_from: int | None = None
    stopped: bool = False  # stopped on SIGUSR1/SIGTERM with a checkpoint; --resume goes on
    device: str = "CPU"


# ------------------------------------------------------------------ the one step shape
def make_steps(model, optimizer, engine: Engine, mixed: bool = False, xla: bool = False):
    """``(train_step, eval_step)`` as tf.functions.  ``train_step(x, y)`` returns this
    rank's mean loss; ``eval_step(x, y)`` returns per-example losses and probabilities.
    ``xla``: the forward and backward pass (and evaluation) are compiled with XLA; the
    gradient allreduce and the optimizer update stay outside (Horovod's and tf.distribute's
    collectives are not XLA ops)."""
    import tensorflow as tf

    def per_example_loss(y, p):
        p = tf.clip_by_value(tf.cast(p, tf.float32), 1e-7, 1 - 1e-7)
        bce = -(y * tf.math.log(p) + (1 - y) * tf.math.log(1 - p))
        return tf.reduce_mean(bce, axis=-1)

    def gradients(x, y):
        with tf.GradientTape() as tape:
            p = model(x, training=True)
            mean = tf.reduce_mean(per_example_loss(y, p))
            loss = mean / engine.loss_replicas
            if model.losses:
                loss += tf.add_n(model.losses) / engine.loss_replicas
            scaled = optimizer.scale_loss(loss) if mixed else loss
        return mean, tape.gradient(scaled, model.trainable_variables)

    if xla:
        gradients = tf.function(gradients, jit_compile=True, reduce_retracing=True)

    def step(x, y):
        mean, grads = gradients(x, y)
        grads = engine.reduce_gradients(grads)
        optimizer.apply(grads, model.trainable_variables)
        return mean

    def evaluate(x, y):
        p = model(x, training=False)
        return per_example_loss(y, p), tf.cast(p, tf.float32)

    if xla:
        evaluate = tf.function(evaluate, jit_compile=True, reduce_retracing=True)

    train_step = tf.function(lambda x, y: engine.run(step, x, y), reduce_retracing=True)
    eval_step = tf.function(lambda x, y: engine.run(evaluate, x, y), reduce_retracing=True)
    return train_step, eval_step


def make_optimizer(cfg, lr: float, mixed: bool):
    import keras

    o = cfg.optimizer
    wd = o.weight_decay or None
    if o.name == "adam":
        opt = keras.optimizers.Adam(learning_rate=lr, weight_decay=wd)
    else:
        opt = keras.optimizers.SGD(learning_rate=lr, momentum=o.momentum, nesterov=o.nesterov,
                                   weight_decay=wd)
    return keras.optimizers.LossScaleOptimizer(opt) if mixed else opt


def _set_lr(optimizer, lr: float) -> None:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    inner.learning_rate.assign(lr)


# ------------------------------------------------------------------ schedule
class LRSchedule:
    """``rate x ranks`` (Goyal et al.), linear warmup over the first ``warmup_epochs``, then
    multiplied by ``plateau_factor`` after ``plateau_patience`` epochs without a better
    validation loss; never below ``min_learning_rate``.  Its state is checkpointed."""

    def __init__(self, cfg, size: int) -> None:
        o = cfg.optimizer
        self.scale = size if o.scale_by_ranks else 1
        self.cfg = cfg
        self.factor, self.best, self.wait, self.warmup_steps = 1.0, float("inf"), 0, 0

    def base(self, phase: str) -> float:
        o = self.cfg.optimizer
        finetune_lr = phase == "finetune" and self.cfg.fine_tune_learning_rate
        lr = self.cfg.fine_tune_learning_rate if finetune_lr else o.learning_rate
        return lr * self.scale

    def lr(self, phase: str, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return max(self.cfg.optimizer.min_learning_rate, self.base(phase) * self.factor * warm)

    def end_epoch(self, monitored: float) -> None:
        if not np.isfinite(monitored):
            return
        if monitored < self.best - 1e-4:
            self.best, self.wait = monitored, 0
            return
        self.wait += 1
        if self.wait >= self.cfg.optimizer.plateau_patience:
            self.factor *= self.cfg.optimizer.plateau_factor
            self.wait = 0

    def state(self) -> dict:
        return {"factor": self.factor, "best": self.best if np.isfinite(self.best) else None,
                "wait": self.wait, "warmup_steps": self.warmup_steps}

    def load(self, s: dict) -> None:
        self.factor, self.wait, self.warmup_steps = s["factor"], s["wait"], s["warmup_steps"]
        self.best = float("inf") if s["best"] is None else s["best"]


# ------------------------------------------------------------------ checks before any TF
def preflight(cfg) -> None:
    """Problems a user can fix, found before TensorFlow is imported: one-line errors."""
    if not Path(cfg.dataset).is_file():
        raise ConfigError(f"dataset: manifest not found: {cfg.dataset}")
    if cfg.model.weights and not Path(cfg.model.weights).is_file():
        raise ConfigError(f"model.weights: file not found: {cfg.model.weights} (weights are "
                          "never downloaded; give a local file)")
    if cfg.hard_negatives and not Path(cfg.hard_negatives).is_file():
        raise ConfigError(f"hard_negatives: file not found: {cfg.hard_negatives}")


# ------------------------------------------------------------------ the loop
def train(cfg, *, resume: bool = False, engine: Engine | None = None) -> TrainResult:
    """Train ``cfg`` (a :class:`hpcpath.config.TrainConfig`) under its engine; every rank
    calls this.  Returns the history on every rank; files are written by rank 0.  A rank
    whose peers are gone (a node failed, a rank was killed) raises a one-line ClusterError."""
    try:
        return _train(cfg, resume=resume, engine=engine)
    except Exception as exc:
        why = _lost_peers(exc)
        if why is None:
            raise
        raise ClusterError(why) from None


def _lost_peers(exc: BaseException) -> str | None:
    """The one line for a collective that failed because other ranks are gone, else None."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(exc, tf.errors.OpError):
        return None
    text = str(exc.message if hasattr(exc, "message") else exc)
    peer_gone = "Horovod has been shut down" in text or isinstance(
        exc, (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.DeadlineExceededError,
              tf.errors.AbortedError))
    if not peer_gone:
        return None
    first = " ".join(text.split())[:160]
    return (f"lost the other ranks mid-step (a node or rank failed?): {type(exc).__name__}: {first}; "
            "the last complete checkpoint is kept: --resume goes on from it (slurm/train.sbatch "
            "jobs are requeued and resume by themselves)")


def _train(cfg, *, resume: bool, engine: Engine | None) -> TrainResult:
    preflight(cfg)
    data = open_train_data(cfg)
    engine = engine or make_engine(cfg.engine, cfg.gpu)
    import keras
    import tensorflow as tf

    from hpcpath.train.mining import hard_negative_indices, load_hard_negatives
    from hpcpath.train.models import build_model, set_phase

    out = Path(cfg.out)
    if engine.is_chief:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1) + "\n")
    ranks = ranks_record(engine, out)  # every rank's host, local rank, GPU and device: ranks.json
    mixed = bool(cfg.mixed_precision and engine.device.startswith("GPU"))
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(cfg.seed)
    with engine.scope():
        model = build_model(cfg.model, data.patch_size, data.n_outputs, data.context_names,
                            mixed_precision=mixed)
    tf.random.set_seed(cfg.seed * 1000 + engine.rank)  # augmentation differs per rank

    ckroot = out / "checkpoints"
    ckpt = latest_checkpoint(ckroot) if resume else None
    state: dict[str, Any] = read_state(ckpt) if ckpt else {"epoch": 0, "step_in_epoch": 0, "global_step": 0,
                                           "history": [], "schedule": None, "hard": None}
    if resume and engine.is_chief:
        print(f"hpcpath train: resuming from {ckpt.name} (epoch {state['epoch']}, step "
              f"{state['global_step']})" if ckpt else "hpcpath train: no checkpoint to resume; "
              "starting fresh", flush=True, file=sys.stderr)
    hard = np.asarray(state["hard"], np.int64) if state.get("hard") is not None else None
    if hard is None and cfg.hard_negatives:
        hard = load_hard_negatives(cfg.hard_negatives, data.train)
    schedule = LRSchedule(cfg, engine.size)
    if state["schedule"]:
        schedule.load(state["schedule"])
    log = RunLog(out, engine.is_chief, cfg.tensorboard)
    log.rows = list(state["history"])
    audit = AuditLog(out, engine.rank, cfg.audit)
    if engine.is_chief and ckpt:
        log.restore(state["history"])

    phase, optimizer, steps_fns = None, None, None
    global_step = int(state["global_step"])
    metrics: dict = {}
    stop, stopped = StopSignal(), False
    if ckpt is not None and int(state["epoch"]) >= cfg.epochs:  # nothing left: the final weights
        restore_checkpoint(ckpt, model)
        metrics = {k: v for k, v in (state["history"] or [{}])[-1].items() if k.startswith("val_")}
    for epoch in range(int(state["epoch"]), cfg.epochs):
        want = "head" if epoch < cfg.head_epochs else "finetune"
        if want != phase:
            phase = want
            set_phase(model, phase, cfg.model.trainable_layers)
            with engine.scope():
                optimizer = make_optimizer(cfg, schedule.base(phase), mixed)
                optimizer.build(model.trainable_variables)
            if ckpt is not None:  # resuming: weights (and this phase's optimizer state)
                restore_checkpoint(ckpt, model, optimizer if state.get("phase") == phase else None)
                ckpt = None
            # rank 0's weights and optimizer state everywhere: at start and after resume
            engine.broadcast(model.variables)
            engine.broadcast(optimizer.variables)
            steps_fns = make_steps(model, optimizer, engine, mixed, cfg.xla)
        assert steps_fns is not None, "the first epoch sets the phase"
        train_step, eval_step = steps_fns

        idx = epoch_items(data.train.labels, cfg.balance, cfg.seed, epoch, hard, cfg.mining.oversample)
        steps = cfg.steps_per_epoch or max(1, len(idx) // (cfg.batch_size * engine.size))
        if not schedule.warmup_steps and cfg.optimizer.warmup_epochs:
            schedule.warmup_steps = max(1, int(round(cfg.optimizer.warmup_epochs * steps)))
        shard = subset(data.train, idx).shard(engine.rank, engine.size)
        skip = int(state["step_in_epoch"]) if epoch == int(state["epoch"]) else 0
        if cfg.audit:
            np.save(out / "audit" / f"rank-{engine.rank}-epoch-{epoch}.npy",
                    np.stack([shard.store_of.astype(np.int64), shard.item], 1))
        digests: deque = deque()
        batches = rank_batches(shard, cfg.batch_size, steps, seed=cfg.seed, epoch=epoch, skip=skip,
                               context=cfg.context, encoded=cfg.jpeg_decode == "tf")
        stream = tf_batches(batches, data, augment=cfg.augmentation if cfg.augment else None,
                            digests=digests if cfg.audit else None, encoded=cfg.jpeg_decode == "tf")
        t0, losses, wait_s = time.perf_counter(), [], 0.0
        it = iter(stream)
        lr = schedule.lr(phase, global_step)
        for i in range(skip, steps):
            tw = time.perf_counter()
            x, y = next(it)
            wait_s += time.perf_counter() - tw
            lr = schedule.lr(phase, global_step)
            _set_lr(optimizer, lr)
            losses.append(train_step(x, y))
            global_step += 1
            if cfg.audit:
                audit.write(step=global_step, epoch=epoch, loss=float(losses[-1]),
                            weights=weights_checksum(model.trainable_variables),
                            data=digests.popleft(), gpu=engine.gpu, lr=lr)
            if i + 1 < steps and (global_step % STOP_CHECK_STEPS == 0) and stop.agreed(engine):
                stopped = True  # every rank stops after this same step
            if (stopped or cfg.checkpoint_every_steps and global_step % cfg.checkpoint_every_steps == 0) \
                    and i + 1 < steps and engine.is_chief:
                save_checkpoint(ckroot, model, optimizer, _state(
                    epoch, i + 1, global_step, phase, schedule, hard, log.rows), cfg.keep_checkpoints)
            if stopped:
                break
        if stopped:
            break
        seconds = time.perf_counter() - t0
        engine.average_variables(model.non_trainable_variables)
        sums = rank_sync(engine, epoch, global_step, weights_checksum(model.weights), out)
        local_loss = float(np.mean([float(v) for v in losses])) if losses else float("nan")
        train_loss = float(engine.allreduce_mean(local_loss))
        n_done = (steps - skip) * cfg.batch_size * engine.size
        row: dict[str, Any] = {"epoch": epoch, "step": global_step, "phase": phase, "lr": lr, "loss": train_loss}
        if data.val is not None:
            metrics = _validate(data, cfg, engine, eval_step)
            row.update(metrics)
        row["samples_per_s"] = n_done / seconds if seconds > 0 else float("nan")
        row["input_wait_s"] = float(engine.allreduce_mean(wait_s))
        row["seconds"] = seconds
        row["weights_checksum"], row["ranks_in_sync"] = sums[0], int(len(set(sums)) == 1)
        schedule.end_epoch(row.get("val_loss", train_loss))
        if cfg.mining.enabled and epoch + 1 >= cfg.mining.start_epoch and \
                (epoch + 1 - cfg.mining.start_epoch) % cfg.mining.every == 0 and epoch + 1 < cfg.epochs:
            hard, scores = hard_negative_indices(model, data, engine, cfg, eval_step)
            row["hard_negatives"] = int(len(hard))
        log.epoch(row)
        if engine.is_chief:
            save_checkpoint(ckroot, model, optimizer, _state(epoch + 1, 0, global_step, phase,
                                                             schedule, hard, log.rows),
                            cfg.keep_checkpoints)
        if epoch + 1 < cfg.epochs and stop.agreed(engine):
            stopped = True
            break
    stop.restore()
    audit.close()
    model_dir = None
    if engine.is_chief and not stopped:
        model_dir = _save_final(model, data, cfg, out, metrics, ranks)
    return TrainResult(out, model_dir, log.rows, global_step, metrics,
                       resumed_from=int(state["global_step"]) if resume else None,
                       stopped=stopped, device=engine.device)


def _state(epoch, step_in_epoch, global_step, phase, schedule, hard, history) -> dict:
    return {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "phase": phase, "schedule": schedule.state(),
            "hard": None if hard is None else np.asarray(hard).tolist(), "history": history}


def _validate(data: TrainData, cfg, engine: Engine, eval_step) -> dict:
    """This rank scores its shard of the validation items; predictions are gathered from
    every rank, so every rank computes the same, exact metrics."""
    assert data.val is not None, "validation runs only with a validation split"
    shard = data.val.shard(engine.rank, engine.size)
    ys, ps, ls = [], [], []
    if len(shard):
        for x, y in tf_batches(shard.batches(max(cfg.batch_size, 64), context=cfg.context), data):
            loss, p = eval_step(x, y)
            ys.append(y.numpy())
            ps.append(p.numpy())
            ls.append(loss.numpy())
    c = data.n_outputs
    y = engine.allgather(np.concatenate(ys) if ys else np.zeros((0, c), np.float32))
    p = engine.allgather(np.concatenate(ps) if ps else np.zeros((0, c), np.float32))
    loss = engine.allgather(np.concatenate(ls) if ls else np.zeros(0, np.float32))
    out = {"val_loss": float(loss.mean()) if len(loss) else float("nan")}
    out.update(epoch_metrics(y, p, data.classes))
    return out


def _save_final(model, data: TrainData, cfg, out: Path, metrics: dict, ranks: list[dict]) -> Path:
    from hpcpath.modelio import ModelMeta, save_model
    from hpcpath.store import read_meta
    from hpcpath.train.models import input_names

    downsample: float | None = None
    mpp: float | None = None
    ctx: tuple[float, ...] = ()
    try:
        tiling = read_meta(data.train.stores[0]).tiling
        downsample, mpp = tiling.downsample, tiling.tile_mpp
    except (KeyError, OSError, ValueError, TypeError):
        pass  # an image dataset's stores have no tiling: patches are whole images
    try:
        ctx = tuple(float(c) for c in json.loads(Path(cfg.dataset).read_text()).get("context_downsamples", ()))
    except (KeyError, OSError, ValueError, TypeError):
        pass
    multiscale = cfg.model.architecture == "inceptionv3_multiscale"
    meta = ModelMeta(
        patch_size=data.patch_size, classes=tuple(data.classes) if data.task == "multilabel" else
        (tuple(data.classes)[:1] or ("positive",)), task=data.task,
        patch_downsample=downsample if downsample is not None else (1.0 if mpp is None else None),
        patch_mpp=mpp, context_downsamples=ctx if multiscale else (),
        inputs=tuple(input_names(data.context_names if multiscale else ())),
        architecture=cfg.model.architecture,
        extra={"dataset": str(cfg.dataset), "dataset_name": data.train.name,
               "metrics": {k: v for k, v in metrics.items() if isinstance(v, float) and np.isfinite(v)},
               "trained_on": {"ranks": len(ranks), "hosts": sorted({r["host"] for r in ranks}),
                              "devices": sorted({r["device"] for r in ranks})}},
    )
    return save_model(model, out / "model", meta)


def load_config_for(run_dir: str | Path):
    """The TrainConfig a run folder was trained with (``config.json``)."""
    from hpcpath.config import TrainConfig, load_model

    p = Path(run_dir) / "config.json"
    try:
        doc = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise HpcpathError(f"not a training run folder ({exc})", run_dir) from None
    return load_model(TrainConfig, doc, source=str(p))
