"""The data world: procedurally generated scenes, their questions and answers, the splits.

    from roe_core.scenes import make_split, render
    python -m roe_core.scenes --help

Everything is defined in `world.py`; this package re-exports its public names.
"""
from .world import *  # noqa: F401,F403
from .world import main  # noqa: F401
from .questions import Question, load_llava_questions, shifted_questions, test_questions  # noqa: F401,E402
