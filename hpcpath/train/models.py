"""The networks, as Keras 3 functional models that take uint8 images and rescale inside.

Every model is ``inputs -> preprocessing -> backbone(s) -> pooled features -> head``, with
each backbone a nested ``keras.Model`` named ``backbone_<input>``, so the two-phase schedule
can freeze or unfreeze backbones (or their top N layers) without knowing the architecture.
Preprocessing uses only built-in layers (Rescaling, Normalization, a fixed Dense for
ResNet's RGB->BGR + mean), so a saved ``model.keras`` loads anywhere with plain Keras.

Pretrained weights only ever come from a local file named in the config: no download.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpcpath.errors import ConfigError

if TYPE_CHECKING:
    import keras

    from hpcpath.config import ModelConfig

__all__ = ["build_model", "backbones", "set_phase", "MIN_SIZE", "input_names"]

# The smallest patch each architecture accepts (Keras applications' own limits).
MIN_SIZE = {"small_cnn": 16, "resnet50": 32, "inceptionv3": 75, "inceptionv3_multiscale": 75,
            "densenet121": 32}

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406]) * 255.0
_IMAGENET_STD = np.array([0.229, 0.224, 0.225]) * 255.0
_CAFFE_BGR_MEAN = np.array([103.939, 116.779, 123.68])


def input_names(context_names: Sequence[str]) -> list[str]:
    """Model input names: ``main`` and ``context_<r>`` (the dataset's context keys)."""
    return ["main", *[f"context_{c}" for c in context_names]]


def _small_cnn(size: int, width: int, name: str):
    """Four conv blocks (conv-BN-ReLU, pool), global average pool: ~0.4 M parameters at
    width 32; trains in seconds per epoch on a CPU at 64-128 px."""
    import keras
    from keras import layers

    x = inp = keras.Input((size, size, 3), name=f"{name}_in")
    for i, f in enumerate((width, width * 2, width * 4, width * 4)):
        x = layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(x)
        if i < 3:
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, x, name=name)


def _application(arch: str, size: int, name: str):
    import keras

    make = {"resnet50": keras.applications.ResNet50, "inceptionv3": keras.applications.InceptionV3,
            "inceptionv3_multiscale": keras.applications.InceptionV3,
            "densenet121": keras.applications.DenseNet121}[arch]
    return make(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg",
                name=name)


def _preprocess(arch: str, x, name: str):
    """uint8 -> what the backbone's pretrained weights expect, with built-in layers only."""
    from keras import layers

    x = layers.Rescaling(1.0, name=f"{name}_to_float")(x)
    if arch == "small_cnn":
        return layers.Rescaling(1 / 255.0, name=f"{name}_rescale")(x)
    if arch.startswith("inceptionv3"):  # "tf" mode: [-1, 1]
        return layers.Rescaling(1 / 127.5, offset=-1.0, name=f"{name}_rescale")(x)
    if arch == "densenet121":  # "torch" mode: ImageNet mean/std per channel
        return layers.Normalization(mean=_IMAGENET_MEAN, variance=_IMAGENET_STD**2,
                                    name=f"{name}_rescale")(x)
    # resnet50, "caffe" mode: RGB -> BGR, minus the BGR mean (a fixed, frozen 3x3 Dense)
    bgr = layers.Dense(3, trainable=False, name=f"{name}_rescale")
    y = bgr(x)
    bgr.set_weights([np.eye(3)[::-1].copy(), -_CAFFE_BGR_MEAN])
    return y


def _load_weights(target, path: str, what: str, arch: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"model.weights: file not found: {p} (weights are never downloaded; "
                          "give a local file)")
    if not (p.name.endswith(".weights.h5") or p.suffix in (".h5", ".hdf5", ".keras")):
        raise ConfigError(f"model.weights: {p.name}: expected a .weights.h5, .h5 or .keras file")
    try:
        with warnings.catch_warnings():  # Keras warns per skipped layer before it raises
            warnings.simplefilter("ignore")
            target.load_weights(str(p))
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError, OSError, KeyError...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"model.weights: {p} does not match the {arch} {what} ({first})") from None


def build_model(cfg: ModelConfig, patch_size: int, n_outputs: int,
                context_names: Sequence[str] = (), *, mixed_precision: bool = False) -> keras.Model:
    """The model for ``cfg.architecture``: inputs named as :func:`input_names`, uint8
    ``(B, T, T, 3)`` each; output ``(B, n_outputs)`` sigmoid probabilities (float32 even
    under mixed precision)."""
    import keras
    from keras import layers

    arch = cfg.architecture
    if patch_size < MIN_SIZE[arch]:
        raise ConfigError(f"model.architecture: {arch} needs patches of at least "
                          f"{MIN_SIZE[arch]} px; the dataset has {patch_size} px")
    names = input_names(context_names if arch == "inceptionv3_multiscale" or context_names else ())
    if arch == "inceptionv3_multiscale" and len(names) < 2:
        raise ConfigError("model.architecture: inceptionv3_multiscale needs a dataset built with "
                          "context patches (hpcpath dataset build --context 4)")
    if arch != "inceptionv3_multiscale":
        names = names[:1]  # single-tower models read the main patch only
    inputs, feats = [], []
    for n in names:
        inp = keras.Input((patch_size, patch_size, 3), dtype="uint8", name=n)
        x = _preprocess(arch, inp, n)
        bb = (_small_cnn(patch_size, cfg.width, f"backbone_{n}") if arch == "small_cnn"
              else _application(arch, patch_size, f"backbone_{n}"))
        if cfg.weights and cfg.weights_for == "backbone":
            _load_weights(bb, cfg.weights, "backbone", arch)
        inputs.append(inp)
        feats.append(bb(x))
    x = feats[0] if len(feats) == 1 else layers.Concatenate(name="towers")(feats)
    if cfg.dropout:
        x = layers.Dropout(cfg.dropout, name="dropout")(x)
    x = layers.Dense(n_outputs, name="logits")(x)
    out = layers.Activation("sigmoid", dtype="float32", name="probs")(x)
    model = keras.Model(inputs if len(inputs) > 1 else inputs[0], out, name=arch)
    if cfg.weights and cfg.weights_for == "model":
        _load_weights(model, cfg.weights, "model", arch)
    return model


def backbones(model) -> list:
    return [layer for layer in model.layers if layer.name.startswith("backbone_")]


def set_phase(model, phase: str, trainable_layers: int | str = "all") -> None:
    """``head``: backbones frozen (BatchNorm in inference mode), only the new head trains.
    ``finetune``: backbones trainable, all of them or only their top ``trainable_layers``."""
    for bb in backbones(model):
        if phase == "head":
            bb.trainable = False
            continue
        bb.trainable = True
        weighted = [layer for layer in bb.layers if layer.weights]
        n = len(weighted) if trainable_layers == "all" else int(trainable_layers)
        for i, layer in enumerate(weighted):
            layer.trainable = i >= len(weighted) - n
