"""PNG heatmap of a CKA matrix (matplotlib imported lazily: an optional heavy package)."""
from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.cka.estimators import F64
from scd.core.results import atomic_write_bytes


def plot_cka_heatmap(matrix, path: str | Path, title: str = "CKA", *,
                     xlabel: str = "teacher layer", ylabel: str = "student layer",
                     xticklabels: Sequence[Any] | None = None, yticklabels: Sequence[Any] | None = None,
                     annotate: bool | None = None, dpi: int = 150) -> Path:
    """Write a PNG heatmap of a [rows, cols] CKA matrix (rows = y axis = student / model A).

    Colour scale fixed to [0, 1] with a colour bar; layer 0 at the bottom-left so matched
    layers run along the rising diagonal; values printed in the cells when the matrix is
    small (<= 12 x 12) unless ``annotate`` says otherwise.  Written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    M = torch.as_tensor(matrix, dtype=F64).cpu()
    if M.ndim != 2 or M.numel() == 0:
        raise ValueError(f"CKA matrix must be a non-empty 2-D array, got shape {tuple(M.shape)}")
    R, C = M.shape
    xt = list(xticklabels) if xticklabels is not None else list(range(C))
    yt = list(yticklabels) if yticklabels is not None else list(range(R))
    if len(xt) != C or len(yt) != R:
        raise ValueError(f"tick labels ({len(yt)} rows, {len(xt)} cols) do not match the matrix {R}x{C}")
    w = min(14.0, max(4.5, 0.35 * C + 2.5))
    h = min(12.0, max(3.8, 0.35 * R + 1.5))
    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(M.numpy(), vmin=0.0, vmax=1.0, cmap="magma", origin="lower", aspect="auto",
                   interpolation="nearest")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("CKA")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    step_x, step_y = max(1, math.ceil(C / 16)), max(1, math.ceil(R / 16))
    ax.set_xticks(range(0, C, step_x), [str(t) for t in xt[::step_x]])
    ax.set_yticks(range(0, R, step_y), [str(t) for t in yt[::step_y]])
    if annotate is None:
        annotate = R <= 12 and C <= 12
    if annotate:
        for i in range(R):
            for j in range(C):
                v = float(M[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
