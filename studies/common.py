"""What the studies share beyond `benchmarks.common` (result files, tables, figures, the bare
Trainer): their results folder, the title line of their reports, and the ring of 8 Gaussians."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from benchmarks.common import ROOT, command_line

RESULTS = os.path.join(ROOT, "studies", "results")


def report_title(name: str, quick: bool = False) -> str:
    """The first line of a study's Markdown report: its name and the command that wrote it."""
    return f"# {name}{' (quick)' if quick else ''}: {command_line()}"


def add_seed_arguments(parser: Any, quick_epochs: int, quick_note: str = "") -> None:
    """--quick (seed 0 and `quick_epochs` epochs), --seeds (default 0 1 2) and --epochs (default:
    the config's): the options of the studies that train a config on several seeds."""
    parser.add_argument("--quick", action="store_true", help=f"1 seed and {quick_epochs} epochs{quick_note}")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; quick: 0)")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default: the config's; quick: {quick_epochs})")


def seeds_and_epochs(args: Any, quick_epochs: int, config_epochs: int) -> tuple[list[int], int]:
    """The seeds and epochs that `add_seed_arguments`'s options ask for."""
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    return seeds, args.epochs or (quick_epochs if args.quick else config_epochs)


def ring_points(centers: Any, std: float, n: int, seed: int) -> Any:
    """n points of a Gaussian mixture with equal weights (the ring's `centers`, (K, 2), and `std`),
    drawn with `seed`: (n, 2)."""
    import torch

    from datamodules.toy2d import sample_mixture

    return sample_mixture(centers, std, n, torch.Generator().manual_seed(seed)).tensors[0]


def draw_ring_panel(ax: Any, point_sets: Sequence[tuple[Sequence[Sequence[float]], str | None]],
                    centers: Sequence[Sequence[float]], title: str) -> None:
    """One square panel of 2-D points on [-3, 3]^2 (the ring of 8 Gaussians has radius 2): each
    (points, label) set as a scatter (non-finite points dropped), the mixture centres as red
    crosses, and the title."""
    for points, label in point_sets:
        finite = [p for p in points if all(map(math.isfinite, p))]
        if finite:
            ax.scatter(*zip(*finite), s=2, alpha=0.4, label=label)
    ax.scatter(*zip(*centers), s=14, c="red", marker="x")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
