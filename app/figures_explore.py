"""Plotly figures of the Explore tab (roe_core.analysis results in, figures out) and of an edited image's
route against the original's.

    plot_atlas(atlas)             every route of a question set, clustered, coloured by question type
    plot_skip_by_type(atlas)      per question type, each layer's skip rate
    plot_route_counts(atlas)      how often each distinct route occurs
    plot_sweep(points)            the trade-off curve: accuracy against layers executed and measured speedup
    plot_fidelity(fidelity)       each skipped layer's adapter against the real layer, over the Fig. 1 curve
    plot_batching(composition)    one batch three ways: per-example routes, the union rule, every layer
    plot_route_change(before, after)  two routes of one question (original and edited image)
"""
from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figures import DENSE, RUN, SKIP, _layout

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
        fixed = [k for k, p in enumerate(points) if p.fixed_k is not None]
        if fixed:
            fig.add_trace(go.Scatter(
                x=[xs[k] for k in fixed], y=[y[k] for k in fixed], mode="lines+markers" if col == 1 else "markers",
                name="fixed path (same adapters)", marker=dict(color=DENSE, size=7, symbol="diamond"),
                line=dict(color=DENSE, dash="dash"), showlegend=col == 1,
                customdata=[[points[k].fixed_k, points[k].speedup] for k in fixed],
                hovertemplate=("fixed path, %{customdata[0]} layers skipped for every input<br>%{customdata[1]:.2f}×"
                               f"<br>{metric} %{{y:.3f}}<extra></extra>")), row=1, col=col)
        dense = [k for k, p in enumerate(points) if p.threshold is None and p.fixed_k is None]
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


def plot_route_change(before, after, labels=("original image", "edited image")) -> go.Figure:
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
