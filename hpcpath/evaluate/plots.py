"""PNG plots of ROC, FROC and F1-versus-threshold curves.

matplotlib is imported inside each function, and only its object-oriented ``Figure`` is used
(no pyplot, no global backend switch), so importing this module costs nothing, needs no
display, and never changes the caller's matplotlib state.  Each PNG is written to a temporary
name and renamed, so a killed job never leaves a half-written image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hpcpath.evaluate.detection import ThresholdResult
from hpcpath.evaluate.froc import FROCResult
from hpcpath.evaluate.roc import roc_auc, roc_curve
from hpcpath.files import atomic_file

__all__ = ["plot_roc", "plot_froc", "plot_f1_threshold"]


def _figure(title: str | None):
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_subplot()
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_file(path, error="cannot write the plot ({reason})") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def plot_roc(y_true, scores, path, names: Sequence[str] | None = None, title=None) -> Path:
    """ROC curve(s) with AUC in the legend; a 2-D ``y_true`` plots one curve per class.

    Classes with a single label value have no ROC and are left out.
    """
    Y, S = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if Y.ndim == 1:
        Y, S = Y[:, None], S[:, None]
    names = [str(i) for i in range(Y.shape[1])] if names is None else list(names)
    fig, ax = _figure(title or "ROC")
    for j, name in enumerate(names):
        y = Y[:, j].astype(bool)
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, S[:, j])
        label = f"AUC {roc_auc(y, S[:, j]):.3f}"
        ax.plot(fpr, tpr, label=label if Y.shape[1] == 1 else f"{name}: {label}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_froc(result: FROCResult, path, title=None) -> Path:
    """The FROC curve on a log FP axis, with the six scored points marked."""
    fig, ax = _figure(title or f"FROC (score {result.score:.3f})")
    fps, sens = result.curve["fps_per_slide"], result.curve["sensitivity"]
    shown = fps > 0
    ax.plot(fps[shown], sens[shown], label="curve")  # linear, as the score interpolates
    ax.plot(result.fp_rates, result.sensitivity, "o", label="scored points")
    ax.set_xscale("log")
    ax.set(xlabel="average false positives per slide", ylabel="sensitivity", ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_f1_threshold(result: ThresholdResult, path, title=None) -> Path:
    """Precision, recall and F1 against the score threshold, best threshold marked."""
    fig, ax = _figure(title or f"best F1 {result.f1:.3f} at {result.threshold:.3g}")
    c = result.curve
    for key in ("precision", "recall", "f1"):
        ax.plot(c["threshold"], c[key], label=key)
    ax.axvline(result.threshold, ls="--", c="grey", lw=0.8)
    ax.set(xlabel="score threshold", ylabel="value", ylim=(0, 1.02))
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)
