"""Typed, frozen configs, validated in one place.

Precedence, everywhere: explicit argument (CLI flag, API keyword) > user YAML file > packaged
default.  A YAML file may hold the options at top level or under the section's name
(``tile:``), so one file can configure several stages.  Every validation problem becomes a
one-line ``ConfigError`` naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpcpath.errors import ConfigError

__all__ = ["TileConfig", "DatasetConfig", "InferConfig", "ServeConfig", "AugmentConfig", "SplitConfig",
           "TrainConfig", "load_model", "read_yaml", "describe_error"]

M = TypeVar("M", bound=BaseModel)



# A dataset or prediction name is a folder (Zarr group) inside every store: one component,
# never "." or ".." or hidden, never an option-like "-x".
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"

class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)  # validators built on first use


class TileConfig(_Frozen):
    """How slides become stores.  Field docs double as the CLI help."""

    tile_size: int = Field(256, ge=16, le=4096, description="tile edge in output pixels")
    overlap: int = Field(0, ge=0, description="pixels shared by neighbouring tiles")
    level: int | None = Field(None, ge=0, description="pyramid level to tile [0]")
    mpp: float | None = Field(None, gt=0, description="target microns per pixel (instead of level; resamples)")
    default_mpp: float | None = Field(
        None, gt=0, description="MPP to assume for slides whose header has none"
    )
    tissue_threshold: float = Field(
        0.5, ge=0, le=1, description="minimum tissue fraction for a tile to be kept"
    )
    tissue_method: Literal["saturation", "od"] = Field(
        "saturation", description="tissue detector: HSV saturation or optical density")
    mask_mpp: float = Field(8.0, gt=0, description="microns per tissue-mask pixel")
    mask_downsample: float = Field(
        32.0, ge=1, description="mask downsample for slides without MPP"
    )
    codec: Literal["blosc-lz4", "blosc-zstd", "jpeg", "none"] = Field(
        "blosc-lz4", description="tile array codec")
    jpeg_quality: int = Field(90, ge=1, le=100, description="quality for codec jpeg")
    passthrough: Literal["auto", "never"] = Field(
        "auto", description="auto: where the slide's native tiles are JPEG / JPEG 2000 and the tile "
        "grid is theirs, store their bytes unchanged (no decode, no re-encode; codec is then "
        "ignored); never: always decode and encode with codec",
    )
    chunk_tiles: int = Field(64, ge=1, description="tiles per Zarr chunk of the tile array")
    tiles_per_task: int = Field(256, ge=1, description="tiles one Dask task reads and writes")
    pyramid: bool = Field(True, description="write the OME-NGFF overview pyramid")
    pyramid_downsample: float = Field(
        4.0, ge=1, description="level-0 downsample of the pyramid's finest level"
    )
    reader: Literal["auto", "openslide", "direct"] = Field("auto", description="pixel reader")
    record_paths: bool = Field(
        True, description="keep each slide's path as given in the manifest; false keeps only its "
        "file name (a path can identify a patient; later stages then need --slides)",
    )

    @model_validator(mode="after")
    def _check(self) -> TileConfig:
        if self.overlap >= self.tile_size:
            raise ValueError("overlap must be smaller than tile_size")
        if self.level is not None and self.mpp is not None:
            raise ValueError("give level or mpp, not both")
        if self.codec == "jpeg":
            if self.tile_size % 16:
                raise ValueError("the jpeg codec needs tile_size to be a multiple of 16")
            if self.chunk_tiles * self.tile_size > 65500:
                raise ValueError("jpeg chunks are limited to 65500 px: lower chunk_tiles")
        if self.tiles_per_task % self.chunk_tiles:
            raise ValueError("tiles_per_task must be a multiple of chunk_tiles")
        return self

    @property
    def stride(self) -> int:
        return self.tile_size - self.overlap

    def params_key(self) -> str:
        """Digest of every option that changes a store's content (not how work is split)."""
        content = self.model_dump(exclude={"tiles_per_task", "reader", "record_paths"})
        blob = json.dumps(content, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: Any) -> TileConfig:
        data, prefix = read_yaml(path, section="tile") if path else ({}, "")
        explicit = {k: v for k, v in overrides.items() if v is not None}
        data.update(explicit)
        return load_model(cls, data, source=str(path) if path else "tile options", prefix=prefix)


class AugmentConfig(_Frozen):
    """Colour and geometry augmentation (the CAMELYON / mitosis training recipes)."""

    rotate90: bool = True
    flip: bool = True
    brightness: float = Field(64 / 255, ge=0, le=1, description="max additive brightness shift")
    saturation: tuple[float, float] = (0.75, 1.0)
    hue: float = Field(0.04, ge=0, le=0.5, description="max hue shift")
    contrast: tuple[float, float] = (0.5, 1.0)


class SplitConfig(_Frozen):
    """Train/val/test assignment by slide (or patient), stratified, seeded."""

    by: Literal["slide", "patient"] = "slide"
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    patient_table: str | None = Field(None, description="CSV slide_id -> patient_id")
    stratify: bool = Field(True, description="balance slides with/without positives")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        if any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError("fractions must be three non-negative numbers summing to 1")
        if self.by == "patient" and not self.patient_table:
            raise ValueError("split by patient needs patient_table")
        return self


CAMELYON_GROUPS = {"_0": "Tumor", "_1": "Tumor", "_2": "Exclusion", "metastases": "Tumor"}


class DatasetConfig(_Frozen):
    """How slide stores plus annotations become a labelled patch dataset."""

    name: str = Field("tumor", pattern=NAME_PATTERN, description="dataset name in the stores")
    rule: Literal["centre", "fraction", "points"] = Field("centre", description="labelling rule")
    classes: tuple[str, ...] = Field(
        ("Tumor",), description="annotation classes counted as positive (masks: any value > 0)"
    )
    label_map: dict[str, str] = Field(
        default_factory=lambda: dict(CAMELYON_GROUPS),
        description="annotation labels renamed before anything else (default: CAMELYON16 groups "
        "_0/_1 -> Tumor, _2 -> Exclusion; CAMELYON17 metastases -> Tumor)",
    )
    exclude_classes: tuple[str, ...] = Field(
        ("Exclusion",), description="classes whose regions are cut out of the positive area"
    )
    unclassified: Literal["auto", "positive", "ignore"] = Field(
        "auto", description="objects with no class (QuPath 'Unclassified', ASAP group None, a CSV "
        "without labels): auto = positive only in files where nothing has a class"
    )
    ignore_unknown_classes: bool = Field(
        True, description="other annotation classes are ignored (False: an error)"
    )
    centre_fraction: float = Field(50 / 80, gt=0, le=1, description="centre square / patch side")
    fraction_threshold: float = Field(0.5, ge=0, le=1, description="fraction rule: positive at >=")
    label_downsample: float | None = Field(
        None, ge=1, description="level-0 px per label-raster px (default: the tile's own pixel, "
        "so the centre rule is exact to one tile pixel at any level-0 resolution)"
    )
    context_downsamples: tuple[float, ...] = Field(
        (), description="extra patches centred on the same point, this many times coarser"
    )
    # point rule (mitoses)
    jitter_px: float = Field(0.0, ge=0, description="max shift of positive centres, level-0 px")
    rotations: Literal[0, 4] = Field(0, description="points rule: 4 quarter-turn copies per positive")
    n_per_point: int = Field(1, ge=1)
    min_distance_px: float = Field(60.0, gt=0, description="negatives' distance at 0.25 um/px")
    negatives_per_positive: float | None = Field(
        None, ge=0, description="subsample negatives to this ratio (seeded); None keeps all"
    )
    negatives_per_slide: int = Field(200, ge=0, description="points rule: negative patches per slide")
    split: SplitConfig = SplitConfig()
    seed: int = Field(0, description="seed of the negatives, jitter and balancing draws")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: Any) -> DatasetConfig:
        data, prefix = read_yaml(path, section="dataset") if path else ({}, "")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return load_model(cls, data, source=str(path) if path else "dataset options", prefix=prefix)


# ---------------------------------------------------------------- training (hpcpath.train)
ARCHITECTURES = ("small_cnn", "resnet50", "inceptionv3", "inceptionv3_multiscale", "densenet121")


class ModelConfig(_Frozen):
    """Which network, from which local weights, and how much of it to fine-tune."""

    architecture: Literal["small_cnn", "resnet50", "inceptionv3", "inceptionv3_multiscale", "densenet121"] = "small_cnn"
    weights: str | None = Field(None, description="local weights file (no download): a Keras "
                                "applications no-top .h5 for the backbone, or .weights.h5 of the whole model")
    weights_for: Literal["backbone", "model"] = "backbone"
    trainable_layers: int | Literal["all"] = Field(
        "all", description="fine-tune phase: top N backbone layers trainable")
    dropout: float = Field(0.0, ge=0, lt=1)
    width: int = Field(32, ge=4, le=512, description="small_cnn: filters of the first block")


class OptimizerConfig(_Frozen):
    """Optimizer and learning-rate schedule: linear warmup, then reduce-on-plateau."""

    name: Literal["adam", "sgd"] = "adam"
    learning_rate: float = Field(1e-3, gt=0, description="per-rank rate; scaled by ranks")
    scale_by_ranks: bool = True
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only (Nesterov)")
    nesterov: bool = True
    weight_decay: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    plateau_patience: int = Field(2, ge=1, description="epochs without val_loss improvement")
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    min_learning_rate: float = Field(1e-6, ge=0)


class MiningConfig(_Frozen):
    """Hard-negative mining: score train negatives with the current model and oversample those
    scored above ``threshold`` into the following epochs."""

    enabled: bool = False
    start_epoch: int = Field(1, ge=0, description="first epoch (0-based) trained with mined negatives")
    every: int = Field(1, ge=1, description="re-mine every N epochs")
    threshold: float = Field(0.5, ge=0, le=1)
    oversample: int = Field(3, ge=1, description="extra copies of each hard negative per epoch")
    max_items: int | None = Field(None, ge=1, description="keep at most the N highest-scored")


class TrainConfig(_Frozen):
    """A training run (``hpcpath train``); the same config runs under every engine."""

    dataset: str = Field(description="dataset manifest (hpcpath dataset build / images)")
    out: str = Field(description="run folder: checkpoints, history.csv, tensorboard/, model/")
    engine: Literal["single", "horovod", "tf-distribute"] = "single"
    classes: tuple[str, ...] | None = Field(None, description="label columns to train (default: all)")
    train_split: Literal["train", "val", "test"] = "train"
    val_split: Literal["train", "val", "test"] | None = "val"
    context: bool = Field(False, description="feed the dataset's context patches (multi-scale)")
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    epochs: int = Field(10, ge=1, description="total epochs, both phases")
    head_epochs: int = Field(0, ge=0, description="phase 1: train the new head only, backbone frozen")
    fine_tune_learning_rate: float | None = Field(None, gt=0, description="phase 2 rate (default: learning_rate)")
    batch_size: int = Field(64, ge=1, description="per rank")
    steps_per_epoch: int | None = Field(None, ge=1, description="default: one pass over the epoch's items")
    balance: float | None = Field(1.0, ge=0, description="negatives per positive, resampled each epoch; null keeps all")
    augment: bool = True
    augmentation: AugmentConfig = AugmentConfig()
    jpeg_decode: Literal["reader", "tf"] = Field(
        "reader", description="where passthrough stores' JPEG tiles are decoded: reader (NumPy, "
        "one thread) or tf (tf.io.decode_jpeg in a parallel tf.data map on all cores); tf needs "
        "passthrough JPEG stores and no context patches",
    )
    mixed_precision: bool = Field(True, description="float16 compute on GPUs (never on CPU)")
    xla: bool = Field(False, description="compile each step with XLA (jit_compile; mostly a GPU speed-up)")
    gpu: Literal["require", "prefer", "off"] = Field(
        "prefer", description="GPUs given but TensorFlow sees none: require = one-line error, "
        "prefer = warning and CPU, off = CPU on purpose (hpcpath.gpu)")
    hard_negatives: str | None = Field(None, description="file from `hpcpath mine` to oversample")
    mining: MiningConfig = MiningConfig()
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint mid-epoch")
    keep_checkpoints: int = Field(2, ge=1)
    tensorboard: bool = True
    audit: bool = Field(False, description="per-rank log of weight checksum and data digest per step")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.head_epochs >= self.epochs and self.head_epochs:
            raise ValueError("head_epochs must be smaller than epochs (phase 2 needs an epoch)")
        if self.jpeg_decode == "tf" and self.context:
            raise ValueError("jpeg_decode: tf serves main patches only; context patches need reader")
        if self.model.architecture == "inceptionv3_multiscale" and not self.context:
            raise ValueError("model.architecture inceptionv3_multiscale needs context: true")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """From a YAML file (top level or under ``train:``), with dotted-key overrides
        (``{"optimizer.learning_rate": 0.01}``) applied on top; a None value sets the key to
        null (``-s balance=null``), so callers pass only the overrides they mean."""
        data, prefix = read_yaml(path, section="train") if path else ({}, "")
        for key, value in (overrides or {}).items():
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part, {}), dict):
                    raise ConfigError(f"{prefix}{key}: {part} is not a section", path or "train options")
                node = node.setdefault(part, {})
            node[leaf] = value
        try:
            return cls.model_validate(data)
        except ValidationError as exc:  # one line; did-you-mean against the nested section's keys
            errors = exc.errors(include_url=False)
            section: Any = cls
            for loc in errors[0]["loc"][:-1]:
                field = getattr(section, "model_fields", {}).get(loc)
                section = field.annotation if field is not None else None
            known = sorted(getattr(section, "model_fields", {}))
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ConfigError(describe_error(errors[0], known, prefix) + more,
                              str(path) if path else "train options") from None


class InferConfig(_Frozen):
    """How a model runs over slide stores (``hpcpath infer``).  Sizes in patch pixels unless
    they say level-0; field docs double as the CLI help."""

    name: str | None = Field(
        None, pattern=NAME_PATTERN,
        description="name of the predictions in the stores, predictions/<name> [the dataset the model "
        "was trained on, e.g. tumor; else the model folder's name]",
    )
    mode: Literal["window", "two-stage"] = Field(
        "window", description="sliding window, or nucleus proposals + patch classification (points models)"
    )
    stride: int | None = Field(
        None, ge=1, description="window stride in patch pixels (default: the store's tile stride)"
    )
    batch_size: int = Field(64, ge=1, le=4096, description="patches per model call")
    tta: bool = Field(False, description="average the 8 dihedral transforms of every patch")
    tissue_threshold: float | None = Field(
        None, ge=0, le=1,
        description="minimum tissue fraction of a window (default: the store's; two-stage: any tissue)",
    )
    windows_per_task: int = Field(
        8192, ge=1, description="windows one task predicts; bigger slides are split by rows"
    )
    prefetch: int = Field(3, ge=1, le=64, description="batches read ahead of the model")
    threshold: float = Field(0.5, ge=0, le=1, description="score a detection needs")
    merge: Literal["nms", "dbscan"] = Field(
        "nms", description="how nearby hits become one detection"
    )
    radius_px: float = Field(32.0, gt=0, description="merge radius, level-0 pixels")
    smooth_sigma: float = Field(1.0, ge=0, description="heatmap smoothing to place peaks, in windows")
    top_k: int = Field(10, ge=1, description="windows in the top-k mean of the summary")
    score_class: str | None = Field(None, description="class whose probability is the score (default: last)")
    proposal_sigma_um: float = Field(1.0, gt=0, description="two-stage: blob smoothing, microns")
    proposal_threshold: float = Field(
        0.05, gt=0, description="two-stage: smoothed haematoxylin density (rgb2hed) a candidate needs"
    )
    proposal_min_distance_um: float = Field(4.0, gt=0, description="two-stage: candidates' spacing, microns")
    gpu: Literal["require", "prefer", "off"] = Field(
        "prefer", description="require: a GPU resource per task and a GPU TensorFlow sees (else a one-line "
        "error); prefer: GPUs when the workers have them (a warning when TensorFlow sees none); off: CPU")
    mixed_precision: bool = Field(False, description="float16 compute on GPUs (CPU stays float32)")
    xla: bool = Field(False, description="compile the model's forward pass with XLA")

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu_bool(cls, v: Any) -> Any:
        """``gpu: true/false`` (older configs) mean require / off."""
        return {True: "require", False: "off"}.get(v, v) if isinstance(v, bool) else v

    def params_key(self, model_digest: str) -> str:
        """Digest of the model and every option that changes the outputs."""
        content = self.model_dump(exclude={"prefetch", "gpu", "xla"})
        blob = json.dumps({"model": model_digest, **content}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **overrides: Any) -> InferConfig:
        data, prefix = read_yaml(path, section="infer") if path else ({}, "")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return load_model(cls, data, source=str(path) if path else "infer options", prefix=prefix)


class ServeConfig(_Frozen):
    """``hpcpath serve``: where it listens and what it accepts.  Loopback unless ``host``
    says otherwise; ``roots`` are the only folders ``POST /slides`` may name."""

    host: str = Field("127.0.0.1", min_length=1, description="address to listen on (loopback by default)")
    port: int = Field(8000, ge=1, le=65535)
    max_upload_mb: float = Field(8.0, gt=0, le=1024, description="largest request body, MiB (413 above)")
    max_batch: int = Field(256, ge=1, le=65536, description="most patches in one .npy upload")
    max_queue: int = Field(64, ge=1, description="slide jobs waiting at most (503 above)")
    roots: tuple[str, ...] = Field((), description="folders POST /slides may read slides and stores from")
    out: str | None = Field(None, description="folder for slide jobs' outputs (default: a new temp folder)")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    @property
    def loopback(self) -> bool:
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @classmethod
    def load(cls, **overrides: Any) -> ServeConfig:
        return load_model(cls, {k: v for k, v in overrides.items() if v is not None}, source="serve options")

def read_yaml(path: str | os.PathLike, section: str | None = None) -> tuple[dict[str, Any], str]:
    """The mapping in a YAML file, and the key prefix for messages.

    When the file has a ``section`` mapping (``tile:``, ``cluster:``), that sub-mapping is
    returned with prefix ``"section."`` so errors name the key as the user wrote it.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", p) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config: {exc.strerror or exc}", p) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"invalid YAML{where}: {problem}", p) from None
    if data is None:
        return {}, ""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of option: value, got {type(data).__name__}", p)
    if section and section in data:
        sub = data[section]
        if not isinstance(sub, dict):
            raise ConfigError(f"{section}: expected a mapping, got {type(sub).__name__}", p)
        return dict(sub), f"{section}."
    return data, ""


def describe_error(err: Mapping[str, Any], known: list[str] | None = None, prefix: str = "") -> str:
    """One pydantic error as ``key: message`` on one line, with a did-you-mean for typos."""
    loc = [str(x) for x in err["loc"]]
    key = prefix + ".".join(loc)
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        close = get_close_matches(loc[-1], known or [], n=1) if loc else []
        msg = f"unknown option (did you mean {close[0]!r}?)" if close else "unknown option"
    elif kind == "missing":
        msg = "required"
    else:
        msg = msg.removeprefix("Value error, ")
    return f"{key}: {msg}" if key else msg


def load_model(cls: type[M], data: dict[str, Any], source: str, prefix: str = "") -> M:
    """Validate ``data`` into ``cls`` or raise a one-line ConfigError naming ``source``."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(describe_error(errors[0], sorted(cls.model_fields), prefix) + more, source) from None
