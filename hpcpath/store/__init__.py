"""The slide store (one Zarr v3 store per slide): layout, typed metadata, datasets and
predictions groups.  Every stage creates, opens and marks stores through this package
(docs/store-layout.md describes what is on disk).

* ``slide``: the store layout, its creation, the completion marker, :class:`SlideStore`;
* ``meta``: typed attribute documents (:class:`StoreMeta`, :class:`DatasetMeta`,
  :class:`PredictionsMeta`);
* ``predictions``: the ``predictions/<name>`` group (inference writes, evaluation reads).
"""

from hpcpath.store.meta import DatasetMeta, PredictionsMeta, StoreMeta, TilingMeta, TissueMeta
from hpcpath.store.predictions import Predictions, open_predictions, predictions_complete
from hpcpath.store.slide import (
    FLAT_CHUNK_KEYS,
    INDEX_COLUMNS,
    MASK_CHUNK,
    SlideStore,
    check_output_dir,
    create_dataset,
    create_image_store,
    create_slide_store,
    dataset_meta,
    finish_dataset,
    is_complete,
    mark_complete,
    mask_scratch,
    ngff_multiscales,
    open_dataset_group,
    open_group,
    open_store,
    pyramid_levels,
    read_meta,
    remove_store,
    slide_source,
    store_path,
    store_version,
)

__all__ = [
    "INDEX_COLUMNS",
    "FLAT_CHUNK_KEYS",
    "MASK_CHUNK",
    "SlideStore",
    "StoreMeta",
    "TilingMeta",
    "TissueMeta",
    "DatasetMeta",
    "PredictionsMeta",
    "Predictions",
    "open_store",
    "open_group",
    "open_predictions",
    "predictions_complete",
    "read_meta",
    "create_slide_store",
    "create_image_store",
    "mask_scratch",
    "create_dataset",
    "open_dataset_group",
    "dataset_meta",
    "finish_dataset",
    "pyramid_levels",
    "ngff_multiscales",
    "store_path",
    "is_complete",
    "mark_complete",
    "check_output_dir",
    "slide_source",
    "remove_store",
    "store_version",
]
