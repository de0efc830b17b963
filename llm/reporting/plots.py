"""Training curves as PNG files, drawn from a stage's TensorBoard logs.

matplotlib's Figure API draws straight to a file through the Agg renderer: no display, no pyplot
state, and no global backend switch that would upset a notebook importing this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from llm.reporting.curves import read_scalars


def stage_curves(tensorboard_dir: str | Path, tags: Sequence[str]) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} for the tags the logs hold (tags without points are left out)."""
    curves = {tag: read_scalars(tensorboard_dir, tag) for tag in tags}
    return {tag: points for tag, points in curves.items() if points}


def plot_curves(curves: dict[str, dict[int, float]], out: str | Path, title: str) -> Path:
    """One panel per tag, side by side, written to `out` (a .png)."""
    if not curves:
        raise ValueError(f"no curves to draw for {title!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(4.5 * len(curves), 3.2))
    axes = fig.subplots(1, len(curves), squeeze=False)
    for ax, (tag, points) in zip(axes[0], curves.items()):
        ax.plot(list(points), list(points.values()), marker="." if len(points) < 30 else None)
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out
