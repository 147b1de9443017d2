"""The benchmark: every system on the same test split, timings interleaved in one run.

    python -m roe_core.bench [--quick] [--systems dense,roe,moe_llava]

Defined in `run.py`; this package re-exports its public names.
"""
from .run import *  # noqa: F401,F403
from .run import main  # noqa: F401
