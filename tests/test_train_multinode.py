"""Training across two Slurm nodes, for real: ``sbatch --nodes=2 --ntasks-per-node=2
slurm/train.sbatch`` on the two-node local Slurm (n1, n2: own hostname, address and /tmp;
two fake GPUs each), with Horovod over Gloo and with tf.distribute.

What each test proves:
- 4 ranks on 2 hosts, local ranks 0/1 on each, each pinned to the fake GPU of its local rank
  (``ranks.json``, the job log);
- the allreduce crosses nodes: the Gloo rendezvous (or the tf.distribute worker list) is on
  the nodes' own addresses (10.77.0.x, from HPCPATH_INTERFACE), and the ranks on n1 and n2
  hold identical weights after every step (audit) and every epoch (``ranks-sync.jsonl``)
  while each reads a disjoint shard whose union is the epoch's items;
- a signal before the time limit (what ``--signal=B:USR1@300`` delivers) checkpoints, the job
  requeues itself and resumes with nobody resubmitting it;
- a node lost mid-training (``bin/local-slurm fail``: ``scontrol update nodename=n2
  state=down`` and every process of n2 killed): Slurm requeues the job, which resumes from the
  last complete checkpoint once it has two nodes again; final validation AUC within 0.03 of the
  uninterrupted run.

The data come through the user's path: ``hpcpath synth``, ``hpcpath tile``, ``hpcpath dataset
build`` into a folder every node sees.  Horovod is built with Gloo only here (bin/build-horovod),
so the ``mpi`` launcher is not run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, cli_dataset

PY = sys.executable
pytestmark = pytest.mark.slow
# Every train item each epoch (balance: null): 21 steps of 4 x 16 patches.  Fewer steps leave
# BatchNorm's moving statistics behind the weights and validation swings (AUC 0.01 -> 0.99
# between epochs seen with a third of the steps); with colour augmentation, else this small
# CNN learns the train slides' stain.
CONFIG = {"epochs": 2, "batch_size": 16, "balance": None, "audit": True, "tensorboard": False,
          "model": {"architecture": "small_cnn", "width": 16},
          "optimizer": {"learning_rate": 0.0005, "warmup_epochs": 0.5}, "seed": 0}


# ------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def data(local_slurm2):
    """Four 3072^2 synthetic slides, 64 px tiles, 2 train / 2 val slides, on a shared path."""
    top = Path("/var/tmp/hpcpath-tests")
    top.mkdir(mode=0o1777, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="train-mn-", dir=top))
    cli_dataset(root, 4, "3072x3072", 30)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def config(root: Path, name: str, **kw) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"train": {**CONFIG, "dataset": str(root / "tumor.json"),
                                              "out": str(root / name), **kw}}))
    return path


def slurm(env2: dict, *args, check=True) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env2})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc.stdout


def submit(env2: dict, root: Path, name: str, launcher: str, nodes: int = 2) -> str:
    out = slurm({**env2, "HPCPATH_PYTHON": PY, "HPCPATH_LAUNCHER": launcher, "HPCPATH_INTERFACE": "eth0",
                 "HPCPATH_GPU": "prefer", "TF_CPP_MIN_LOG_LEVEL": "2"},
                "sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=2", "--gres=gpu:2",
                f"--chdir={root}", f"--output={root / name}.log", f"--job-name=mn-{name}",
                str(REPO / "slurm" / "train.sbatch"), str(config(root, name)))
    return out.strip().split(";")[0]


def job(env2: dict, job_id: str) -> dict:
    out = slurm(env2, "scontrol", "show", "job", "-o", job_id, check=False)
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for(pred, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_done(env2: dict, job_id: str, log: Path, timeout: float = 420) -> dict:
    def done():
        j = job(env2, job_id)
        return j if j.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

    try:
        j = wait_for(done, timeout, f"job {job_id}", poll=2)
    except AssertionError:
        slurm(env2, "scancel", job_id, check=False)
        tail = log.read_text()[-4000:] if log.exists() else ""
        raise AssertionError(f"job {job_id} did not finish:\n{tail}") from None
    assert j["JobState"] == "COMPLETED", f"job {job_id} {j['JobState']}:\n{log.read_text()[-4000:]}"
    return j


def history(run: Path) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def sync_lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "ranks-sync.jsonl").read_text().splitlines()]


def assert_four_ranks_in_step(root: Path, name: str, epochs: int) -> None:
    """4 ranks on n1/n2, local ranks 0/1 pinned to GPUs 0/1, weights identical on every rank
    after every epoch (and every step), disjoint shards covering the epoch's items."""
    run, log = root / name, (root / f"{name}.log").read_text()
    ranks = json.loads((run / "ranks.json").read_text())
    assert [(r["rank"], r["host"], r["local_rank"], r["cuda_visible_devices"], r["device"]) for r in ranks] == [
        (0, "n1", 0, "0", "CPU"), (1, "n1", 1, "1", "CPU"), (2, "n2", 0, "0", "CPU"), (3, "n2", 1, "1", "CPU")]
    for r in ranks:  # each rank said who it is, in the job log
        assert f"rank {r['rank']}/4 on {r['host']} (local rank {r['local_rank']}" in log, log[-3000:]
    epochs_seen = {}
    for line in sync_lines(run):
        assert len(line["checksums"]) == 4 and len(set(line["checksums"])) == 1, line
        epochs_seen[line["epoch"]] = line["checksums"][0]
    assert sorted(epochs_seen) == list(range(epochs))
    assert len(set(epochs_seen.values())) == epochs  # and the weights did change
    h = history(run)
    assert [int(r["epoch"]) for r in h] == list(range(epochs))
    assert all(r["ranks_in_sync"] == "1" for r in h)
    # every step: the same weights on all four ranks, four different batches
    audits = [[json.loads(x) for x in (run / "audit" / f"rank-{r}.jsonl").read_text().splitlines()]
              for r in range(4)]
    by_step = [{a["step"]: a for a in rank} for rank in audits]
    assert set(by_step[0]) == set(by_step[1]) == set(by_step[2]) == set(by_step[3])
    for step in by_step[0]:
        assert len({b[step]["weights"] for b in by_step}) == 1, f"ranks diverged at step {step}"
        assert len({b[step]["data"] for b in by_step}) == 4, f"ranks read the same batch at step {step}"
    from hpcpath.config import TrainConfig
    from hpcpath.train.data import epoch_items, open_train_data, subset

    cfg = TrainConfig.load(root / f"{name}.yaml")
    train = open_train_data(cfg).train
    for epoch in range(epochs):
        shards = [{tuple(x) for x in np.load(run / "audit" / f"rank-{r}-epoch-{epoch}.npy").tolist()}
                  for r in range(4)]
        assert all(shards) and sum(map(len, shards)) == len(set().union(*shards))  # disjoint
        ep = subset(train, epoch_items(train.labels, cfg.balance, cfg.seed, epoch))
        assert set().union(*shards) == set(zip(ep.store_of.tolist(), ep.item.tolist()))
    assert (run / "model" / "model.keras").exists()
    meta = json.loads((run / "model" / "hpcpath-model.json").read_text())
    assert meta["extra"]["trained_on"] == {"ranks": 4, "hosts": ["n1", "n2"], "devices": ["CPU"]}


# ------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def gloo_run(data, local_slurm2):
    """The uninterrupted reference: Horovod over Gloo, 2 nodes x 2 tasks."""
    jid = submit(local_slurm2, data, "gloo", "gloo")
    wait_done(local_slurm2, jid, data / "gloo.log")
    return data / "gloo"


def test_gloo_four_ranks_on_two_nodes_stay_in_step(data, gloo_run):
    log = (data / "gloo.log").read_text()
    # the rendezvous is on n1's cluster address (eth0), which n2's ranks dialled
    assert "4 Horovod ranks on 2 node(s), rendezvous 10.77.0.11:" in log and "(eth0)" in log, log[:2000]
    assert "warning: gpu: prefer: CUDA_VISIBLE_DEVICES=0 but TensorFlow sees no GPU" in log
    assert_four_ranks_in_step(data, "gloo", CONFIG["epochs"])
    assert float(history(gloo_run)[-1]["val_auc"]) >= 0.9


def test_tf_distribute_four_ranks_checkpoint_on_signal_requeue_and_resume(data, local_slurm2, gloo_run):
    """tf.distribute across the nodes; mid-run the batch script gets USR1 (as --signal=B:USR1
    sends it before the time limit): the ranks stop at one step with a checkpoint, the job
    requeues itself and the second start resumes from it -- and the ranks still agree on
    every epoch, before and after."""
    env2, name = local_slurm2, "tfd"
    jid = submit(env2, data, name, "tf-distribute")
    run, log = data / name, data / f"{name}.log"
    wait_for(lambda: (run / "ranks-sync.jsonl").exists(), 300, "the first epoch")
    slurm(env2, "scancel", "--signal=USR1", "--batch", jid)
    j = wait_done(env2, jid, log)
    text = log.read_text()
    assert "USR1: the ranks checkpoint and stop; requeueing job" in text, text[-3000:]
    assert "hpcpath train: stopped on a signal at step" in text
    assert "(start 2)" in text and "hpcpath train: resuming from step-" in text, text[-3000:]
    assert int(j["Restarts"]) == 1
    assert "hpcpath train: tf.distribute: 4 workers on 2 node(s) at 10.77.0.11:" in text
    assert ", 10.77.0.12:" in text
    # the epochs before and after the stop: each once in the history, ranks in step throughout
    assert_four_ranks_in_step(data, name, CONFIG["epochs"])
    ref = history(gloo_run)
    assert [r["step"] for r in history(run)] == [r["step"] for r in ref]
    ck = run / "checkpoints"
    assert not list(ck.glob(".*.tmp")) and all((d / "COMPLETE").exists() for d in ck.glob("step-*"))


def test_node_lost_mid_training_requeues_and_resumes(data, local_slurm2, gloo_run):
    env2, name = local_slurm2, "lost"
    jid = submit(env2, data, name, "gloo")
    run, log = data / name, data / f"{name}.log"
    fixture = [str(REPO / "bin" / "local-slurm")]
    try:
        # after the first complete checkpoint, while epoch 1 trains: n2 goes down, its tasks die
        wait_for(lambda: (run / "checkpoints" / "latest").exists(), 300, "the first checkpoint")
        subprocess.run(fixture + ["fail", "--nodes", "2", "n2"], check=True, capture_output=True, timeout=120)
        wait_for(lambda: int(job(env2, jid).get("Restarts", 0)) >= 1, 120, "Slurm to requeue the job")
        # the node comes back (a spare, on a real cluster): the job starts again by itself
        subprocess.run(fixture + ["resume", "--nodes", "2", "n2"], check=True, capture_output=True, timeout=120)
        j = wait_done(env2, jid, log)
    finally:
        subprocess.run(fixture + ["resume", "--nodes", "2", "n2"], capture_output=True, timeout=120)
    text = log.read_text()
    assert int(j["Restarts"]) == 1 and "(start 2)" in text
    assert "Traceback" not in text, text[-3000:]  # ranks that lost their peers: one line each
    assert "hpcpath train: resuming from step-" in text, text[-3000:]
    assert_four_ranks_in_step(data, name, CONFIG["epochs"])
    h, ref = history(run), history(gloo_run)
    assert [r["step"] for r in h] == [r["step"] for r in ref]  # the step count went on
    assert abs(float(h[-1]["val_auc"]) - float(ref[-1]["val_auc"])) <= 0.03, (h[-1], ref[-1])


def test_lost_peers_is_one_line():
    """What a surviving rank raises when the collective fails because its peers are gone."""
    import tensorflow as tf

    from hpcpath.train.loop import _lost_peers

    gone = tf.errors.UnknownError(None, None, "Horovod has been shut down. This was caused by an "
                                  "exception on one of the ranks or an attempt to allreduce\n...")
    line = _lost_peers(gone)
    assert line.startswith("lost the other ranks mid-step") and "--resume" in line and "\n" not in line
    assert _lost_peers(tf.errors.UnavailableError(None, None, "Socket closed")) is not None
    assert _lost_peers(tf.errors.InvalidArgumentError(None, None, "bad shape")) is None
    assert _lost_peers(ValueError("x")) is None
