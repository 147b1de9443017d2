"""What an inspector of RoE asks next, computed (no UI code; app/ draws it):

    atlas.py     every route a question set takes, clustered by Hamming distance, skip rates per type
    sweep.py     the router threshold swept: accuracy against layers executed and measured speed
    fidelity.py  how far each skipped layer's adapter is from the layer, and the dense twin's divergence
    batching.py  a batch of mixed routes: per-example routing against the union rule and dense, timed
    experts.py   the MoE systems' expert statistics: load per modality, rigidity, similarity, uniformity
    evaluate.py  answering a question set, the same way for every system (bench, recipe, views)
"""
from .batching import Composition, compare_batching  # noqa: F401
from .atlas import Atlas, AtlasEntry, build_atlas, hamming_order  # noqa: F401
from .fidelity import Fidelity, adapter_fidelity  # noqa: F401
from .sweep import SweepPoint, sweep_fixed, sweep_thresholds  # noqa: F401
from .evaluate import evaluate, teacher_forced  # noqa: F401
from .experts import js_divergence, modality_shares, rigidity  # noqa: F401
