"""``hpcpath train`` and ``hpcpath mine``: thin wrappers over :mod:`hpcpath.train`.

The config is validated (and its files checked) before TensorFlow is imported, so a typo
costs a second and one line, not a traceback."""

from __future__ import annotations

from pathlib import Path

import click

from hpcpath.cli.common import cluster_options
from hpcpath.errors import ConfigError


def _quiet_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up banner (oneDNN, CPU features: written to fd 2
    before any log level applies) held back, so a user error stays one line.  What was held
    back is replayed if the import fails; HPCPATH_TF_VERBOSE=1 shows everything."""
    import os
    import sys
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ.get("HPCPATH_TF_VERBOSE"):
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except ModuleNotFoundError:
            os.dup2(saved, 2)
            from hpcpath.errors import ConfigError

            raise ConfigError("training needs TensorFlow: pip install 'hpcpath[train]'") from None
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _overrides(sets: tuple[str, ...], **flags) -> dict:
    import yaml

    out = {k: v for k, v in flags.items() if v is not None}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. optimizer.learning_rate=0.01")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not valid YAML") from None
    return out


def _common(f):
    f = click.option("-s", "--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override any config key (dotted), e.g. -s optimizer.name=sgd.")(f)
    f = click.option("--dataset", default=None, help="Dataset manifest (overrides the config).")(f)
    f = click.option("--engine", type=click.Choice(["single", "horovod", "tf-distribute"]),
                     default=None, help="single (default), horovod (one process per GPU, launched "
                     "by horovodrun/mpirun/srun) or tf-distribute (MultiWorkerMirroredStrategy).")(f)
    return f


@click.command("train")
@click.argument("config", type=click.Path())
@_common
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the run folder.")
@click.option("-o", "--out", default=None, help="Run folder (overrides the config).")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None, help="Per rank.")
@click.option("--hard-negatives", default=None, type=click.Path(), help="File from `hpcpath mine`.")
@click.option("--audit", is_flag=True, default=None, help="Per-rank weight checksum and data digest per step.")
@click.option("--gpu", type=click.Choice(["require", "prefer", "off"]), default=None,
              help="GPUs given but TensorFlow sees none: require = error, prefer = warn and use the "
                   "CPU, off = CPU on purpose [$HPCPATH_GPU, else the config's gpu, else prefer].")
@click.option("--xla/--no-xla", default=None, help="Compile the train step with XLA [the config's xla].")
def train(config, sets, dataset, engine, resume, out, epochs, batch_size, hard_negatives, audit, gpu, xla):
    """Train a model as CONFIG.yaml says (keys of hpcpath.config.TrainConfig).

    SIGUSR1 or SIGTERM: every rank stops after the same step, a checkpoint is written and the
    exit status is 75; --resume goes on from there (slurm/train.sbatch requeues itself)."""
    from hpcpath.config import TrainConfig
    from hpcpath.gpu import setting_from_env
    from hpcpath.train.preempt import STOP_EXIT

    cfg = TrainConfig.load(config, _overrides(sets, dataset=dataset, engine=engine, out=out,
                                              epochs=epochs, batch_size=batch_size,
                                              hard_negatives=hard_negatives, audit=audit,
                                              gpu=gpu or setting_from_env(), xla=xla))
    from hpcpath.train.preempt import StopSignal

    StopSignal()  # SIGUSR1/SIGTERM from now on: checkpoint and stop (not die during the imports)
    _quiet_tensorflow()
    from hpcpath.train import train as run

    res = run(cfg, resume=resume)
    if res.stopped:
        click.echo(f"hpcpath train: stopped on a signal at step {res.global_step}, checkpoint in "
                   f"{res.out / 'checkpoints'}; go on with --resume", err=True)
        raise SystemExit(STOP_EXIT)
    if res.model_dir is not None:
        last = res.history[-1] if res.history else {}
        auc = last.get("val_auc")
        click.echo(f"hpcpath train: model {res.model_dir} (step {res.global_step}"
                   + (f", val_auc {auc:.4f}" if isinstance(auc, float) else "") + f", {res.device})", err=True)


@click.command("mine")
@click.argument("config", type=click.Path())
@_common
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model folder (RUN/model).")
@click.option("-o", "--out", "out_file", required=True, type=click.Path(),
              help="Hard-negatives JSON to write; with --annotations, the round's folder.")
@click.option("--threshold", type=float, default=None,
              help="Score at or above which a negative (or detection) is hard [mining.threshold].")
@click.option("-a", "--annotations", multiple=True, type=click.Path(),
              help="Points datasets: the truth files the dataset was built from. Detects over the whole "
                   "train slides and adds the false positives far from every truth as negatives.")
@click.option("--slides", "slide_dirs", multiple=True, type=click.Path(), help="Folders holding the source slides.")
@click.option("--mode", type=click.Choice(["two-stage", "window"]), default="two-stage", show_default=True,
              help="How the slides are searched (hpcpath infer --mode).")
@click.option("--min-distance-px", type=float, default=None,
              help="A false positive must be farther than this (level-0 px) from every truth "
                   "[the dataset's negative distance].")
@click.option("--max-per-slide", type=int, default=None, help="Keep at most the N highest-scored per slide.")
@click.option("--retrain/--no-retrain", default=True, show_default=True,
              help="Train CONFIG again on the extended dataset into OUT/train (with --annotations).")
@cluster_options
def mine(config, sets, dataset, engine, model_dir, out_file, threshold, annotations, slide_dirs,
         mode, min_distance_px, max_per_slide, retrain, cluster, workers):
    """Hard-negative mining.  Without --annotations: score the dataset's train negatives with
    a model and write those scored >= THRESHOLD for the next round (hpcpath train
    --hard-negatives).  With --annotations (points datasets): one whole round as the seeds do
    it -- detect over every train slide, append the detections far from any true point as
    negatives to a new dataset (OUT/dataset.json, OUT/hard-negatives.json) and retrain into
    OUT/train."""
    from hpcpath.config import TrainConfig

    cfg = TrainConfig.load(config, _overrides(sets, dataset=dataset, engine=engine))
    if annotations:
        _mine_slides(cfg, model_dir, out_file, threshold, annotations, slide_dirs, mode,
                     min_distance_px, max_per_slide, retrain, cluster, workers)
        return
    _quiet_tensorflow()
    from hpcpath.train import mine as run

    doc = run(cfg, model_dir, out_file, threshold=threshold)
    click.echo(f"hpcpath mine: {len(doc['items'])} of {doc['negatives_scored']} negatives scored "
               f">= {doc['threshold']} -> {out_file}", err=True)


def _mine_slides(cfg, model_dir, out_dir, threshold, annotations, slide_dirs, mode,
                 min_distance_px, max_per_slide, retrain, cluster, workers):
    from hpcpath.cli.common import dask_session
    from hpcpath.config import InferConfig
    from hpcpath.infer.run import check_model
    from hpcpath.train.mining import mine_slides

    icfg = InferConfig(mode=mode)
    check_model(model_dir, icfg)
    with dask_session(cluster, workers, out_dir) as client:
        res = mine_slides(cfg, model_dir, out_dir, list(annotations), slide_dirs=list(slide_dirs),
                          infer_cfg=icfg, threshold=threshold, min_distance_px=min_distance_px,
                          max_per_slide=max_per_slide, retrain=False, client=client)
    n_det = sum(p["detections"] for p in res["per_slide"])
    click.echo(f"hpcpath mine: {res['hard_negatives']} of {n_det} detections on "
               f"{len(res['per_slide'])} train slides are far from every truth -> "
               f"{res['manifest']}, {res['hard_negatives_file']}", err=True)
    if retrain:
        _quiet_tensorflow()
        from hpcpath.train import train as run

        cfg2 = cfg.model_copy(update={"dataset": res["manifest"], "out": str(Path(out_dir) / "train"),
                                      "hard_negatives": res["hard_negatives_file"]})
        result = run(cfg2)
        click.echo(f"hpcpath mine: retrained -> {result.model_dir}", err=True)
    else:
        click.echo(f"hpcpath mine: next: hpcpath train CONFIG --dataset {res['manifest']} "
                   f"--hard-negatives {res['hard_negatives_file']}", err=True)
