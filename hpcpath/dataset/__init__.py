"""Labelled patch datasets: built from slide stores + annotations, read as one dataset."""

from hpcpath.dataset.build import DatasetBuildResult, build_dataset
from hpcpath.dataset.images import build_image_dataset
from hpcpath.dataset.reader import Batch, PatchDataset, open_dataset
from hpcpath.files import find_stores

__all__ = [
    "build_dataset",
    "build_image_dataset",
    "DatasetBuildResult",
    "find_stores",
    "open_dataset",
    "PatchDataset",
    "Batch",
]
