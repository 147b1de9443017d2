"""The command line (python -m roe_core.scenes): export a split as LLaVA JSON, save a preview grid.

    python -m roe_core.scenes --split train --n 100 --out data/scenes
    python -m roe_core.scenes --preview preview.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .export import export_llava_json, preview_grid
from .splits import SPLIT_BASE, make_sample, split_seeds


# -----------------------------------------------------------------------------
# CLI


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Procedural shapes world: LLaVA-style export and previews.")
    p.add_argument("--split", default="train", choices=tuple(SPLIT_BASE))
    p.add_argument("--n", type=int, default=100, help="number of samples to export")
    p.add_argument("--out", default=None, help="export dir: writes <out>/<split>.json and <out>/images/")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--preview", default=None, help="save a grid of rendered scenes with Q/A to this PNG")
    p.add_argument("--preview-n", type=int, default=6)
    args = p.parse_args(argv)
    if args.out is None and args.preview is None:
        p.error("nothing to do: pass --out and/or --preview")
    if args.out is not None:
        path = export_llava_json(args.split, args.n, args.out, args.image_size)
        print(f"wrote {args.n} samples to {path} (images in {Path(args.out) / 'images'})")
    if args.preview is not None:
        samples = [make_sample(seed, n_turns=3) for seed in split_seeds(args.split, args.preview_n)]
        preview_grid(samples).save(args.preview)
        print(f"wrote preview to {args.preview}")


if __name__ == "__main__":
    main()
