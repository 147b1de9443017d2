"""The Explore tab's events: the route atlas, adapter fidelity, the trade-off sweep, batch composition and
image edits (roe_core.analysis computes, figures_explore draws). Background work; outputs by name."""
from __future__ import annotations

import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from roe_core import InputError
from roe_core.analysis import adapter_fidelity, build_atlas, compare_batching, sweep_fixed, sweep_thresholds
from roe_core.scenes.answers import answers_match
from roe_core.scenes.questions import load_llava_questions, test_questions
from roe_core.serving import answer_yielding
from roe_core.systems import registry

from . import figures_explore as FX
from . import texts as T
from .background import AppContext, background_task
from .examples import load_examples
from .inputs import parse_thresholds, problem, upload_path
from .session import Conversation


def uploaded_json(files, workdir: Path) -> Path:
    """An uploaded LLaVA JSON file and the images it names, copied into one folder (the JSON finds its
    images beside it); returns the JSON's path there."""
    paths = [Path(x) for x in (upload_path(f, workdir) for f in (files or [])) if x]
    if not any(x.suffix.lower() == ".json" for x in paths):
        raise InputError("upload a LLaVA JSON file (with the images it names), or pick the generated scenes")
    folder = Path(tempfile.mkdtemp(prefix="set-", dir=workdir))
    for x in paths:     # the uploaded names; the JSON as questions.json
        shutil.copy(x, folder / (x.name if x.suffix.lower() != ".json" else "questions.json"))
    return folder / "questions.json"


def uploaded_questions(files, workdir: Path, n: int) -> list:
    """The questions of an uploaded LLaVA JSON file, with the images it names uploaded beside it."""
    return load_llava_questions(uploaded_json(files, workdir), limit=n)


def _point_label(p) -> str:
    """A sweep point's first table cell: its threshold, "dense", or "fixed k" for a fixed path."""
    if p.fixed_k is not None:
        return f"fixed k={p.fixed_k}"
    return "dense" if p.threshold is None else str(round(p.threshold, 3))


class ExploreHandlers:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def question_set(self, source: str, n: int, files, split: str = "test") -> list:
        """The scene split's first-turn questions (test by default), or the uploaded LLaVA JSON's (with its
        images)."""
        n = max(1, int(n))
        if source == "upload":
            return uploaded_questions(files, self.ctx.workdir, n)
        return [q for q in test_questions(3 * n, split=split) if not q.history][:n]

    # ---- the route atlas ----
    @background_task("atlas_md", stopped="_The atlas run was stopped._", failed="Could not build the atlas")
    def atlas(self, source: str, n: int, files, request: gr.Request = None, progress=gr.Progress()):
        """The route atlas of RoE Explorer: answers a set of questions with the RoE model and returns every
        route (which decoder layers ran, which were skipped through adapters), clustered by Hamming distance,
        with how many distinct routes there are, how often each occurs and each layer's skip rate per
        question type.

        Args:
            source: "scenes" (questions about generated scenes of the test split) or "upload" (a LLaVA JSON
                file with its images, in files)
            n: how many questions, at most (4 to 256)
            files: for source="upload": the LLaVA JSON file and the images it names
        Returns:
            a summary, the atlas, skip-rate and route-count figures, the examples in atlas order, a CSV
            file and the atlas as JSON (entries with question, answer, route; route_counts; skip_rate_by_type)
        """
        self.ctx.pipe.require_fitted()          # routes only: RoE not fitted says so, before any work
        questions = self.question_set(source, n, files)
        with self.ctx.job(request) as job:
            progress((0, len(questions)), desc="answering", unit="questions")
            atlas = build_atlas(self.ctx.pipe, questions, batch_size=8, max_new_tokens=self.ctx.max_new_tokens,
                                progress=lambda d, t: progress((d, t), desc="answering", unit="questions"),
                                on_step=job.step, between_layers=job.checkpoint)
            fixed = self.fixed_path_beside(atlas, questions, job, progress)
        rows = atlas.rows()
        csv_path = self.ctx.workdir / "exports" / f"roe-atlas-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(csv_path, index=False)
        counts = atlas.route_counts()
        scored = [e for e in atlas.entries if e.correct is not None]
        md = (f"**{len(atlas.entries)} questions, {atlas.distinct_routes} distinct routes**; the most common is "
              f"taken by {counts[0][1]} ({counts[0][1] / len(atlas.entries):.0%}), {sum(1 for _, c in counts if c == 1)} "
              f"routes occur once. Mean {statistics.mean(e.layers_executed for e in atlas.entries):.1f} of "
              f"{atlas.num_layers} layers run, standard deviation per example "
              f"{statistics.pstdev(e.layers_executed for e in atlas.entries):.2f}" + (f"; exact match {statistics.mean(e.correct for e in scored):.3f} "
                                                 f"on the {len(scored)} with a reference" if scored else "") + "." + fixed)
        table = pd.DataFrame([[r["rank"], r["index"], r["qtype"], r["question"], r["answer"], r["gold"],
                               "" if r["correct"] is None else ("✓" if r["correct"] else "✗"), r["layers_executed"],
                               r["route"]] for r in rows], columns=T.ATLAS_HEADERS)
        return {"atlas_md": md, "atlas_plot": FX.plot_atlas(atlas), "atlas_types": FX.plot_skip_by_type(atlas),
                "atlas_counts": FX.plot_route_counts(atlas), "atlas_table": table, "atlas_csv": str(csv_path),
                "atlas_json": atlas.to_dict(), "atlas_state": (atlas, questions)}

    def fixed_path_beside(self, atlas, questions, job, progress) -> str:
        """A loaded fixed-path system (one with a skip_order) answers the same questions: a sentence comparing
        it with the routes (empty when none is loaded)."""
        name = next((n for n, s in self.ctx.systems.items() if not s.needs_fit and s.skip_order()), None)
        if name is None:
            return ""
        pipe = self.ctx.systems[name]
        texts, layers = [], []
        for start in range(0, len(questions), 8):
            chunk = questions[start:start + 8]
            answers = answer_yielding(pipe, [(q.image, q.question, q.history) for q in chunk], job,
                                      max_new_tokens=self.ctx.max_new_tokens)
            texts += [a.text for a in answers]
            layers += [a.trace.layers_executed for a in answers]
            progress((start + len(chunk), len(questions)), desc=f"{registry.label(name)} answering", unit="questions")
        scored = [(t, e) for t, e in zip(texts, atlas.entries) if e.gold is not None]
        acc = (f", exact match {statistics.mean(answers_match(t, e.gold) for t, e in scored):.3f} (RoE "
               f"{statistics.mean(bool(e.correct) for _, e in scored):.3f})" if scored else "")
        same = statistics.mean(t == e.answer for t, e in zip(texts, atlas.entries))
        return (f" **{registry.label(name)}** (the same {statistics.mean(layers):.0f} layers for every input) on these "
                f"questions{acc}; it answers as RoE on {same:.0%}.")

    def open_atlas_example(self, state, evt: gr.SelectData):
        """A row of the atlas table -> that example's image and question in the chat (a new conversation)."""
        if not state or evt is None or evt.index is None:
            return {}
        atlas, questions = state
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        q = questions[atlas.entries[atlas.order[int(row)]].index]
        if isinstance(q.image, (str, Path)):
            path = str(q.image)
        else:
            path = str(self.ctx.workdir / f"atlas-{hashlib.sha1(q.image.tobytes()).hexdigest()[:16]}.png")
            if not Path(path).is_file():
                q.image.save(path)
        return {"image": path, "question": q.question, "tabs": gr.Tabs(selected="chat")}

    # ---- adapter fidelity ----
    @background_task("fid_md", stopped="_The fidelity run was stopped._", failed="Could not measure the adapters")
    def fidelity(self, conv: Conversation, request: gr.Request = None):
        """How good each adapter of the last turn was, and how far the route drifted from its dense twin."""
        last, pipe = conv.last, self.ctx.pipe
        pipe.require_fitted()
        if last is None:
            return {"fid_md": problem("Nothing to measure", "ask a question first")}
        if last.trace.route_mode == "dense":
            raise InputError("that turn ran every layer (asked before RoE was fitted): no adapter stood in; ask again")
        with self.ctx.job(request) as job:
            fid = adapter_fidelity(pipe, conv.image, last.question, conv.history(-1), route=last.trace.route,
                                   between_layers=job.checkpoint)
            job.turn()
            dense = pipe.answer_batch([pipe.prepare(conv.image, last.question, conv.history(-1))], route="dense",
                                      max_new_tokens=self.ctx.max_new_tokens, on_step=job.step,
                                      between_layers=job.checkpoint)[0]
        skipped = [i for i, r in enumerate(fid.route) if not r]
        worst = max(skipped, key=lambda i: fid.adapter_l1[i]) if skipped else None
        same = dense.text == last.answer
        md = (f"**Turn {len(conv.turns)}:** {len(skipped)} adapters stood in"
              + (f"; the farthest from its layer is layer {worst} (L1 {fid.adapter_l1[worst]:.4f} against the layer's "
                 f"own change {fid.layer_l1[worst]:.4f}, cosine {fid.adapter_cos[worst]:.4f})" if worst is not None else "")
              + f". Next-token KL(dense‖routed) **{fid.kl_next_token:.4f}** nats; the dense model answers "
              + ("**the same**" if same else f"**differently**: “{dense.text}” against “{last.answer}”") + ".")
        table = pd.DataFrame([[i, "yes" if r else "no (adapter)", round(fid.adapter_l1[i], 5), round(fid.adapter_cos[i], 5),
                               round(fid.layer_l1[i], 5), round(fid.twin_l1[i], 5), round(fid.twin_cos[i], 5)]
                              for i, r in enumerate(fid.route)], columns=T.FIDELITY_HEADERS)
        data = {"turn": len(conv.turns), "question": last.question, "answer": last.answer, "dense_answer": dense.text,
                "answers_agree": same, **fid.to_dict()}
        return {"fid_md": md, "fid_plot": FX.plot_fidelity(fid, last.trace.l1_dense), "fid_table": table,
                "fid_json": data}

    # ---- the trade-off curve ----
    @background_task("sweep_md", stopped="_The sweep was stopped._", failed="Could not sweep")
    def sweep(self, thresholds_text: str, n: int, request: gr.Request = None, progress=gr.Progress()):
        """Accuracy against layers executed and measured speed over router thresholds."""
        pipe = self.ctx.pipe
        pipe.require_fitted()
        thresholds = parse_thresholds(thresholds_text) + [pipe.threshold]
        questions = self.question_set("scenes", n, None)
        with self.ctx.job(request) as job:
            progress((0, len(set(thresholds)) + 1), desc="sweeping", unit="passes")
            points = sweep_thresholds(
                pipe, questions, thresholds, batch_size=8, max_new_tokens=self.ctx.max_new_tokens,
                progress=lambda d, t: progress((d, t), desc="sweeping", unit="passes"), on_step=job.step,
                clock=lambda: time.perf_counter() - job.paused_s, between_layers=job.checkpoint)
            cal = next(p for p in points if p.calibrated)
            # a loaded fixed-path system (skip_order): its path at each k, RoE's adapters standing in
            fixed_from = next(((name, o) for name, s in self.ctx.systems.items()
                               if not s.needs_fit and (o := s.skip_order())), None)
            if fixed_from:
                L = self.ctx.num_layers
                ks = sorted({*range(3, L // 2 + 1, 3), round(L - cal.mean_layers_executed)})
                points += sweep_fixed(
                    pipe, questions, fixed_from[1], ks, batch_size=8, max_new_tokens=self.ctx.max_new_tokens,
                    progress=lambda d, t: progress((d, t), desc="fixed paths", unit="passes"), on_step=job.step,
                    clock=lambda: time.perf_counter() - job.paused_s, between_layers=job.checkpoint)[1:]
        md = (f"**{sum(p.threshold is not None for p in points)} thresholds on {len(questions)} questions.** At the calibrated threshold "
              f"{cal.threshold:.2f}: {cal.mean_layers_executed:.1f} of {self.ctx.num_layers} layers, exact match "
              f"{cal.accuracy:.3f} (every layer: {points[0].accuracy:.3f}), **{cal.speedup:.2f}×** every layer's speed.")
        if fixed_from:
            md += (f" Fixed paths (the first k layers of {registry.label(fixed_from[0])}'s order skipped for every "
                   "input, RoE's adapters standing in) are the grey-dashed curve.")
        table = pd.DataFrame([[_point_label(p), round(p.mean_layers_executed, 2),
                               None if p.accuracy is None else round(p.accuracy, 3), round(p.agreement_with_dense, 3),
                               round(p.examples_per_s, 2), round(p.speedup, 2), "★" if p.calibrated else ""]
                              for p in points], columns=T.SWEEP_HEADERS)
        return {"sweep_md": md, "sweep_plot": FX.plot_sweep(points), "sweep_table": table,
                "sweep_json": {"n_questions": len(questions), "points": [p.to_dict() for p in points]},
                "sweep_state": points}

    def pick_threshold(self, points, evt: gr.SelectData):
        """A row of the sweep table -> the what-if threshold (and the What if tab)."""
        if not points or evt is None or evt.index is None:
            return {}
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        p = points[int(row)]
        if p.fixed_k is not None:
            return {"whatif_md": f"_That row is a fixed path (k = {p.fixed_k} layers skipped for every input): "
                                 "pick a threshold's row._"}
        if p.threshold is None:
            return {"whatif_md": "_That row is every layer (dense): pick a threshold's row._"}
        return {"threshold": p.threshold, "how": "threshold", "tabs": gr.Tabs(selected="whatif"),
                "whatif_md": f"_Threshold **{p.threshold:.2f}** from the sweep: press **Re-answer the last question** "
                             "to see this turn at it._"}

    # ---- batch composition ----
    @background_task("batch_md", stopped="_The batch run was stopped._", failed="Could not run the batch")
    def batching(self, chosen: list[int], request: gr.Request = None):
        """The chosen examples in one batch: own routes, the union rule and every layer, timed live."""
        self.ctx.pipe.require_fitted()
        examples = load_examples()
        picked = [examples[int(k)] for k in (chosen or []) if 0 <= int(k) < len(examples)]
        if len(picked) < 2:
            raise InputError("pick at least two questions")
        items = [(e["image"], e["question"], ()) for e in picked]
        with self.ctx.job(request) as job:
            c = compare_batching(self.ctx.pipe, items, repeats=self.ctx.speed_repeats,
                                 max_new_tokens=self.ctx.max_new_tokens, checkpoint=job.checkpoint)
        md = (f"**{len(items)} questions, {len({tuple(r) for r in c.routes})} different routes.** Per-example routing "
              f"ran {c.layer_runs['per_example']} (example, layer) pairs, the union rule {c.layer_runs['union']} "
              f"({sum(c.union)} of {self.ctx.num_layers} layers for everyone), every layer {c.layer_runs['dense']}. "
              f"Measured: **{c.speedup_vs_union:.2f}×** the union rule's speed and **{c.speedup_vs_dense:.2f}×** every "
              f"layer's ({c.seconds['per_example']:.3f} s, {c.seconds['union']:.3f} s, {c.seconds['dense']:.3f} s; "
              f"medians of {c.repeats}).")
        table = pd.DataFrame([[q, sum(r), sum(c.union), c.answers["per_example"][k], c.answers["union"][k],
                               c.answers["dense"][k]] for k, (q, r) in enumerate(zip(c.questions, c.routes))],
                             columns=T.BATCHING_HEADERS)
        return {"batch_md": md, "batch_plot": FX.plot_batching(c), "batch_table": table, "batch_json": c.to_dict()}

    # ---- image edits ----
    def load_for_edit(self, conv: Conversation):
        if conv.image is None:
            return {"edit_md": problem("Nothing to edit", "upload an image (or pick an example) first")}
        return {"editor": conv.image.copy(), "edit_md": "_Crop or paint, then re-answer._"}

    @background_task("edit_md", stopped="_The edited re-answer was stopped._",
                     failed="Could not re-answer on the edited image")
    def edited(self, conv: Conversation, editor, request: gr.Request = None):
        """The last question again, on the edited image (same earlier turns): route and answer before and after."""
        last, pipe = conv.last, self.ctx.pipe
        pipe.require_fitted()
        if last is None:
            raise InputError("ask a question about the image first")
        image = editor.get("composite") if isinstance(editor, dict) else editor
        if image is None:
            raise InputError("load the conversation's image into the editor (or upload one) and edit it")
        image = image.convert("RGB")
        with self.ctx.job(request) as job:
            after = pipe.answer_batch([pipe.prepare(image, last.question, conv.history(-1))], route="auto",
                                      threshold=last.trace.threshold, max_new_tokens=self.ctx.max_new_tokens,
                                      on_step=job.step, between_layers=job.checkpoint)[0]
        b, a = last.trace, after.trace
        changed = [i for i in range(len(b.route)) if b.route[i] != a.route[i]]
        md = (f"**{last.question}** — the edit changed {len(changed)} of {len(b.route)} layer decisions"
              + (f" (layers {', '.join(map(str, changed))})" if changed else "")
              + f": {b.layers_executed} → {a.layers_executed} layers run; the answer "
              + ("stayed the same." if after.text == last.answer else f"changed: “{last.answer}” → “{after.text}”."))
        table = pd.DataFrame([["original", b.layers_executed, last.answer], ["edited", a.layers_executed, after.text]],
                             columns=T.EDIT_HEADERS)
        data = {"question": last.question, "changed_layers": changed,
                "original": {"answer": last.answer, "route": b.route, "p_run": b.p_run},
                "edited": {"answer": after.text, "route": a.route, "p_run": a.p_run}}
        return {"edit_md": md, "edit_plot": FX.plot_route_change(b, a), "edit_table": table, "edit_json": data}
