"""The data world: procedurally generated scenes, their questions and answers, the splits.

Each scene is a handful of coloured shapes on a neutral background. From a scene we render an RGB
image and ask short questions of graded difficulty; everything is deterministic from an integer
seed, so a split is just a range of seeds and needs no data files.

    from roe_core.scenes import make_split, render
    samples = make_split("train", 1000)
    img = render(samples[0].scene, size=256)
    python -m roe_core.scenes --help

    scene.py      the vocabulary (shapes, colours, sizes, backgrounds), the scene data, random_scene
    rendering.py  render, padded_xy, patch_labels, jpeg
    asking.py     the question types and DIFFICULTY, ask, askable, describe
    splits.py     Sample, make_sample, split seeds (SPLIT_BASE, SPLIT_SPAN), make_split, WORLD_VERSION
    shifted.py    the shifted split: RenderStyle, render_styled, shift_question, make_shifted_split
    answers.py    normalise_answer, answers_match
    targets.py    scene_targets: vision-encoder targets
    export.py     LLaVA-style export (to_llava_records, export_llava_json), preview_grid
    cli.py        main (python -m roe_core.scenes)
    questions.py  the question sets the benchmark and the analyses ask (test, shifted, LLaVA JSON)

This package re-exports the public names of all of them.
"""
from .scene import *  # noqa: F401,F403
from .rendering import *  # noqa: F401,F403
from .asking import *  # noqa: F401,F403
from .splits import *  # noqa: F401,F403
from .shifted import *  # noqa: F401,F403
from .answers import *  # noqa: F401,F403
from .targets import *  # noqa: F401,F403
from .export import *  # noqa: F401,F403
from .cli import *  # noqa: F401,F403
from .cli import main  # noqa: F401
from .questions import Question, load_llava_questions, shifted_questions, test_questions, wide_questions  # noqa: F401,E402
