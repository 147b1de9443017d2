"""The What if and Side by side tabs' events: the last question re-answered on another route (or at another
threshold), and the same question to every loaded system. Background work (texts in background.py);
outputs by name. Systems are told apart only by what the registry and their traces declare."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from roe_core import InputError
from roe_core.serving import answer_yielding

from . import figures as F
from . import texts as T
from .background import AppContext, background_task, own_seconds
from .inputs import problem
from .session import Conversation, WhatIf


class CompareHandlers:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    # ---- What if ----
    @background_task("whatif_md", stopped="_The what-if run was stopped._", failed="Could not re-answer")
    def whatif(self, conv: Conversation, how: str, layers: list[int], threshold: float, request: gr.Request = None):
        """Re-answers the last question on a hand-picked route or at another router threshold, timed
        against every layer (background work, like the speed measurement)."""
        last = conv.last
        if last is None:
            return {"whatif_md": problem("Nothing to re-answer", "ask a question first"), "whatif_table": None}
        L = self.ctx.num_layers
        if how == "threshold":
            route, thr = "auto", float(threshold)
            what = f"the router at threshold **{thr:.2f}**"
        else:
            keep = {int(i) for i in (layers or [])}
            route, thr = [i in keep for i in range(L)], last.trace.threshold
            what = f"layers **{', '.join(map(str, sorted(keep))) or 'none'}** executed by hand"
        with self.ctx.job(request) as job:
            cmp = self.ctx.pipe.compare(conv.image, last.question, conv.history(-1), route=route, threshold=thr,
                                        max_new_tokens=self.ctx.max_new_tokens, repeats=self.ctx.speed_repeats,
                                        checkpoint=job.checkpoint)
        w = cmp.roe.trace
        same = "the **same** answer" if cmp.roe.text == last.answer else "a **different** answer"
        md = (f"**Turn {len(conv.turns)}, re-answered with {what}:** {w.layers_executed} of {L} layers ran "
              f"(the router's route ran {last.trace.layers_executed}); {same}; **{cmp.speedup:.2f}×** the speed of "
              f"every layer (medians of {cmp.repeats} interleaved run(s)).")
        orig = last.speed
        rows = [["router's route (this turn)", last.trace.layers_executed, round(orig.roe_s, 4) if orig else None,
                 round(F.tokens_per_s(orig.roe.trace.new_tokens, orig.roe_s), 1) if orig else None, last.answer],
                ["what-if", w.layers_executed, round(cmp.roe_s, 4), round(F.tokens_per_s(w.new_tokens, cmp.roe_s), 1),
                 cmp.roe.text],
                ["every layer (dense)", cmp.dense.trace.layers_executed, round(cmp.dense_s, 4),
                 round(F.tokens_per_s(cmp.dense.trace.new_tokens, cmp.dense_s), 1), cmp.dense.text]]
        return {"conv": conv.with_whatif(WhatIf(len(conv.turns) - 1, how, cmp)), "whatif_md": md,
                "whatif_table": pd.DataFrame(rows, columns=T.WHATIF_HEADERS),
                "whatif_route": F.plot_route(w, label="What-if path"), "whatif_speed": F.plot_speed(cmp, label="what-if")}

    # ---- Side by side ----
    @background_task("systems_md", stopped="_The side-by-side run was stopped._", failed="Could not compare")
    def compare_systems(self, conv: Conversation, chosen: list[str], question: str, request: gr.Request = None):
        """The same question (default: the last one asked) about this conversation's image, with its earlier
        turns, to each chosen system in turn: a summary, a table and a figure, then for each loaded system
        with an experts view its expert load and token pathways, and the rigidity of them all."""
        ctx = self.ctx
        chosen = [c for c in (chosen or []) if c in ctx.systems]
        if not chosen:
            raise InputError("pick at least one system")
        question, history = (question or "").strip(), conv.history()
        if not question and conv.last is not None:     # the last question, asked again with what preceded it
            question, history = conv.last.question, conv.history(-1)
        if not question:
            raise InputError("the question is empty: type one here or ask one in the chat first")
        if conv.image is None:
            raise InputError("there is no image: upload one (or pick an example) before asking")
        answers, seconds = {}, {}
        with ctx.job(request) as job:
            for name in chosen:
                pipe = ctx.systems[name]
                item = pipe.prepare(conv.image, question, history)
                answers[name], seconds[name] = own_seconds(job, lambda on_step: answer_yielding(
                    pipe, [item], job, on_step=on_step, max_new_tokens=ctx.max_new_tokens)[0])
                job.turn()
        rows = [{"system": ctx.systems[n].label, "answer": answers[n].text, "seconds": seconds[n],
                 "tokens_per_s": F.tokens_per_s(answers[n].trace.new_tokens, seconds[n]),
                 "active_m": answers[n].trace.active_params / 1e6,
                 "total_m": ctx.systems[n].parameter_counts().total / 1e6, "decided": answers[n].trace.summary()}
                for n in chosen]
        table = pd.DataFrame([[r["system"], r["answer"], round(r["seconds"], 3), round(r["tokens_per_s"], 1),
                               round(r["active_m"], 3), round(r["total_m"], 3), r["decided"]] for r in rows],
                             columns=T.SYSTEM_HEADERS)
        fastest = min(rows, key=lambda r: r["seconds"])
        md = f"**{question}** — fastest: **{fastest['system']}** ({fastest['seconds']:.3f} s). " + " · ".join(
            f"{r['system']}: {r['seconds']:.3f} s ({r['seconds'] / fastest['seconds']:.2f}×)" for r in rows)
        if len({r["answer"] for r in rows}) > 1:
            md += " · the answers differ."
        return {"systems_md": md, "systems_table": table, "systems_plot": F.plot_systems(rows),
                **self.expert_views(answers)}

    def expert_views(self, answers: dict) -> dict:
        """{<system>_load, <system>_paths, rigidity} for each loaded system whose trace offers the experts view."""
        shown = self.ctx.expert_systems()
        if not shown:
            return {}
        out, traces = {}, {}
        for name in shown:
            label = self.ctx.systems[name].label
            if name not in answers:
                hint = F.empty_figure(f"Tick {label} to see its expert load and token pathways", 300)
                out[f"{name}_load"] = out[f"{name}_paths"] = hint
                continue
            trace = answers[name].trace
            traces[label] = trace
            out[f"{name}_load"] = F.plot_expert_load(trace, f"{label}: expert load per MoE layer, this turn "
                                                            "(image | text tokens)")
            out[f"{name}_paths"] = F.plot_token_pathways(trace, token_words(self.ctx.systems[name], trace),
                                                         f"{label}: token pathways, this turn (hover a token)")
        out["rigidity"] = (F.plot_rigidity(traces) if traces
                           else F.empty_figure("Tick a system with experts to see its router rigidity", 280))
        return out


def token_words(pipe, trace) -> list[str]:
    """Each token the trace covers as text (image tokens as "<image>"), from the pipeline's tokenizer."""
    tok = pipe.encoder.tokenizer
    return ["<image>" if kind == "image" else tok.convert_ids_to_tokens(t)
            for t, kind in zip(trace.token_ids.tolist(), trace.kind_names())]
