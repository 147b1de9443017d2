"""Vision-encoder targets: per-cell shape, colour, size and joint-class labels and global counts
of a scene, for pretraining a vision encoder."""

from __future__ import annotations

from .scene import COLOURS, GRID, SHAPES, SIZES, Scene, cell_of


# -----------------------------------------------------------------------------
# vision-encoder targets


N_CELL_CLASSES = 1 + len(SHAPES) * len(COLOURS) * len(SIZES)  # 49


def scene_targets(scene: Scene) -> dict:
    """Direct supervision targets for pretraining a vision encoder.

    Cells: GRID x GRID (4x4) over the image, row-major from the top-left,
    index = row * GRID + col; an object belongs to the cell containing its
    centre (random_scene guarantees at most one per cell; for hand-made scenes
    the last object in scene.objects wins).

    Per-cell lists (length GRID*GRID, 0 always means "empty"):
      cell_shape   0 empty, 1 circle, 2 square, 3 triangle, 4 cross   (1 + SHAPES index)
      cell_colour  0 empty, 1 red, 2 green, 3 blue, 4 yellow, 5 purple, 6 orange  (1 + COLOURS index)
      cell_size    0 empty, 1 small, 2 large                          (1 + SIZES index)
      cell_class   0 empty, else 1 + (shape_i * len(COLOURS) + colour_i) * len(SIZES) + size_i
                   (joint class, 1..48; N_CELL_CLASSES = 49)
    Global counts:
      shape_counts  [count per SHAPES], colour_counts [per COLOURS], size_counts [per SIZES]
      n_objects     int
    """
    k = GRID * GRID
    t = {"cell_shape": [0] * k, "cell_colour": [0] * k, "cell_size": [0] * k, "cell_class": [0] * k}
    for o in scene.objects:
        row, col = cell_of(o.x, o.y)
        i = row * GRID + col
        si, ci, zi = SHAPES.index(o.shape), COLOURS.index(o.colour), SIZES.index(o.size)
        t["cell_shape"][i] = 1 + si
        t["cell_colour"][i] = 1 + ci
        t["cell_size"][i] = 1 + zi
        t["cell_class"][i] = 1 + (si * len(COLOURS) + ci) * len(SIZES) + zi
    t["shape_counts"] = [sum(o.shape == s for o in scene.objects) for s in SHAPES]
    t["colour_counts"] = [sum(o.colour == c for o in scene.objects) for c in COLOURS]
    t["size_counts"] = [sum(o.size == z for o in scene.objects) for z in SIZES]
    t["n_objects"] = len(scene.objects)
    return t
