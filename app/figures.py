"""Plotly figures of one turn's route, of a conversation's routes and of the systems side by side: pure
functions, traces and plain data in, figures out (the Explore tab's figures are in figures_explore.py).

    plot_layer_l1(trace)          Fig. 1 of the paper: how much each decoder layer changes this example
    plot_route(trace)             the route strip: a lane of layers, executed vs skipped, router p_run
    plot_adapter_usage(traces)    turns x layers skip map + per-layer skip rate across the conversation
    plot_speed(comparison)        the route against every layer: latency and tokens/s
    plot_systems(rows)            the side-by-side view: latency and active parameters per system
    plot_expert_load(trace)       an "experts" trace: per MoE layer, top-1 expert shares of image vs text tokens
    plot_token_pathways(trace, tokens)  an "experts" trace: each token's top-1 expert across the MoE layers
    plot_rigidity(traces)         "experts" traces side by side: per MoE layer, how differently image and text
                                  tokens are routed (Jensen-Shannon divergence of their top-1 distributions)

A "route" trace has .route, .p_run, .threshold, .l1, .l1_dense, .adapters_used; an "experts" trace has
.layers, .experts, .weights, .num_experts, .kind_names() (roe_core.systems.trace: `trace.views`).
"""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from roe_core.analysis.experts import modality_shares, rigidity

RUN = "#2563eb"        # layer executed
SKIP = "#f59e0b"       # layer skipped; its adapter stood in
DENSE = "#9ca3af"      # the dense baseline (every layer run)
FONT = dict(family="Inter, system-ui, sans-serif", size=12)


def _layout(fig: go.Figure, title: str, height: int, top: int = 84) -> go.Figure:
    # title at the very top, the legend between it and the plot: they never overlap. top: the margin
    # above the plot (compact panels of the first screen use less)
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", y=1.0, yref="container", yanchor="top", pad=dict(t=8),
                   font=dict(size=14 if top >= 70 else 13)),
        template="plotly_white", font=FONT, height=height, margin=dict(l=52, r=16, t=top, b=40),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0.0, font=dict(size=11)),
        hoverlabel=dict(font_size=12),
    )
    return fig


def empty_figure(message: str, height: int = 300) -> go.Figure:
    """A blank panel that says what will appear there."""
    fig = go.Figure()
    fig.add_annotation(text=message, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=13, color="#6b7280"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height)


def _split(trace) -> tuple[list[int], list[int]]:
    run = [i for i, r in enumerate(trace.route) if r]
    return run, trace.adapters_used


def plot_layer_l1(trace, height: int = 330) -> go.Figure:
    """Per-layer L1 distance between each decoder layer's input and output at prefill: every layer run
    (grey line) and the path this turn took (blue line), its layers marked executed (dot) or skipped (diamond)."""
    L = len(trace.route)
    layers = list(range(L))
    fig = go.Figure()
    if trace.l1_dense is not None:
        fig.add_trace(go.Scatter(
            x=layers, y=trace.l1_dense, name="every layer run (dense)", mode="lines",
            line=dict(color=DENSE, width=2, dash="dot"),
            hovertemplate="layer %{x}<br>dense L1 %{y:.4f}<extra></extra>"))
    if trace.l1 is not None:
        fig.add_trace(go.Scatter(
            x=layers, y=trace.l1, name="path taken", mode="lines", line=dict(color=RUN, width=1.5),
            hoverinfo="skip"))
        run, skip = _split(trace)
        for name, idx, colour, symbol in (("executed", run, RUN, "circle"),
                                          ("skipped (adapter)", skip, SKIP, "diamond")):
            fig.add_trace(go.Scatter(
                x=idx, y=[trace.l1[i] for i in idx], name=name, mode="markers",
                marker=dict(color=colour, symbol=symbol, size=9, line=dict(color="white", width=1)),
                customdata=[trace.p_run[i] for i in idx],
                hovertemplate=f"layer %{{x}}: {name}<br>L1 %{{y:.4f}}<br>p_run %{{customdata:.2f}}<extra></extra>"))
    fig.update_xaxes(title_text="decoder layer", range=[-0.5, L - 0.5], dtick=max(1, L // 10))
    fig.update_yaxes(title_text="L1 distance", rangemode="tozero")
    return _layout(fig, "Fig. 1 · how much each layer changes this turn", height, _top(height))


def plot_route(trace, label: str = "Expert path", height: int = 330) -> go.Figure:
    """The chosen path (the route strip): one square per decoder layer (executed or skipped through its adapter) over
    the router's run probability, with the threshold it was compared against."""
    L = len(trace.route)
    run, skip = _split(trace)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.22, 0.78], vertical_spacing=0.07)
    for name, idx, colour in (("executed", run, RUN), ("skipped (adapter)", skip, SKIP)):
        p = [trace.p_run[i] for i in idx]
        hover = f"layer %{{x}}: {name}<br>p_run %{{customdata:.2f}}<extra></extra>"
        # the lane: one unit-high bar ("square") per layer, so it scales with the panel's width
        fig.add_trace(go.Bar(
            x=idx, y=[1] * len(idx), name=name, legendgroup=name, width=0.82, marker_color=colour,
            customdata=p, hovertemplate=hover), row=1, col=1)
        fig.add_trace(go.Bar(
            x=idx, y=p, name=f"p_run ({name})", marker_color=colour, legendgroup=name, showlegend=False,
            customdata=p, hovertemplate=hover), row=2, col=1)
    fig.add_hline(y=trace.threshold, line=dict(color="#111827", width=1, dash="dash"), row=2, col=1,
                  annotation_text=f"threshold {trace.threshold:.2f}", annotation_position="top left",
                  annotation_font_size=10, annotation_bgcolor="rgba(255,255,255,0.85)")
    fig.update_yaxes(visible=False, range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="router p_run", range=[0, 1.05], row=2, col=1)
    fig.update_xaxes(range=[-0.5, L - 0.5], dtick=max(1, L // 10), row=1, col=1)
    fig.update_xaxes(title_text="decoder layer", row=2, col=1)
    title = f"{label} · {trace.layers_executed} of {L} layers executed ({trace.skip_ratio:.0%} skipped)"
    return _layout(fig, title, height, _top(height))


def skip_map(traces: Sequence) -> list[list[int]]:
    """turns x layers: 1 where the layer was skipped (its adapter stood in), 0 where it ran."""
    return [[0 if r else 1 for r in t.route] for t in traces]


def plot_adapter_usage(traces: Sequence) -> go.Figure:
    """Which adapters stood in, turn by turn (heatmap, turns x layers), and each layer's skip rate
    across the conversation (bars)."""
    T, L = len(traces), len(traces[-1].route)
    z = skip_map(traces)
    rate = [sum(row[i] for row in z) / T for i in range(L)]
    turns = [f"turn {t + 1}" for t in range(T)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.6, 0.4], vertical_spacing=0.08)
    fig.add_trace(go.Heatmap(
        z=z, x=list(range(L)), y=turns, name="skip map", zmin=0, zmax=1, showscale=False,
        colorscale=[[0, "#dbeafe"], [0.5, "#dbeafe"], [0.5, SKIP], [1, SKIP]], xgap=2, ygap=2,
        customdata=[t.p_run for t in traces],
        text=[["skipped (adapter)" if v else "executed" for v in row] for row in z],
        hovertemplate="%{y}, layer %{x}: %{text}<br>p_run %{customdata:.2f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(
        x=list(range(L)), y=rate, name="skip rate", marker_color=SKIP,
        hovertemplate="layer %{x}: skipped in %{y:.0%} of turns<extra></extra>"), row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(title_text="skip rate", range=[0, 1.05], tickformat=".0%", row=2, col=1)
    fig.update_xaxes(range=[-0.5, L - 0.5], dtick=max(1, L // 10), row=1, col=1)
    fig.update_xaxes(title_text="decoder layer", row=2, col=1)
    fig.update_layout(showlegend=False)
    used = traces[-1].adapters_used
    shown = ", ".join(map(str, used[:12])) + (" …" if len(used) > 12 else "")
    title = f"Adapter usage · this turn: {shown or 'none'}"
    return _layout(fig, title, 300 + 14 * min(T, 12))


def plot_speed(cmp, label: str = "RoE route", height: int = 300) -> go.Figure:
    """The same turn with its route and with every layer: median latency and tokens/s (interleaved repeats)."""
    names = [label, "dense"]
    colours = [RUN, DENSE]
    secs = [cmp.roe_s, cmp.dense_s]
    tps = [tokens_per_s(cmp.roe.trace.new_tokens, cmp.roe_s), tokens_per_s(cmp.dense.trace.new_tokens, cmp.dense_s)]
    layers = [cmp.roe.trace.layers_executed, cmp.dense.trace.layers_executed]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"latency, s (median of {cmp.repeats})", "tokens / s"),
                        horizontal_spacing=0.16)
    fig.add_trace(go.Bar(x=names, y=secs, marker_color=colours, name="latency (s)", customdata=layers,
                         text=[f"{s:.3f} s" for s in secs], textposition="auto",
                         hovertemplate="%{x}: %{y:.3f} s<br>%{customdata} layers executed<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=tps, marker_color=colours, name="tokens/s", customdata=layers,
                         text=[f"{v:.1f}" for v in tps], textposition="auto",
                         hovertemplate="%{x}: %{y:.1f} tokens/s<br>%{customdata} layers executed<extra></extra>"),
                  row=1, col=2)
    fig.update_layout(showlegend=False)
    fig.update_annotations(font_size=11)
    return _layout(fig, f"Speed · {label} vs every layer: {cmp.speedup:.2f}×", height, _top(height))


def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _top(height: int) -> int:
    """The margin above a plot: room for the title and one legend row; less on the first screen's panels."""
    return 84 if height >= 300 else 62


EXPERT_COLOURS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#ec4899", "#14b8a6", "#6b7280"]


def plot_expert_load(trace, title: str = "Expert load per MoE layer") -> go.Figure:
    """MoE-LLaVA's own view: for each MoE layer two stacked bars, image tokens and text tokens, split by
    the share of tokens whose top-1 expert is each expert."""
    num_experts = trace.num_experts
    shares = modality_shares([trace])
    x = [[f"layer {layer}" for layer in trace.layers for _ in (0, 1)], [k for _ in trace.layers for k in ("image", "text")]]
    fig = go.Figure()
    for e in range(num_experts):
        y = [shares[k][m][e] for m in range(len(trace.layers)) for k in ("image", "text")]
        fig.add_trace(go.Bar(x=x, y=y, name=f"expert {e}", marker_color=EXPERT_COLOURS[e % len(EXPERT_COLOURS)],
                             hovertemplate="%{x}<br>expert " + str(e) + ": %{y:.0%} of the tokens<extra></extra>"))
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title_text="share of tokens (top-1)", tickformat=".0%", range=[0, 1])
    return _layout(fig, title, 340)


def plot_token_pathways(trace, tokens: Sequence[str], title: str = "Token pathways") -> go.Figure:
    """Each token (x, in reading order; image tokens grouped) and its top-1 expert at every MoE layer (y),
    with hover: the token, its kind, both experts and their weights."""
    top1 = trace.experts[..., 0].tolist()                                        # (M, N)
    kinds = trace.kind_names()
    w = trace.weights.tolist()
    ex = trace.experts.tolist()
    text = [[f"{tokens[n]!r} ({kinds[n]})<br>layer {layer}: " + " + ".join(
                 f"expert {e} ({wt:.2f})" for e, wt in zip(ex[m][n], w[m][n])) for n in range(len(kinds))]
            for m, layer in enumerate(trace.layers)]
    E = max(2, int(trace.experts.max()) + 1)
    scale = []
    for e in range(E):
        c = EXPERT_COLOURS[e % len(EXPERT_COLOURS)]
        scale += [[e / E, c], [(e + 1) / E, c]]
    fig = go.Figure(go.Heatmap(z=top1, x=list(range(len(kinds))), y=[f"layer {layer}" for layer in trace.layers],
                               text=text, hovertemplate="%{text}<extra></extra>", colorscale=scale, zmin=-0.5,
                               zmax=E - 0.5, colorbar=dict(title="top-1", tickvals=list(range(E)))))
    starts = {}
    for n, k in enumerate(kinds):
        starts.setdefault(k, n)
    for k, n in starts.items():
        if k != "other":
            fig.add_vline(x=n - 0.5, line=dict(color="#111827", width=1, dash="dot"))
            fig.add_annotation(x=n, y=1.0, yref="paper", text=k, showarrow=False, xanchor="left", yanchor="bottom",
                               font=dict(size=11))
    fig.update_xaxes(title_text="token (prompt, then the answer)")
    return _layout(fig, title, 360)


def plot_systems(rows: Sequence[dict]) -> go.Figure:
    """The side-by-side view: each system's latency for this question and its active parameters per token."""
    names = [r["system"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("latency (s), prefill + answer", "active parameters (M)"))
    fig.add_trace(go.Bar(x=names, y=[r["seconds"] for r in rows], marker_color=RUN, showlegend=False,
                         hovertemplate="%{x}: %{y:.3f} s<extra></extra>"), 1, 1)
    fig.add_trace(go.Bar(x=names, y=[r["active_m"] for r in rows], marker_color=SKIP, showlegend=False,
                         hovertemplate="%{x}: %{y:.1f} M active per token<extra></extra>"), 1, 2)
    return _layout(fig, "Same question, every system", 300)


def plot_rigidity(traces: dict, title: str = "Router rigidity, this turn") -> go.Figure:
    """{label: "experts" trace}: per MoE layer, the divergence between the top-1 expert distribution of
    image tokens and that of text tokens. Near 0: the router sends both modalities alike (rigid)."""
    fig = go.Figure()
    for i, (label, trace) in enumerate(traces.items()):
        js = rigidity(modality_shares([trace]))
        fig.add_trace(go.Scatter(x=[f"layer {layer}" for layer in trace.layers], y=js, name=label, mode="lines+markers",
                                 line=dict(color=EXPERT_COLOURS[i % len(EXPERT_COLOURS)], width=2),
                                 hovertemplate=label + ", %{x}: JS %{y:.3f} bits<extra></extra>"))
    fig.update_yaxes(title_text="JS divergence, image vs text (bits)", rangemode="tozero")
    return _layout(fig, title, 300)
