"""Stop on a signal at a step every rank agrees on, with a checkpoint: preemption and time limits.

Slurm sends ``SIGUSR1`` to the batch script before the time limit or a preemption
(``#SBATCH --signal=B:USR1@300`` in slurm/train.sbatch); the script passes it to the ranks
(``srun`` forwards it) and requeues the job.  ``SIGTERM`` (``scancel``, the time limit
itself) is taken the same way.  A rank that receives one only raises a flag: the ranks sum
their flags after every step (:meth:`StopSignal.agreed`), so all of them stop after the same
step and rank 0 writes the checkpoint while no collective is in flight.  The requeued job
starts with ``--resume`` (``SLURM_RESTART_COUNT`` > 0) and goes on from that step.
"""

from __future__ import annotations

import signal
import threading

import numpy as np

__all__ = ["StopSignal", "STOP_EXIT"]

STOP_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; run again with --resume


class StopSignal:
    """A flag raised by ``SIGUSR1`` / ``SIGTERM``.  Installed once per process, in the main
    thread, as early as possible (``hpcpath train`` does it before importing TensorFlow: the
    default action of SIGUSR1 would end the process); a later instance shares the flag."""

    raised: int | None = None
    _installed: dict = {}

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
        self._mine: dict = {}  # the handlers this instance installed, and what they replaced
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                if sig not in StopSignal._installed:
                    self._mine[sig] = StopSignal._installed[sig] = signal.signal(sig, StopSignal._handler)

    @staticmethod
    def _handler(signum, frame) -> None:
        StopSignal.raised = signum

    def agreed(self, engine) -> bool:
        """True on every rank when any rank has seen a signal (one small sum)."""
        flag = np.array([1.0 if StopSignal.raised is not None else 0.0])
        if engine.size == 1:
            return bool(flag[0])
        return bool(engine.allreduce_sum(flag)[0] > 0)

    def restore(self) -> None:
        """The handlers this instance replaced back (those installed earlier, by ``hpcpath
        train``, stay until the process ends: a late signal must not kill it)."""
        for sig, old in self._mine.items():
            signal.signal(sig, old)
            StopSignal._installed.pop(sig, None)
        if self._mine:
            StopSignal.raised = None
        self._mine = {}
