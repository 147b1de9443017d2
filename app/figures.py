"""Plotly figures of one turn's route (and of a conversation's routes): pure functions, traces in, figures out.

    plot_layer_l1(trace)          Fig. 1 of the paper: how much each decoder layer changes this example
    plot_route(trace)             the expert path: a lane of layers, executed vs skipped, router p_run
    plot_adapter_usage(traces)    turns x layers skip map + per-layer skip rate across the conversation
    plot_speed(comparison)        the route against every layer: latency and tokens/s
    plot_expert_load(trace, E)    MoE: per MoE layer, top-1 expert shares of image vs text tokens (stacked)
    plot_token_pathways(trace, tokens)  MoE: each token's top-1 expert across the MoE layers
    plot_systems(answers)         the side-by-side view: latency and active parameters per system
    plot_rigidity(traces)         MoE systems side by side: per MoE layer, how differently image and text
                                  tokens are routed (Jensen-Shannon divergence of their top-1 distributions)
    plot_atlas(atlas)             every route of a question set, clustered, coloured by question type
    plot_skip_by_type(atlas)      per question type, each layer's skip rate
    plot_route_counts(atlas)      how often each distinct route occurs
    plot_sweep(points)            the trade-off curve: accuracy against layers executed and measured speedup
    plot_fidelity(fidelity)       each skipped layer's adapter against the real layer, over the Fig. 1 curve
"""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from roe_core import RouteTrace, SpeedComparison
from roe_core.systems.moe_llava import TOKEN_KINDS, ExpertTrace, js_divergence

RUN = "#2563eb"        # layer executed
SKIP = "#f59e0b"       # layer skipped; its adapter stood in
DENSE = "#9ca3af"      # the dense baseline (every layer run)
FONT = dict(family="Inter, system-ui, sans-serif", size=12)


def _layout(fig: go.Figure, title: str, height: int) -> go.Figure:
    # title at the very top, the legend between it and the plot: they never overlap
    fig.update_layout(
        title=dict(text=title, x=0.01, xanchor="left", y=0.985, yanchor="top", font=dict(size=14)),
        template="plotly_white", font=FONT, height=height, margin=dict(l=52, r=16, t=84, b=40),
        legend=dict(orientation="h", yanchor="bottom", y=1.03, x=0.0, font=dict(size=11)),
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


def _split(trace: RouteTrace) -> tuple[list[int], list[int]]:
    run = [i for i, r in enumerate(trace.route) if r]
    return run, trace.adapters_used


def plot_layer_l1(trace: RouteTrace) -> go.Figure:
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
    return _layout(fig, "Fig. 1 · how much each layer changes this turn", 330)


def plot_route(trace: RouteTrace, label: str = "Expert path") -> go.Figure:
    """The chosen expert path: one square per decoder layer (executed or skipped through its adapter) over
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
                  annotation_font_size=10)
    fig.update_yaxes(visible=False, range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="router p_run", range=[0, 1.05], row=2, col=1)
    fig.update_xaxes(range=[-0.5, L - 0.5], dtick=max(1, L // 10), row=1, col=1)
    fig.update_xaxes(title_text="decoder layer", row=2, col=1)
    title = f"{label} · {trace.layers_executed} of {L} layers executed ({trace.skip_ratio:.0%} skipped)"
    return _layout(fig, title, 330)


def skip_map(traces: Sequence[RouteTrace]) -> list[list[int]]:
    """turns x layers: 1 where the layer was skipped (its adapter stood in), 0 where it ran."""
    return [[0 if r else 1 for r in t.route] for t in traces]


def plot_adapter_usage(traces: Sequence[RouteTrace]) -> go.Figure:
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


def plot_speed(cmp: SpeedComparison, label: str = "RoE route") -> go.Figure:
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
    return _layout(fig, f"Speed · {label} vs every layer: {cmp.speedup:.2f}×", 300)


def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


EXPERT_COLOURS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#ec4899", "#14b8a6", "#6b7280"]


def expert_shares(trace: ExpertTrace, num_experts: int) -> dict[str, list[list[float]]]:
    """Per MoE layer, the share of image tokens and of text tokens (everything else) whose top-1 is each
    expert. Each modality sums to 1 per layer, so both weigh the same whatever their token counts."""
    img = trace.kinds == TOKEN_KINDS.index("image")
    out = {}
    for kind, sel in (("image", img), ("text", ~img)):
        top1 = trace.experts[:, sel, 0]                                          # (M, n)
        counts = [[int((row == e).sum()) for e in range(num_experts)] for row in top1]
        out[kind] = [[c / max(1, sum(r)) for c in r] for r in counts]
    return out


def plot_expert_load(trace: ExpertTrace, num_experts: int, title: str = "Expert load per MoE layer") -> go.Figure:
    """MoE-LLaVA's own view: for each MoE layer two stacked bars, image tokens and text tokens, split by
    the share of tokens whose top-1 expert is each expert."""
    shares = expert_shares(trace, num_experts)
    x = [[f"layer {layer}" for layer in trace.layers for _ in (0, 1)], [k for _ in trace.layers for k in ("image", "text")]]
    fig = go.Figure()
    for e in range(num_experts):
        y = [shares[k][m][e] for m in range(len(trace.layers)) for k in ("image", "text")]
        fig.add_trace(go.Bar(x=x, y=y, name=f"expert {e}", marker_color=EXPERT_COLOURS[e % len(EXPERT_COLOURS)],
                             hovertemplate="%{x}<br>expert " + str(e) + ": %{y:.0%} of the tokens<extra></extra>"))
    fig.update_layout(barmode="stack")
    fig.update_yaxes(title_text="share of tokens (top-1)", tickformat=".0%", range=[0, 1])
    return _layout(fig, title, 340)


def plot_token_pathways(trace: ExpertTrace, tokens: Sequence[str], title: str = "Token pathways") -> go.Figure:
    """Each token (x, in reading order; image tokens grouped) and its top-1 expert at every MoE layer (y),
    with hover: the token, its kind, both experts and their weights."""
    top1 = trace.experts[..., 0].tolist()                                        # (M, N)
    kinds = [TOKEN_KINDS[k] for k in trace.kinds.tolist()]
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


def plot_rigidity(traces: dict[str, tuple[ExpertTrace, int]], title: str = "Router rigidity, this turn") -> go.Figure:
    """{label: (trace, num_experts)}: per MoE layer, the divergence between the top-1 expert distribution
    of image tokens and that of text tokens. Near 0: the router sends both modalities alike (rigid)."""
    fig = go.Figure()
    for i, (label, (trace, E)) in enumerate(traces.items()):
        sh = expert_shares(trace, E)
        js = [js_divergence(a, b) for a, b in zip(sh["image"], sh["text"])]
        fig.add_trace(go.Scatter(x=[f"layer {layer}" for layer in trace.layers], y=js, name=label, mode="lines+markers",
                                 line=dict(color=EXPERT_COLOURS[i % len(EXPERT_COLOURS)], width=2),
                                 hovertemplate=label + ", %{x}: JS %{y:.3f} bits<extra></extra>"))
    fig.update_yaxes(title_text="JS divergence, image vs text (bits)", rangemode="tozero")
    return _layout(fig, title, 300)


# --- the explorer's analysis views (roe_core.analysis) ------------------------------------------------------

QTYPE_COLOURS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#ec4899", "#14b8a6", "#84cc16",
                 "#6b7280", "#0ea5e9"]


def plot_atlas(atlas) -> go.Figure:
    """Every route of a question set, one row per example (clustered by Hamming distance), one column
    per decoder layer; a strip on the left colours each row by its question type."""
    L = atlas.num_layers
    rows = [atlas.entries[k] for k in atlas.order]
    types = sorted({e.qtype for e in rows})
    code = {t: i for i, t in enumerate(types)}
    n_types = max(1, len(types))
    ylabels = [f"#{e.index}" for e in rows]
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.05, 0.95], horizontal_spacing=0.01)
    scale = []
    for t in types:          # a discrete colour scale: one band per type
        c = QTYPE_COLOURS[code[t] % len(QTYPE_COLOURS)]
        scale += [[code[t] / n_types, c], [(code[t] + 1) / n_types, c]]
    fig.add_trace(go.Heatmap(
        z=[[code[e.qtype] + 0.5] for e in rows], x=["type"], y=ylabels, zmin=0, zmax=n_types, showscale=False,
        colorscale=scale or [[0, "#ccc"], [1, "#ccc"]], customdata=[[e.qtype] for e in rows],
        hovertemplate="%{y}: %{customdata}<extra></extra>"), row=1, col=1)
    def mark(e):
        return "" if e.correct is None else (" ✓" if e.correct else " ✗")
    hover = [[f"{'ran' if r else 'skipped (adapter)'}<br>{e.qtype}: {e.question}<br>answer: {e.answer}{mark(e)}"
              for r in e.route] for e in rows]
    fig.add_trace(go.Heatmap(
        z=[[0 if r else 1 for r in e.route] for e in rows], x=list(range(L)), y=ylabels, zmin=0, zmax=1,
        showscale=False, colorscale=[[0, RUN], [0.5, RUN], [0.5, SKIP], [1, SKIP]], xgap=1,
        ygap=1 if len(rows) < 80 else 0, text=hover, hovertemplate="%{y}, layer %{x}: %{text}<extra></extra>"),
        row=1, col=2)
    for t in types:          # a legend of the types
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=t,
                                 marker=dict(color=QTYPE_COLOURS[code[t] % len(QTYPE_COLOURS)], symbol="square", size=10)))
    fig.update_yaxes(autorange="reversed", showticklabels=len(rows) <= 40, row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_xaxes(title_text="decoder layer (blue ran, orange skipped)", dtick=max(1, L // 10), row=1, col=2)
    title = (f"Route atlas · {len(rows)} examples, {atlas.distinct_routes} distinct routes, "
             f"mean {sum(e.layers_executed for e in rows) / max(1, len(rows)):.1f} of {L} layers")
    return _layout(fig, title, min(900, 220 + 9 * len(rows)))


def plot_skip_by_type(atlas) -> go.Figure:
    """Per question type, how often each decoder layer was skipped."""
    rates = atlas.skip_rate_by_type()
    L = atlas.num_layers
    types = list(rates)
    fig = go.Figure(go.Heatmap(
        z=[rates[t] for t in types], x=list(range(L)), y=types, zmin=0, zmax=1, colorscale="Oranges",
        colorbar=dict(title="skip rate", tickformat=".0%", thickness=12),
        hovertemplate="%{y}, layer %{x}: skipped in %{z:.0%}<extra></extra>"))
    fig.update_xaxes(title_text="decoder layer", dtick=max(1, L // 10))
    return _layout(fig, "Skip rate per layer, by question type", 160 + 26 * len(types))


def plot_route_counts(atlas, top: int = 15) -> go.Figure:
    """The most frequent routes and how often each occurs."""
    counts = atlas.route_counts()[:top]
    n = len(atlas.entries)
    labels = [f"route {k + 1} · {sum(r)} layers" for k, (r, _) in enumerate(counts)]
    fig = go.Figure(go.Bar(
        x=[c for _, c in counts], y=labels, orientation="h", marker_color=RUN,
        customdata=["".join("1" if x else "0" for x in r) for r, _ in counts],
        hovertemplate="%{y}: %{x} examples<br>%{customdata}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="examples")
    return _layout(fig, f"How often each route occurs · top {len(counts)} of {atlas.distinct_routes} ({n} examples)",
                   180 + 22 * len(counts))


def plot_sweep(points) -> go.Figure:
    """The trade-off curve: accuracy (or agreement with dense) against layers executed and against the
    measured speedup; the dense point in grey, the model's calibrated threshold as a star."""
    metric = "accuracy" if points[0].accuracy is not None else "agreement with dense"
    y = [p.accuracy if p.accuracy is not None else p.agreement_with_dense for p in points]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("against mean layers executed", "against measured speedup"),
                        horizontal_spacing=0.12)
    routed = [k for k, p in enumerate(points) if p.threshold is not None]
    for col, xs in ((1, [p.mean_layers_executed for p in points]), (2, [p.speedup for p in points])):
        fig.add_trace(go.Scatter(
            # against layers the points lie on a curve; against measured speed (noisy) they stand alone
            x=[xs[k] for k in routed], y=[y[k] for k in routed], mode="lines+markers+text" if col == 1 else "markers+text",
            name="router threshold",
            text=[f"{points[k].threshold:.2f}" for k in routed], textposition="top center", textfont=dict(size=9),
            marker=dict(color=RUN, size=8), line=dict(color=RUN), showlegend=col == 1,
            customdata=[[points[k].threshold, points[k].mean_layers_executed, points[k].speedup] for k in routed],
            hovertemplate=("threshold %{customdata[0]:.2f}<br>%{customdata[1]:.1f} layers, %{customdata[2]:.2f}×"
                           f"<br>{metric} %{{y:.3f}}<extra></extra>")), row=1, col=col)
        dense = [k for k, p in enumerate(points) if p.threshold is None]
        fig.add_trace(go.Scatter(x=[xs[k] for k in dense], y=[y[k] for k in dense], mode="markers", name="dense",
                                 marker=dict(color=DENSE, size=11, symbol="square"), showlegend=col == 1,
                                 hovertemplate=f"every layer<br>{metric} %{{y:.3f}}<extra></extra>"), row=1, col=col)
        cal = [k for k, p in enumerate(points) if p.calibrated]
        fig.add_trace(go.Scatter(x=[xs[k] for k in cal], y=[y[k] for k in cal], mode="markers",
                                 name="calibrated threshold", showlegend=col == 1,
                                 marker=dict(color=SKIP, size=16, symbol="star", line=dict(color="white", width=1)),
                                 hovertemplate=f"the model's threshold<br>{metric} %{{y:.3f}}<extra></extra>"),
                      row=1, col=col)
    fig.update_xaxes(title_text="layers executed (mean)", row=1, col=1)
    fig.update_xaxes(title_text="speedup over every layer (×)", row=1, col=2)
    fig.update_yaxes(range=[-0.03, 1.05])
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_annotations(font_size=11)
    return _layout(fig, f"Trade-off · {metric} against sparsity and speed ({len(routed)} thresholds)", 360)


def plot_fidelity(fid, l1_dense: Sequence[float] | None = None) -> go.Figure:
    """Adapter fidelity over the Fig. 1 curve: per layer, how much the real layer changes its input (grey),
    and for each skipped layer how far its adapter's output is from the layer's (orange); on the right
    axis the routed run's divergence from the dense twin after each layer."""
    L = len(fid.route)
    layers = list(range(L))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=layers, y=list(l1_dense) if l1_dense is not None else fid.layer_l1,
                             name="Fig. 1: the layer's own change (L1)", mode="lines",
                             line=dict(color=DENSE, width=2, dash="dot"),
                             hovertemplate="layer %{x}<br>layer's change %{y:.4f}<extra></extra>"))
    skipped = [i for i, r in enumerate(fid.route) if not r]
    fig.add_trace(go.Scatter(
        x=skipped, y=[fid.adapter_l1[i] for i in skipped], name="adapter vs layer (L1), skipped layers",
        mode="markers", marker=dict(color=SKIP, symbol="diamond", size=10, line=dict(color="white", width=1)),
        customdata=[[fid.adapter_cos[i], fid.layer_l1[i]] for i in skipped],
        hovertemplate=("layer %{x} skipped<br>adapter vs layer L1 %{y:.4f}<br>cosine %{customdata[0]:.4f}"
                       "<br>the layer's own change %{customdata[1]:.4f}<extra></extra>")))
    ran = [i for i, r in enumerate(fid.route) if r]
    fig.add_trace(go.Scatter(x=ran, y=[0.0] * len(ran), name="executed (no adapter: 0)", mode="markers",
                             marker=dict(color=RUN, size=7), hovertemplate="layer %{x} ran<extra></extra>"))
    fig.add_trace(go.Scatter(x=layers, y=fid.twin_l1, name="routed vs dense twin (L1, right axis)", mode="lines",
                             line=dict(color="#7c3aed", width=1.5),
                             customdata=fid.twin_cos,
                             hovertemplate="after layer %{x}<br>twin L1 %{y:.4f}<br>cosine %{customdata:.4f}<extra></extra>"),
                  secondary_y=True)
    fig.update_xaxes(title_text="decoder layer", range=[-0.5, L - 0.5], dtick=max(1, L // 10))
    fig.update_yaxes(title_text="L1 distance", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="twin divergence", rangemode="tozero", secondary_y=True, showgrid=False)
    agree = "the same" if fid.top1_agree else "a different"
    title = (f"Adapter fidelity · {len(skipped)} adapters stood in; next-token KL(dense‖routed) "
             f"{fid.kl_next_token:.3f} nats, {agree} first token")
    return _layout(fig, title, 360)


def plot_batching(c) -> go.Figure:
    """One batch three ways: per-example routes (RoE here), the union rule (a layer runs for the whole batch if
    any example wants it) and every layer; median seconds, and the (example, layer) pairs each ran."""
    names = {"per_example": "per-example routes", "union": "union of routes", "dense": "every layer"}
    colours = {"per_example": RUN, "union": SKIP, "dense": DENSE}
    keys = list(names)
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"batch latency, s (median of {c.repeats})",
                                                        "layer runs (example × layer)"), horizontal_spacing=0.14)
    fig.add_trace(go.Bar(x=[names[k] for k in keys], y=[c.seconds[k] for k in keys],
                         marker_color=[colours[k] for k in keys], text=[f"{c.seconds[k]:.3f} s" for k in keys],
                         textposition="auto", hovertemplate="%{x}: %{y:.3f} s<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=[names[k] for k in keys], y=[c.layer_runs[k] for k in keys],
                         marker_color=[colours[k] for k in keys], text=[str(c.layer_runs[k]) for k in keys],
                         textposition="auto", hovertemplate="%{x}: %{y} layer runs<extra></extra>"), row=1, col=2)
    fig.update_layout(showlegend=False)
    fig.update_annotations(font_size=11)
    return _layout(fig, f"Batch of {len(c.questions)} · per-example routing {c.speedup_vs_union:.2f}× the union rule, "
                        f"{c.speedup_vs_dense:.2f}× every layer", 320)


def plot_route_change(before: RouteTrace, after: RouteTrace, labels=("original image", "edited image")) -> go.Figure:
    """Two routes of the same question, one lane each, with the layers whose decision changed marked."""
    L = len(before.route)
    z = [[0 if r else 1 for r in before.route], [0 if r else 1 for r in after.route]]
    changed = [i for i in range(L) if before.route[i] != after.route[i]]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(L)), y=list(labels), zmin=0, zmax=1, showscale=False, xgap=2, ygap=4,
        colorscale=[[0, RUN], [0.5, RUN], [0.5, SKIP], [1, SKIP]],
        customdata=[before.p_run, after.p_run],
        text=[["ran" if v == 0 else "skipped (adapter)" for v in row] for row in z],
        hovertemplate="%{y}, layer %{x}: %{text}<br>p_run %{customdata:.2f}<extra></extra>"))
    if changed:
        fig.add_trace(go.Scatter(x=changed, y=[labels[1]] * len(changed), mode="markers", name="decision changed",
                                 marker=dict(symbol="x", size=11, color="#111827"),
                                 hovertemplate="layer %{x}: the decision changed<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="decoder layer (blue ran, orange skipped)", dtick=max(1, L // 10))
    return _layout(fig, f"Route before and after the edit · {len(changed)} of {L} layer decisions changed", 240)
