"""Deliberate bugs for the mutation check (tests/test_mutations.py); never active otherwise.

``HPCPATH_MUTATION=<name>`` plus ``-p mutants`` (tests/ on ``sys.path``) applies one mutation in
the pytest process; the same variable plus ``DASK_DISTRIBUTED__WORKER__PRELOAD`` naming this
file applies it in every Dask worker process too (``dask_setup`` below), since dataset labels
are computed on the workers.  Each mutation breaks one feature the way a real regression would.
"""

from __future__ import annotations

import dataclasses
import os

MUTATIONS = ("augment-identity", "labels-zero", "patients-ignored", "reader-xy-swap")


def _augment_identity() -> None:
    import tensorflow as tf

    import hpcpath.dataset.tfdata as tfdata

    def augment_batch(images, cfg, seed=None, rnd=None, dtype="float32"):
        if dtype == "uint8":
            return tf.cast(images, tf.uint8) if images.dtype == tf.uint8 else tf.cast(
                tf.round(images * 255.0), tf.uint8)
        return tf.image.convert_image_dtype(images, tf.float32)

    tfdata.augment_batch = augment_batch


def _labels_zero() -> None:
    import numpy as np

    import hpcpath.dataset.build as build

    real = build._region_labels

    def _region_labels(*args, **kw):
        labels, fraction, warnings = real(*args, **kw)
        return np.zeros_like(labels), np.zeros_like(fraction), warnings

    build._region_labels = _region_labels


def _patients_ignored() -> None:
    import hpcpath.annotations as annotations
    import hpcpath.dataset.build as build

    build._patients = lambda cfg, slide_ids: {s: s for s in slide_ids}
    real = annotations.read_chestxray_csv

    def read_chestxray_csv(*args, **kw):
        cxr = real(*args, **kw)
        return dataclasses.replace(cxr, patient_ids=[""] * len(cxr.patient_ids))

    annotations.read_chestxray_csv = read_chestxray_csv


def _reader_xy_swap() -> None:
    import hpcpath.annotations as annotations
    import hpcpath.annotations.reader as reader
    from hpcpath.annotations import AnnotationSet

    real = reader.read_annotations

    def read_annotations(*args, **kw):
        a = real(*args, **kw)
        return AnnotationSet(
            regions=[r.replace(rings=tuple(ring[:, ::-1].copy() for ring in r.rings))
                     for r in a.regions],
            points=[dataclasses.replace(p, x=p.y, y=p.x) for p in a.points],
            warnings=list(a.warnings))

    reader.read_annotations = annotations.read_annotations = read_annotations


def apply(name: str) -> None:
    if name not in MUTATIONS:
        raise ValueError(f"unknown mutation {name!r} (known: {', '.join(MUTATIONS)})")
    {"augment-identity": _augment_identity, "labels-zero": _labels_zero,
     "patients-ignored": _patients_ignored, "reader-xy-swap": _reader_xy_swap}[name]()


def pytest_configure(config) -> None:  # pytest plugin hook (``-p mutants``)
    name = os.environ.get("HPCPATH_MUTATION")
    if name:
        apply(name)


def dask_setup(worker) -> None:  # Dask preload hook, in each worker process
    name = os.environ.get("HPCPATH_MUTATION")
    if name and name != "augment-identity":  # augmentation never runs on Dask workers
        apply(name)
