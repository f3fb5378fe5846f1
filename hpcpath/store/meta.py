"""Typed metadata of a slide store, as written in its Zarr attributes.

One dataclass per attribute document (docs/store-layout.md): ``StoreMeta`` (the root's
``attributes["hpcpath"]``: slide facts, tiling geometry, tissue mask), ``DatasetMeta``
(``datasets/<name>``'s ``attributes["hpcpath_dataset"]``) and ``PredictionsMeta``
(``predictions/<name>``'s ``attributes["hpcpath_predictions"]``).  ``to_dict`` gives the
JSON written on disk and ``from_dict`` reads it back; keys this version does not know are
kept in ``extra`` and written back unchanged, so the on-disk format stays open.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from hpcpath._version import __version__
from hpcpath.grid import WindowGrid
from hpcpath.io.slide import SlideInfo

__all__ = ["StoreMeta", "TilingMeta", "TissueMeta", "DatasetMeta", "PredictionsMeta", "slide_info"]

ROOT_ATTR = "hpcpath"
DATASET_ATTR = "hpcpath_dataset"
PREDICTIONS_ATTR = "hpcpath_predictions"


def slide_info(d: Mapping[str, Any]) -> SlideInfo:
    """A ``SlideInfo`` from its stored form (lists back to tuples)."""
    mpp = d.get("mpp")
    return SlideInfo(
        slide_id=str(d["slide_id"]),
        source_name=str(d["source_name"]),
        source_bytes=int(d.get("source_bytes") or 0),
        vendor=str(d.get("vendor") or ""),
        level_dimensions=tuple((int(w), int(h)) for w, h in d["level_dimensions"]),
        level_downsamples=tuple(float(x) for x in d["level_downsamples"]),
        mpp=None if mpp is None else (float(mpp[0]), float(mpp[1])),
        mpp_source=str(d.get("mpp_source") or "none"),
        objective_power=None if d.get("objective_power") is None else float(d["objective_power"]),
    )


def _split(cls: type, d: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(known fields, the rest) of a stored document, for ``cls``'s ``from_dict``."""
    names = {f.name for f in fields(cls)} - {"extra"}
    return ({k: v for k, v in d.items() if k in names},
            {k: v for k, v in d.items() if k not in names})


@dataclass(frozen=True)
class TilingMeta:
    """How the tiles were cut: every tile option as given (``options``, the TileConfig
    dump) plus the geometry resolved for this slide."""

    level: int
    downsample: float  # level-0 px per output px
    read_size: int  # px read at ``level`` per tile (== tile_size at native resolution)
    stride: int
    tile_mpp: float | None
    n_tiles: int
    n_grid_tiles: int
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def tile_size(self) -> int:
        return int(self.options["tile_size"])

    @property
    def codec(self) -> str:
        return str(self.options.get("codec", "blosc-lz4"))

    @property
    def tissue_threshold(self) -> float:
        return float(self.options["tissue_threshold"])

    @property
    def tile_side0(self) -> float:
        """Level-0 side of one tile."""
        return self.tile_size * self.downsample

    def to_dict(self) -> dict[str, Any]:
        return {**self.options, "level": self.level, "downsample": self.downsample,
                "read_size": self.read_size, "stride": self.stride, "tile_mpp": self.tile_mpp,
                "n_tiles": self.n_tiles, "n_grid_tiles": self.n_grid_tiles}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TilingMeta:
        known = ("level", "downsample", "read_size", "stride", "tile_mpp", "n_tiles", "n_grid_tiles")
        return cls(int(d["level"]), float(d["downsample"]), int(d["read_size"]), int(d["stride"]),
                   None if d.get("tile_mpp") is None else float(d["tile_mpp"]),
                   int(d["n_tiles"]), int(d["n_grid_tiles"]),
                   {k: v for k, v in d.items() if k not in known})


@dataclass(frozen=True)
class TissueMeta:
    method: str
    threshold: float
    downsample: tuple[float, float]  # level-0 px per mask px (x, y)
    fraction_rule: str = "mask pixels whose centre lies in the tile's level-0 box"

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "threshold": self.threshold,
                "downsample": list(self.downsample), "fraction_rule": self.fraction_rule}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TissueMeta:
        dx, dy = d["downsample"]
        return cls(str(d["method"]), float(d["threshold"]), (float(dx), float(dy)),
                   str(d.get("fraction_rule", cls.fraction_rule)))


@dataclass(frozen=True)
class StoreMeta:
    """A slide store's root attributes: what was tiled, how, and whether it is complete."""

    slide: SlideInfo
    tiling: TilingMeta
    tissue: TissueMeta
    params_key: str | None = None
    complete: bool = False
    version: str = __version__
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "version": self.version, "complete": self.complete,
                "params_key": self.params_key, "slide": self.slide.to_dict(),
                "tiling": self.tiling.to_dict(), "tissue": self.tissue.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StoreMeta:
        known, extra = _split(cls, d)
        return cls(slide=slide_info(known["slide"]), tiling=TilingMeta.from_dict(known["tiling"]),
                   tissue=TissueMeta.from_dict(known["tissue"]), params_key=known.get("params_key"),
                   complete=bool(known.get("complete")), version=str(known.get("version", "")),
                   extra=extra)

    @property
    def slide_id(self) -> str:
        return self.slide.slide_id

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel (x), or None."""
        return self.slide.mpp[0] if self.slide.mpp else None


@dataclass(frozen=True)
class DatasetMeta:
    """``datasets/<name>``: how its items were labelled and where their pixels are."""

    rule: str
    classes: tuple[str, ...]
    items: int
    positives: int
    source: str  # "tiles" (pixels in tiles/images) or "patches" (own images array)
    patch_size: int
    patch_downsample: float | None = None
    config: Mapping[str, Any] = field(default_factory=dict)  # the DatasetConfig dump
    label_downsample: float | None = None  # centre/fraction rules
    min_distance_px: float | None = None  # points rule
    complete: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)  # e.g. "mined"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"complete": self.complete, "rule": self.rule,
                             "classes": list(self.classes), "items": self.items,
                             "positives": self.positives, "source": self.source,
                             "patch_size": self.patch_size}
        if self.config:
            d["config"] = dict(self.config)
        for k in ("patch_downsample", "label_downsample", "min_distance_px"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return {**d, **self.extra}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DatasetMeta:
        known, extra = _split(cls, d)
        opt = {k: (None if known.get(k) is None else float(known[k]))
               for k in ("patch_downsample", "label_downsample", "min_distance_px")}
        return cls(rule=str(known["rule"]), classes=tuple(known.get("classes") or ()),
                   items=int(known["items"]), positives=int(known.get("positives", 0)),
                   source=str(known.get("source", "tiles")), patch_size=int(known["patch_size"]),
                   config=dict(known.get("config") or {}), complete=bool(known.get("complete")),
                   extra=extra, **opt)

    @property
    def context_downsamples(self) -> tuple[float, ...]:
        return tuple(float(r) for r in self.config.get("context_downsamples", ()))

    def replace(self, **changes: Any) -> DatasetMeta:
        return replace(self, **changes)


@dataclass(frozen=True)
class PredictionsMeta:
    """``predictions/<name>``: the window grid, the model, and (once complete) a summary."""

    name: str
    mode: str  # "window" or "two-stage"
    source: str  # "tiles" or "slide"
    params_key: str
    grid: WindowGrid
    model: Mapping[str, Any]
    config: Mapping[str, Any]
    classes: tuple[str, ...]
    score_channel: int
    label: str
    n_windows: int
    blocks: tuple[tuple[int, ...], ...]
    slide_id: str
    mpp: float | None = None
    tissue_mm2: float | None = None
    tissue_threshold: float | None = None
    context: Mapping[str, float] = field(default_factory=dict)  # input name -> coarser factor
    summary: Mapping[str, Any] = field(default_factory=dict)
    complete: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        """The model's task: "tiles", "points", ... ."""
        return str(self.model.get("task", ""))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            **self.extra, "name": self.name, "mode": self.mode, "source": self.source,
            "params_key": self.params_key, "grid": self.grid.to_dict(), "model": dict(self.model),
            "config": dict(self.config), "classes": list(self.classes),
            "score_channel": self.score_channel, "label": self.label, "context": dict(self.context),
            "n_windows": self.n_windows, "blocks": [list(b) for b in self.blocks],
            "slide_id": self.slide_id, "mpp": self.mpp, "tissue_mm2": self.tissue_mm2,
            "tissue_threshold": self.tissue_threshold, "complete": self.complete,
        }
        if self.summary:
            d["summary"] = dict(self.summary)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PredictionsMeta:
        known, extra = _split(cls, d)
        return cls(
            name=str(known.get("name", "")), mode=str(known["mode"]), source=str(known["source"]),
            params_key=str(known.get("params_key", "")), grid=WindowGrid(**known["grid"]),
            model=dict(known.get("model") or {}), config=dict(known.get("config") or {}),
            classes=tuple(known.get("classes") or ()), score_channel=int(known["score_channel"]),
            label=str(known.get("label", "")), n_windows=int(known["n_windows"]),
            blocks=tuple(tuple(int(x) for x in b) for b in known.get("blocks") or ()),
            slide_id=str(known.get("slide_id", "")), mpp=known.get("mpp"),
            tissue_mm2=known.get("tissue_mm2"), tissue_threshold=known.get("tissue_threshold"),
            context=dict(known.get("context") or {}), summary=dict(known.get("summary") or {}),
            complete=bool(known.get("complete")), extra=extra,
        )

    def replace(self, **changes: Any) -> PredictionsMeta:
        return replace(self, **changes)
