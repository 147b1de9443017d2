"""What the page shows about a conversation's last turn, by output name (the names layout.py gives its
components). Pure functions: a Conversation (or a speed comparison) in, {name: value} out."""
from __future__ import annotations

import pandas as pd

from . import figures as F
from . import texts as T
from .session import Conversation

# Everything shown about the last turn, in the order the endpoints return it (/ask, /retry, /undo,
# /set_image, /new_scene, /reset: status first, then these)
TURN_VIEWS = ["chat", "trace", "l1", "route", "usage", "adapters", "layers", "threshold",
              "speed_fig", "speed_table", "speed_md"]

# the first screen's compact panels (the Chat tab, beside the conversation)
ROUTE_HEIGHT, L1_HEIGHT, SPEED_HEIGHT = 228, 228, 192


def turn_views(conv: Conversation, num_layers: int) -> dict:
    """{name: value} for every TURN_VIEWS output (the threshold only once there is a turn)."""
    last = conv.last
    chat = conv.chat_messages()
    if last is None:
        return {"chat": chat, "trace": None, "l1": F.empty_figure(T.L1_EMPTY, L1_HEIGHT),
                "route": F.empty_figure(T.ROUTE_EMPTY, ROUTE_HEIGHT), "usage": F.empty_figure(T.USAGE_EMPTY),
                "adapters": "", "layers": list(range(num_layers)),
                "speed_fig": F.empty_figure(T.SPEED_EMPTY, SPEED_HEIGHT), "speed_table": None, "speed_md": ""}
    t = last.trace
    used = ", ".join(map(str, t.adapters_used)) or "none"
    adapters = (f"**Adapters this turn:** layers {used} ({len(t.adapters_used)} of {len(t.route)}) were skipped "
                f"and their adapters stood in. Map: every turn of this conversation (orange = skipped); bars: how "
                f"often each layer was skipped across its {len(conv.turns)} turn(s).")
    return {"chat": chat,
            "trace": {"turn": len(conv.turns), "question": last.question, "answer": last.answer, **t.to_dict()},
            "l1": F.plot_layer_l1(t, height=L1_HEIGHT), "route": F.plot_route(t, height=ROUTE_HEIGHT),
            "usage": F.plot_adapter_usage([x.trace for x in conv.turns]), "adapters": adapters,
            "layers": [i for i, r in enumerate(t.route) if r], "threshold": t.threshold, **speed_views(last.speed)}


def speed_views(cmp) -> dict:
    """The speed figure, table and summary of a SpeedComparison, or placeholders while it is measured."""
    if cmp is None:
        return {"speed_fig": F.empty_figure(T.SPEED_TIMING, SPEED_HEIGHT), "speed_table": None,
                "speed_md": T.SPEED_PENDING}
    rows = []
    for name, a, secs in (("RoE route", cmp.roe, cmp.roe_s), ("every layer (dense)", cmp.dense, cmp.dense_s)):
        rows.append([name, a.trace.layers_executed, round(secs, 4), round(F.tokens_per_s(a.trace.new_tokens, secs), 1),
                     a.trace.new_tokens, a.text])
    md = (f"**{cmp.speedup:.2f}×** the speed of every layer: {cmp.roe_s:.3f} s against {cmp.dense_s:.3f} s "
          f"(medians of {cmp.repeats} interleaved run(s) each, measured live on this turn). "
          + ("Same answer." if cmp.roe.text == cmp.dense.text else "The answers differ (see the table)."))
    return {"speed_fig": F.plot_speed(cmp, height=SPEED_HEIGHT),
            "speed_table": pd.DataFrame(rows, columns=T.SPEED_HEADERS), "speed_md": md}
