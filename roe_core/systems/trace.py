"""What every system's trace offers, so the app and the bench never switch on a system's name or type.

    ans = pipe.answer(image, question)
    ans.trace.layers_executed, ans.trace.num_layers, ans.trace.active_params
    ans.trace.summary()          # "19 of 30 layers ran, 11 adapters stood in"
    ans.trace.to_dict()          # JSON-ready
    ans.trace.views              # what else it offers: "route" (RouteTrace), "experts" (ExpertTrace)

Each system's trace is a dataclass in the system's own file (DenseTrace, RouteTrace, ExpertTrace);
`active_params` (parameters one token touched, vision side included) is filled in by the pipeline
that answered, from its `parameter_counts`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Trace(Protocol):
    views: tuple[str, ...]          # extra views this trace supports ("route", "experts"); () for none
    new_tokens: int                 # tokens generated
    active_params: int              # parameters one token touched on this answer (0: not counted)

    @property
    def num_layers(self) -> int: ...          # decoder layers of the base

    @property
    def layers_executed(self) -> int: ...     # decoder layers this answer ran (per token)

    def summary(self) -> str: ...             # one line for the chat's route block

    def to_dict(self) -> dict: ...            # JSON-ready, with layers_executed and num_layers


class LayerRoute:
    """What a trace with a `route` (per decoder layer: True = ran, False = its adapter stood in) derives
    from it; RoE's and the fixed path's traces share it."""
    route: list[bool]

    @property
    def num_layers(self) -> int:
        return len(self.route)

    @property
    def layers_executed(self) -> int:
        return sum(self.route)

    @property
    def adapters_used(self) -> list[int]:
        return [i for i, r in enumerate(self.route) if not r]

    @property
    def skip_ratio(self) -> float:
        return 1.0 - self.layers_executed / len(self.route)

