"""Training: Keras 3 models on patch datasets, on one process, Horovod ranks or tf.distribute
workers, with the same config.  Needs the ``train`` extra (and Horovod: bin/build-horovod)."""

from hpcpath.train.loop import TrainResult, train
from hpcpath.train.mining import mine

__all__ = ["train", "TrainResult", "mine"]
