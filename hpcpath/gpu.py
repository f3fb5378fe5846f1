"""GPUs that are used, or a one-line error: the ``gpu`` setting (``require | prefer | off``).

A rank or worker given GPUs (``/dev/nvidia*`` on the machine, or ``CUDA_VISIBLE_DEVICES`` set
by Slurm for the job) on which TensorFlow sees none -- the CPU build ``tensorflow-cpu``, a
driver or CUDA library mismatch -- would otherwise train or predict on the CPU at a fraction
of the speed and say nothing.  :func:`decide` is pure (facts in, decision out) so every case
is tested without a GPU; :func:`gpu_facts` gathers the facts of this process, and
:func:`check_gpus` applies the decision: go on, warn (``prefer``), or raise a one-line
:class:`~hpcpath.errors.ConfigError` (``require``) saying why and how to fix it.

``off`` hides every GPU from TensorFlow (:func:`hide_gpus_if_off`, before TensorFlow starts):
a CPU run on purpose.  The setting comes from the config (``gpu:``), ``HPCPATH_GPU`` or the
``--gpu`` flag of ``hpcpath train`` / ``hpcpath infer`` (flag > environment > file > ``prefer``).
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from hpcpath.errors import ConfigError

__all__ = ["GPU_SETTINGS", "GpuFacts", "GpuDecision", "decide", "gpu_facts", "check_gpus",
           "setting_from_env", "hide_gpus_if_off", "visible_ids", "set_task_gpu", "task_gpu",
           "tf_device"]

GpuSetting = Literal["require", "prefer", "off"]
GPU_SETTINGS: tuple[str, ...] = ("require", "prefer", "off")
ENV = "HPCPATH_GPU"
_TASK_GPU: str | None = None  # the GPU address a scheduler (Spark) gave the running task
FIX_BUILD = "pip install 'hpcpath[gpu]' (TensorFlow with CUDA) in place of the CPU-only 'hpcpath[train]'"


def visible_ids(cuda_visible_devices: str | None) -> tuple[str, ...]:
    """Device ids named by ``CUDA_VISIBLE_DEVICES`` ("" / "-1" / "NoDevFiles": none).

    >>> visible_ids("0,1"), visible_ids("-1"), visible_ids(None), visible_ids("NoDevFiles")
    (('0', '1'), (), (), ())
    """
    ids = [d.strip() for d in (cuda_visible_devices or "").split(",") if d.strip()]
    return () if not ids or ids[0] in ("-1", "NoDevFiles") else tuple(ids)


@dataclass(frozen=True)
class GpuFacts:
    """What this process was given and what TensorFlow made of it."""

    device_files: tuple[str, ...] = ()  # /dev/nvidia0, /dev/nvidia1, ... on the machine
    cuda_visible_devices: str | None = None  # as given (Slurm sets it for --gres=gpu:N)
    tf_gpus: tuple[str, ...] = ()  # names of the GPUs TensorFlow sees ("NVIDIA H100 ...")
    tf_cuda_build: bool = False  # tf.sysconfig.get_build_info()["is_cuda_build"]
    tf_package: str = "tensorflow"  # the installed distribution: tensorflow, tensorflow-cpu
    tf_version: str = ""

    @property
    def given(self) -> bool:
        return bool(self.device_files or visible_ids(self.cuda_visible_devices))

    def given_text(self) -> str:
        parts = []
        if visible_ids(self.cuda_visible_devices):
            parts.append(f"CUDA_VISIBLE_DEVICES={self.cuda_visible_devices}")
        if self.device_files:
            parts.append(f"{len(self.device_files)} /dev/nvidia* device(s)")
        return " and ".join(parts)


@dataclass(frozen=True)
class GpuDecision:
    action: Literal["go", "warn", "fail"]
    device: str  # what does the work: "GPU NVIDIA H100 80GB HBM3" or "CPU"
    message: str = ""  # why (warn, fail), one line


def _why_unseen(f: GpuFacts) -> str:
    """The reason TensorFlow sees none of the GPUs given, and the fix, in one clause."""
    tf = f"TensorFlow {f.tf_version}".strip()
    if f.tf_package == "tensorflow-cpu" or not f.tf_cuda_build:
        pkg = "tensorflow-cpu" if f.tf_package == "tensorflow-cpu" else f"{f.tf_package} (a CPU-only build)"
        return f"{pkg} is installed: {FIX_BUILD}"
    if not f.device_files:
        return (f"{tf} is a CUDA build but this node has no /dev/nvidia* device files (NVIDIA driver "
                "not loaded?): run on a GPU node, or check the driver with nvidia-smi")
    return (f"{tf} is a CUDA build but initialised none of them (driver or CUDA library mismatch?): "
            "check nvidia-smi and reinstall with pip install 'hpcpath[gpu]'")


def decide(setting: str, facts: GpuFacts) -> GpuDecision:
    """Go on, warn or fail, from the ``gpu`` setting and the facts (pure).

    >>> cpu_build = GpuFacts(cuda_visible_devices="0", tf_package="tensorflow-cpu")
    >>> decide("prefer", cpu_build).action, decide("require", cpu_build).action
    ('warn', 'fail')
    >>> decide("require", GpuFacts(tf_gpus=("NVIDIA A100",), tf_cuda_build=True)).device
    'GPU NVIDIA A100'
    >>> decide("prefer", GpuFacts()).action, decide("off", cpu_build).action
    ('go', 'go')
    """
    if setting not in GPU_SETTINGS:
        raise ConfigError(f"gpu: {setting!r} is not one of require, prefer, off")
    if setting == "off":
        return GpuDecision("go", "CPU")
    if facts.tf_gpus:
        names = sorted(set(facts.tf_gpus))
        return GpuDecision("go", "GPU " + ", ".join(names) + (f" (x{len(facts.tf_gpus)})"
                                                               if len(facts.tf_gpus) > 1 else ""))
    if not facts.given:
        if setting == "require":
            return GpuDecision("fail", "CPU", "gpu: require, but this process was given no GPU (no "
                               "/dev/nvidia*, CUDA_VISIBLE_DEVICES unset): run it on a GPU node "
                               "(sbatch --gres=gpu:N) or set gpu: prefer")
        return GpuDecision("go", "CPU")
    unseen = f"{facts.given_text()} but TensorFlow sees no GPU: {_why_unseen(facts)}"
    if setting == "require":
        return GpuDecision("fail", "CPU", f"gpu: require: {unseen}")
    return GpuDecision("warn", "CPU", f"gpu: prefer: {unseen}; running on the CPU "
                       "(gpu: require makes this an error, gpu: off silences it)")


def _package() -> tuple[str, str]:
    from importlib import metadata

    for name in ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-macos"):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "tensorflow", ""


def gpu_facts(env: Mapping[str, str] | None = None, dev: str = "/dev") -> GpuFacts:
    """The facts of this process; imports TensorFlow (call after GPU pinning)."""
    env = os.environ if env is None else env
    import tensorflow as tf

    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name") or gpu.name)
        except (RuntimeError, ValueError):
            names.append(gpu.name)
    try:
        cuda = bool(tf.sysconfig.get_build_info().get("is_cuda_build"))
    except Exception:  # noqa: BLE001 - very old or unusual builds
        cuda = False
    package, version = _package()
    files = tuple(sorted(p for p in glob.glob(os.path.join(dev, "nvidia*"))
                         if re.fullmatch(r"nvidia\d+", os.path.basename(p))))
    return GpuFacts(device_files=files, cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
                    tf_gpus=tuple(names), tf_cuda_build=cuda, tf_package=package,
                    tf_version=version or tf.__version__)


def check_gpus(setting: str, facts: GpuFacts | None = None, *, who: str = "hpcpath") -> str:
    """Apply :func:`decide` to this process: returns the device doing the work; prints the
    warning (``prefer``) once to stderr; raises a one-line ConfigError (``require``)."""
    decision = decide(setting, facts if facts is not None else gpu_facts())
    if decision.action == "fail":
        raise ConfigError(decision.message)
    if decision.action == "warn":
        print(f"{who}: warning: {decision.message}", file=sys.stderr, flush=True)
    return decision.device


def setting_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``$HPCPATH_GPU`` checked, or None when unset."""
    env = os.environ if env is None else env
    value = (env.get(ENV) or "").strip().lower()
    if not value:
        return None
    if value not in GPU_SETTINGS:
        raise ConfigError(f"{ENV}={env.get(ENV)}: use require, prefer or off")
    return value


def hide_gpus_if_off(setting: str, env: dict | None = None) -> None:
    """``off``: TensorFlow is shown no GPU (``CUDA_VISIBLE_DEVICES=-1`` before it starts)."""
    if setting == "off":
        (os.environ if env is None else env)["CUDA_VISIBLE_DEVICES"] = "-1"


def set_task_gpu(address: str | None) -> None:
    """The GPU the running task was given by its scheduler (Spark's ``TaskContext``
    resources), or None.  A Python worker runs many tasks, each maybe on another GPU, so
    the task's device is chosen per task (:func:`tf_device`), not per process."""
    global _TASK_GPU
    _TASK_GPU = address


def task_gpu() -> str | None:
    """The address set by :func:`set_task_gpu` for the running task, if any."""
    return _TASK_GPU


def tf_device(address: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """TensorFlow's name for the GPU at ``address`` (default: the task's), or None.

    TensorFlow numbers the GPUs it sees from 0 in ``CUDA_VISIBLE_DEVICES`` order, so an
    address listed there maps to its position, any other to itself.

    >>> tf_device("3", {"CUDA_VISIBLE_DEVICES": "2,3"}), tf_device("1", {}), tf_device(None, {})
    ('/GPU:1', '/GPU:1', None)
    """
    address = _TASK_GPU if address is None else address
    if not address:
        return None
    address = address.split(",")[0]  # a task given several GPUs runs on its first
    ids = visible_ids((os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES"))
    return f"/GPU:{ids.index(address) if address in ids else address}"

