"""Inference on Dask workers pinned to GPUs: heatmaps into the slide stores, detections,
overlays and run tables.

* ``run``: the driver, :func:`infer_slides`;
* ``tasks``: the worker tasks (plan, predict windows / detect candidates, finish);
* ``model``: the per-process model cache and TensorFlow setup;
* ``reader``: read-ahead thread, patch cutting, fixed-size batches;
* ``grid``, ``detect``: pure kernels (window grid, peaks, NMS/DBSCAN, nucleus proposals);
* ``predictions``: the ``predictions/<name>`` group of a store; ``outputs``: files.
"""

from hpcpath.grid import WindowGrid, task_blocks, tissue_windows, window_grid
from hpcpath.infer.run import InferResult, infer_slides, prediction_name
from hpcpath.store.predictions import Predictions, open_predictions, predictions_complete

__all__ = [
    "infer_slides",
    "InferResult",
    "prediction_name",
    "open_predictions",
    "predictions_complete",
    "Predictions",
    "WindowGrid",
    "window_grid",
    "tissue_windows",
    "task_blocks",
]
