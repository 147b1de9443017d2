"""The RoE Explorer page: chat about an image on the left, what each answer's route did on the right.

build_demo(pipe) lays the page out top to bottom as it appears and wires its events; the handlers
(class Explorer, below it) turn (this user's Conversation, inputs) into outputs. Each user's
conversation lives in that user's gr.State.

One model serves every user through a roe_core.serving.Server: chat turns and /answer calls that
arrive together are answered in one mixed-route batch, each streaming to its own user; speed
measurements, what-ifs and the side-by-side view run as background work that hands the model to plain
questions at every token. Stop (and closing the tab) cancels that user's work at its next token.
Limits (question tokens, history turns, questions per minute) refuse a request before any model work.

Endpoints (gradio_client api_names; the conversation state travels with the client's session):
    /ask        image, question              -> status, chat, trace, 4 figures... (streams the answer)
    /speed      measure                      -> speed figure, table, summary of the last turn
    /whatif     how, layers, threshold       -> what-if summary, table, route figure, speed figure
    /new_scene                               -> status, ..., image, suggested question
    /set_image  image                        -> status, ... (a new image starts a new conversation)
    /reset                                   -> status, ... (same image, no turns)
    /export                                  -> CSV file, JSON file, status
    /systems    systems, question            -> summary, table, 3 figures: the same question to every system
    /atlas      source, n, files           -> summary, 3 figures, table, CSV, data: every route of a question set
    /fidelity                              -> summary, figure, table, data: the last turn's adapters vs its layers
    /sweep      thresholds, n              -> summary, figure, table, data: accuracy vs layers vs speed
    /edit       editor value               -> summary, figure, table, data: the last question on an edited image
    /batching   chosen examples            -> summary, figure, table, data: own routes vs union rule vs dense
    /stop                                  -> status, chat: this session's work ends at its next token
    /answer     image, question, history_json, route, threshold, system -> JSON {answer, trace} (stateless)
"""
from __future__ import annotations

import atexit
import base64
import hashlib
import json
import logging
import queue
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from roe_core import InputError, RoEPipeline
from roe_core.analysis import adapter_fidelity, build_atlas, compare_batching, sweep_thresholds
from roe_core.scenes.questions import load_llava_questions, test_questions
from roe_core.serving import Cancelled, Job, Server
from roe_core.systems import LABELS, MOE_SYSTEMS
from roe_core.systems.pipeline import Pipeline
from roe_core.runtime.images import MAX_BYTES

from . import figures as F
from .examples import load_examples, scene_sample
from .session import Conversation, Turn, WhatIf, file_key

log = logging.getLogger("roe_explorer")

# The endpoints gradio's MCP server offers as tools (app.py --mcp)
MCP_TOOLS = ("answer", "atlas")

# Gradio lets this many plain questions (chat turns, /answer) in at once, so that the server can batch
# them; background work (speed, what-if, side by side) takes turns on the model through the server's gate.
PLAIN = dict(concurrency_id="plain", concurrency_limit=32)
BACKGROUND = dict(concurrency_id="background", concurrency_limit=4)

L1_CAPTION = (
    "**L1 distance** (the paper's Fig. 1), measured at prefill for each decoder layer: the mean over tokens "
    "of mean<sub>j</sub> |h<sub>out</sub> − h<sub>in</sub>|<sub>j</sub>, between the layer's input and output "
    "hidden states. "
    "A low value means the layer barely changes this example's features. Dotted grey: every layer run; "
    "blue: the path this turn took, each layer ● executed or ◆ skipped through its adapter."
)
SPEED_PENDING = "_Speed: the same turn is then run with every layer, interleaved, to time both paths…_"
SPEED_STOPPED = "_The speed measurement was stopped: press **Measure speed now** to time this turn._"
SPEED_OFF = ("_Speed not measured for this turn: press **Measure speed now** (or tick the box) to time it against "
             "every layer._")

CSS = """
#header h1 { margin-bottom: 0.1em; }
#model-info { font-size: 0.92em; }
.caption { font-size: 0.85em; color: #4b5563; }
"""


def launch_options() -> dict:
    """Arguments for demo.launch() that belong to the page (gradio 6 takes them at launch)."""
    return dict(theme=gr.themes.Soft(primary_hue="blue", neutral_hue="slate"), css=CSS,
                max_file_size=MAX_BYTES)


def build_demo(pipe: RoEPipeline, max_new_tokens: int = 48, speed_repeats: int = 3,
               notice: str | None = None, systems: dict[str, Pipeline] | None = None,
               server: Server | None = None, mcp: bool = False) -> gr.Blocks:
    """The whole page. notice: a warning shown under the title (e.g. why a fallback model is loaded).
    systems: every loaded system by name (the RoE pipe among them) for the side-by-side view.
    server: batches and schedules the model's work (default: Server() with its default limits).
    mcp: the page will be launched with gradio's MCP server (launch(mcp_server=True)): only /answer
    and /atlas become tools; the other endpoints stay callable by clients but undocumented."""
    ex = Explorer(pipe, max_new_tokens, speed_repeats, systems, server)
    L = ex.num_layers
    examples = load_examples()

    # uploads, scenes and exports older than a day leave gradio's cache (checked hourly)
    with gr.Blocks(title="RoE Explorer", fill_width=True, delete_cache=(3600, 86400)) as demo:
        conv = gr.State(Conversation())
        gr.Markdown("# RoE Explorer · Routing Experts, layer by layer\n"
                    "Ask about an image. For every answer the router decides, from your question alone, which "
                    "decoder layers run and which are skipped through a small adapter; the panels show what that "
                    "route did and what it saved.", elem_id="header")
        gr.Markdown(model_markdown(pipe.info), elem_id="model-info")
        if notice:
            gr.Markdown(f"> ⚠️ **{notice}**")

        with gr.Row(equal_height=False):
            # ---- left: the conversation ----
            with gr.Column(scale=4, min_width=360):
                image = gr.Image(type="filepath", label="Image (changing it starts a new conversation)",
                                 sources=["upload", "clipboard"], height=260, elem_id="image")
                with gr.Row():
                    new_scene_btn = gr.Button("New scene", size="sm", elem_id="new-scene")
                    reset_btn = gr.Button("New conversation", size="sm")
                chat = gr.Chatbot(label="Conversation", height=320, placeholder="Answers stream here.", elem_id="chat",
                                  buttons=["copy", "copy_all"])
                with gr.Row():
                    # the box people type in: a question, optionally with an image attached (or pasted)
                    question_box = gr.MultimodalTextbox(
                        placeholder="Ask a question about the image… (or attach a new image with it)",
                        file_types=["image"], file_count="single", sources=["upload"], show_label=False,
                        scale=5, lines=1, max_lines=4, submit_btn=False, elem_id="question")
                    # the question as plain text: what /ask, the examples, New scene and undo read and write
                    question = gr.Textbox(label="question", visible=False, elem_id="question-text")
                    ask_btn = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="ask")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="stop")
                status = gr.Markdown(label="status", elem_id="status")
                if examples:
                    gr.Examples([[e["image"], e["question"]] for e in examples], inputs=[image, question],
                                label="Examples: generated scenes, each with a suggested question",
                                example_labels=[f"{e['qtype']}: {e['question']}" for e in examples])

            # ---- right: what this turn's route did ----
            with gr.Column(scale=7):
                with gr.Row():
                    with gr.Column(min_width=320):
                        l1_plot = gr.Plot(F.empty_figure("Ask a question: each layer's L1 change appears here"),
                                          label="l1_figure", show_label=False, elem_id="l1-plot")
                        gr.Markdown(L1_CAPTION, elem_classes="caption")
                    with gr.Column(min_width=320):
                        route_plot = gr.Plot(F.empty_figure("Ask a question: the expert path appears here"),
                                             label="route_figure", show_label=False, elem_id="route-plot")
                        gr.Markdown("One square per decoder layer: **blue** executed, **orange** skipped through "
                                    "its adapter. Bars: the router's probability of running each layer (hover "
                                    "for values); a layer runs when it is above the threshold.",
                                    elem_classes="caption")
                with gr.Row():
                    with gr.Column(min_width=320):
                        usage_plot = gr.Plot(F.empty_figure("Adapter usage over the conversation appears here"),
                                             label="usage_figure", show_label=False, elem_id="usage-plot")
                        adapters_md = gr.Markdown(label="adapters", elem_classes="caption")
                    with gr.Column(min_width=320):
                        speed_plot = gr.Plot(F.empty_figure("Speed against every layer appears here"),
                                             label="speed_figure", show_label=False, elem_id="speed-plot")
                        speed_md = gr.Markdown(label="speed_summary", elem_id="speed-summary")
                speed_table = gr.Dataframe(headers=SPEED_HEADERS, label="speed_table", interactive=False,
                                           wrap=True, show_label=False, max_height=220,
                                           column_widths=["17%", "9%", "10%", "9%", "8%", "47%"])
                with gr.Row():
                    measure = gr.Checkbox(value=True, label="Measure speed against every layer after each answer",
                                          scale=3)
                    speed_btn = gr.Button("Measure speed now", size="sm", scale=1)

        with gr.Accordion("What if… re-answer the last question on another route", open=True):
            with gr.Row(equal_height=False):
                with gr.Column(scale=4):
                    how = gr.Radio([("the layers ticked below", "layers"),
                                    ("the router at this threshold", "threshold")], value="layers",
                                   label="Re-answer with")
                    layers = gr.CheckboxGroup([(str(i), i) for i in range(L)], value=list(range(L)),
                                              label="Layers to execute (unticked: skipped through the adapter; "
                                                    "filled in with the last route)", elem_id="whatif-layers")
                    threshold = gr.Slider(0.0, 1.0, value=pipe.threshold, step=0.01, label="Router threshold "
                                          "(a layer runs when p_run is above it)")
                    whatif_btn = gr.Button("Re-answer the last question", variant="primary", elem_id="whatif-go")
                with gr.Column(scale=7):
                    whatif_md = gr.Markdown("_Ask a question first; then switch layers or move the threshold._",
                                            label="whatif_summary", elem_id="whatif-summary")
                    whatif_table = gr.Dataframe(headers=WHATIF_HEADERS, label="whatif_table", interactive=False,
                                                wrap=True, show_label=False, max_height=220,
                                                column_widths=["22%", "10%", "11%", "10%", "47%"])
                    with gr.Row():
                        whatif_route = gr.Plot(F.empty_figure("The what-if route appears here", 220),
                                               label="whatif_route_figure", show_label=False)
                        whatif_speed = gr.Plot(F.empty_figure("Its speed against every layer appears here", 220),
                                               label="whatif_speed_figure", show_label=False)

        with gr.Accordion("Side by side: the same question to every system", open=True):
            with gr.Row(equal_height=False):
                with gr.Column(scale=4):
                    arena_systems = gr.CheckboxGroup([(LABELS.get(k, k), k) for k in ex.systems],
                                                     value=list(ex.systems), label="Systems to ask",
                                                     elem_id="arena-systems")
                    arena_q = gr.Textbox(label="Question (empty: the last one asked), about the image above, "
                                               "with this conversation's earlier turns", elem_id="arena-question")
                    arena_btn = gr.Button("Ask every system", variant="primary", elem_id="arena-go")
                    gr.Markdown(SYSTEMS_CAPTION, elem_classes="caption")
                with gr.Column(scale=7):
                    arena_md = gr.Markdown("_Pick systems and ask: each answers the same question; their latency "
                                           "is measured live, one after the other._", elem_id="arena-summary")
                    arena_table = gr.Dataframe(headers=SYSTEM_HEADERS, label="arena_table", interactive=False,
                                               wrap=True, show_label=False, max_height=240)
                    arena_plot = gr.Plot(F.empty_figure("Latency and active parameters appear here", 260),
                                         label="arena_figure", show_label=False)
            moe_plots = []
            for name in (n for n in MOE_SYSTEMS if n in ex.systems):
                with gr.Row():
                    moe_plots.append(gr.Plot(F.empty_figure(f"{LABELS[name]}: expert load per MoE layer, image vs "
                                                            "text", 300), label=f"{name}_expert_load_figure",
                                             show_label=False))
                    moe_plots.append(gr.Plot(F.empty_figure(f"{LABELS[name]}: each token's top-1 expert across "
                                                            "layers", 300), label=f"{name}_token_pathways_figure",
                                             show_label=False))
            if moe_plots:
                moe_plots.append(gr.Plot(F.empty_figure("Router rigidity: image vs text routing per MoE layer", 280),
                                         label="rigidity_figure", show_label=False))

        with gr.Accordion("Explore: route atlas, adapter fidelity, trade-off curve", open=True):
            with gr.Tabs():
                with gr.Tab("Route atlas", id="atlas-tab"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=3, min_width=300):
                            atlas_source = gr.Radio([("scenes of the test split", "scenes"),
                                                     ("my LLaVA JSON + its images (upload below)", "upload")],
                                                    value="scenes", label="Question set")
                            atlas_n = gr.Slider(4, 256, value=48, step=4, label="Questions (at most)")
                            atlas_files = gr.File(label="LLaVA JSON file and its images", file_count="multiple",
                                                  file_types=[".json", "image"])
                            atlas_btn = gr.Button("Build the atlas", variant="primary", elem_id="atlas-go")
                            gr.Markdown(ATLAS_CAPTION, elem_classes="caption")
                        with gr.Column(scale=7):
                            atlas_md = gr.Markdown("_Build the atlas: every question is answered and its route "
                                                   "drawn._", elem_id="atlas-summary")
                            atlas_plot = gr.Plot(F.empty_figure("The route atlas appears here", 360),
                                                 label="atlas_figure", show_label=False, elem_id="atlas-plot")
                    with gr.Row():
                        atlas_types_plot = gr.Plot(F.empty_figure("Skip rate per layer by question type", 240),
                                                   label="atlas_types_figure", show_label=False)
                        atlas_counts_plot = gr.Plot(F.empty_figure("How often each route occurs", 240),
                                                    label="atlas_counts_figure", show_label=False)
                    atlas_table = gr.Dataframe(headers=ATLAS_HEADERS, label="Examples in atlas order (click a row to "
                                               "open it in the chat)", interactive=False, wrap=True, max_height=300,
                                               elem_id="atlas-table")
                    with gr.Row():
                        atlas_csv = gr.File(label="atlas CSV")
                        atlas_json = gr.JSON(label="atlas data", open=False)
                with gr.Tab("Adapter fidelity", id="fidelity-tab"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=3, min_width=300):
                            fid_btn = gr.Button("Measure the last turn's adapters", variant="primary",
                                                elem_id="fidelity-go")
                            gr.Markdown(FIDELITY_CAPTION, elem_classes="caption")
                        with gr.Column(scale=7):
                            fid_md = gr.Markdown("_Ask a question, then measure: each skipped layer's adapter against "
                                                 "the layer it stood in for._", elem_id="fidelity-summary")
                            fid_plot = gr.Plot(F.empty_figure("Adapter fidelity appears here", 360),
                                               label="fidelity_figure", show_label=False, elem_id="fidelity-plot")
                    fid_table = gr.Dataframe(headers=FIDELITY_HEADERS, label="per layer", interactive=False,
                                             max_height=300)
                    fid_json = gr.JSON(label="fidelity data", open=False)
                with gr.Tab("Trade-off curve", id="sweep-tab"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=3, min_width=300):
                            sweep_thresholds_box = gr.Textbox(
                                value=", ".join(f"{t:.2f}" for t in default_thresholds(pipe.threshold)),
                                label="Router thresholds to sweep (the model's own is always added)")
                            sweep_n = gr.Slider(4, 128, value=24, step=4, label="Questions (scenes of the test split)")
                            sweep_btn = gr.Button("Sweep", variant="primary", elem_id="sweep-go")
                            gr.Markdown(SWEEP_CAPTION, elem_classes="caption")
                        with gr.Column(scale=7):
                            sweep_md = gr.Markdown("_Sweep: every threshold answers the same questions, timed in one "
                                                   "run beside every layer._", elem_id="sweep-summary")
                            sweep_plot = gr.Plot(F.empty_figure("The trade-off curve appears here", 360),
                                                 label="sweep_figure", show_label=False, elem_id="sweep-plot")
                    sweep_table = gr.Dataframe(headers=SWEEP_HEADERS, label="Points (click one to use its threshold in "
                                               "What if…)", interactive=False, max_height=300, elem_id="sweep-table")
                    sweep_json = gr.JSON(label="sweep data", open=False)
                with gr.Tab("Batch composition", id="batching-tab"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=3, min_width=300):
                            batch_pick = gr.CheckboxGroup(
                                [(f"{e['qtype']}: {e['question']}", k) for k, e in enumerate(examples)],
                                value=list(range(min(4, len(examples)))), label="Questions answered in one batch "
                                "(the examples, each with its image)")
                            batch_btn = gr.Button("Answer them in one batch, three ways", variant="primary",
                                                  elem_id="batching-go")
                            gr.Markdown(BATCHING_CAPTION, elem_classes="caption")
                        with gr.Column(scale=7):
                            batch_md = gr.Markdown("_Pick a few questions: they are answered together, with their "
                                                   "own routes, with the union of their routes and with every layer._",
                                                   elem_id="batching-summary")
                            batch_plot = gr.Plot(F.empty_figure("Per-example routing against the union rule", 320),
                                                 label="batching_figure", show_label=False, elem_id="batching-plot")
                    batch_table = gr.Dataframe(headers=BATCHING_HEADERS, label="per example", interactive=False,
                                               wrap=True, max_height=300)
                    batch_json = gr.JSON(label="batch data", open=False)
                with gr.Tab("Image edits", id="edits-tab"):
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=5, min_width=300):
                            editor = gr.ImageEditor(type="pil", label="Crop it, or paint over part of it",
                                                    sources=["upload", "clipboard"], height=320, elem_id="editor")
                            with gr.Row():
                                edit_load_btn = gr.Button("Load the conversation's image", size="sm")
                                edit_btn = gr.Button("Re-answer the last question on the edited image",
                                                     variant="primary", elem_id="edit-go")
                        with gr.Column(scale=5):
                            edit_md = gr.Markdown("_Load the image, edit it, and re-answer: the route and the answer "
                                                  "before and after, side by side._", elem_id="edit-summary")
                            edit_plot = gr.Plot(F.empty_figure("The two routes appear here", 240),
                                                label="edit_route_figure", show_label=False, elem_id="edit-plot")
                            edit_table = gr.Dataframe(headers=EDIT_HEADERS, interactive=False, wrap=True,
                                                      label="before and after")
                            edit_json = gr.JSON(label="edit data", open=False)
            atlas_state = gr.State(None)
            sweep_state = gr.State(None)

        with gr.Accordion("Export and raw trace", open=False):
            with gr.Row():
                export_btn = gr.Button("Export this conversation's traces")
                export_csv = gr.File(label="CSV (one row per turn × layer)")
                export_json = gr.File(label="JSON")
            export_md = gr.Markdown(label="export_status")
            trace_json = gr.JSON(label="trace (this turn)", open=False)

        # The stateless endpoint (/answer) reads and writes these; they are never shown.
        with gr.Group(visible=False):
            api_image = gr.File(label="image")
            api_question = gr.Textbox(label="question")
            api_history = gr.Textbox(label="history_json", value="[]")
            api_route = gr.Textbox(label="route", value="auto")
            api_threshold = gr.Number(label="threshold", value=None)
            api_system = gr.Textbox(label="system", value="roe")
            api_result = gr.Textbox(label="result_json")
            api_btn = gr.Button()
            api_ask_btn = gr.Button()

        # ---- events ----
        turn_views = [chat, trace_json, l1_plot, route_plot, usage_plot, adapters_md, layers, threshold,
                      speed_plot, speed_table, speed_md]
        speed_outputs = [conv, speed_plot, speed_table, speed_md]

        asked = gr.on([ask_btn.click, question_box.submit], ex.ask_box, [conv, image, question_box],
                      [conv, status, *turn_views, question_box, image], api_visibility="private", preprocess=False,
                      **PLAIN)
        api_ask_btn.click(ex.ask, [conv, image, question], [conv, status, *turn_views, question], api_name="ask",
                          preprocess=False, **PLAIN)
        question.change(lambda q: {"text": q or "", "files": []}, question, question_box, queue=False,
                        api_visibility="private")
        chat.retry(ex.retry, conv, [conv, status, *turn_views, question], api_name="retry", **PLAIN)
        chat.undo(ex.undo, conv, [conv, status, *turn_views, question], api_name="undo", **PLAIN)
        speed_evt = asked.then(ex.speed, [conv, measure], speed_outputs, api_name="speed", **BACKGROUND)
        speed_now_evt = speed_btn.click(ex.speed_now, conv, speed_outputs, api_visibility="private", **BACKGROUND)

        image.change(ex.set_image, [conv, image], [conv, status, *turn_views, image], api_name="set_image",
                     preprocess=False, **PLAIN)
        new_scene_btn.click(ex.new_scene, conv, [conv, status, *turn_views, image, question], api_name="new_scene",
                            **PLAIN)
        reset_btn.click(ex.reset, conv, [conv, status, *turn_views], api_name="reset", **PLAIN)

        layers.input(lambda: "layers", None, how, queue=False, api_visibility="private")
        threshold.input(lambda: "threshold", None, how, queue=False, api_visibility="private")
        whatif_evt = whatif_btn.click(ex.whatif, [conv, how, layers, threshold],
                                      [conv, whatif_md, whatif_table, whatif_route, whatif_speed], api_name="whatif",
                                      **BACKGROUND)

        export_btn.click(ex.export, conv, [export_csv, export_json, export_md], api_name="export",
                         concurrency_limit=None)
        arena_evt = arena_btn.click(ex.compare_systems, [conv, arena_systems, arena_q],
                                    [arena_md, arena_table, arena_plot, *moe_plots], api_name="systems", **BACKGROUND)
        atlas_evt = atlas_btn.click(ex.atlas, [atlas_source, atlas_n, atlas_files],
                                    [atlas_md, atlas_plot, atlas_types_plot, atlas_counts_plot, atlas_table, atlas_csv,
                                     atlas_json, atlas_state], api_name="atlas", **BACKGROUND)
        atlas_table.select(ex.open_atlas_example, atlas_state, [image, question], api_visibility="private")
        fid_evt = fid_btn.click(ex.fidelity, conv, [fid_md, fid_plot, fid_table, fid_json], api_name="fidelity",
                                **BACKGROUND)
        sweep_evt = sweep_btn.click(ex.sweep, [sweep_thresholds_box, sweep_n],
                                    [sweep_md, sweep_plot, sweep_table, sweep_json, sweep_state], api_name="sweep",
                                    **BACKGROUND)
        batch_evt = batch_btn.click(ex.batching, batch_pick, [batch_md, batch_plot, batch_table, batch_json],
                                    api_name="batching", **BACKGROUND)
        edit_load_btn.click(ex.load_for_edit, conv, [editor, edit_md], api_visibility="private", queue=False)
        edit_evt = edit_btn.click(ex.edited, [conv, editor], [edit_md, edit_plot, edit_table, edit_json], api_name="edit",
                                  **BACKGROUND)
        sweep_table.select(ex.pick_threshold, sweep_state, [threshold, how, whatif_md], api_visibility="private")
        api_btn.click(ex.answer_json, [api_image, api_question, api_history, api_route, api_threshold, api_system],
                      api_result, api_name="answer", **PLAIN)
        # Stop: this user's work ends at its next token (the page's events and the model's work alike)
        stop_btn.click(ex.stop, conv, [status, chat], api_name="stop", queue=False,
                       cancels=[asked, speed_evt, speed_now_evt, whatif_evt, arena_evt, atlas_evt, fid_evt, sweep_evt,
                                batch_evt, edit_evt])
        demo.unload(ex.closed)
    if mcp:
        for fn in demo.fns.values():
            if fn.api_visibility == "public" and fn.api_name not in MCP_TOOLS:
                fn.api_visibility = "undocumented"
    demo.queue(max_size=128)
    return demo


SYSTEM_HEADERS = ["system", "answer", "latency (s)", "tokens/s", "active params (M)", "total params (M)",
                  "what it decided"]
SYSTEMS_CAPTION = (
    "**Dense**: the unmodified transformers model, every layer. **RoE**: its router picks, from the question, "
    "which decoder layers run. **MoE-LLaVA**: every other layer's FFN is 4 experts, each token runs its top 2. "
    "**EvoMoE**: 4 experts evolved from one FFN's training, each token runs the top 1 its modality's router picks. "
    "Active parameters are those one token touches (RoE: the layers it ran plus adapters; MoE: 2 of 4 experts). "
    "All share one base: the same vision tower, projector and decoder.")
ATLAS_HEADERS = ["rank", "#", "type", "question", "answer", "reference", "correct", "layers run", "route"]
FIDELITY_HEADERS = ["layer", "ran", "adapter vs layer L1", "adapter vs layer cosine", "the layer's own change L1",
                    "routed vs dense twin L1", "twin cosine"]
SWEEP_HEADERS = ["threshold", "layers run (mean)", "accuracy", "agrees with dense", "examples/s", "speedup",
                 "calibrated"]
ATLAS_CAPTION = (
    "Each question is answered as in the chat (routes decided per example, in batches) and its route is drawn "
    "as a row: blue layers ran, orange ones were skipped through their adapters. Rows are clustered: identical "
    "routes together, each next one the nearest by Hamming distance. Your own set: a LLaVA JSON file "
    "(`[{\"image\": \"a.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nQ\"}, "
    "{\"from\": \"gpt\", \"value\": \"A\"}]}]`) uploaded with its images. Runs in the background: anyone's "
    "plain question goes first.")
FIDELITY_CAPTION = (
    "The last turn's prompt is run once more on its route. At every layer both the layer and its adapter see the "
    "same input, so a skipped layer's orange diamond is exactly the adapter's error there (L1: the mean over tokens "
    "of mean<sub>j</sub> |adapter − layer|<sub>j</sub>, beside the layer's own change, the grey Fig. 1 curve). "
    "Purple: how far the routed run has drifted from its dense twin after each layer. The summary gives the KL of "
    "the two runs' next-token distributions and whether the dense model answers the same.")
EDIT_HEADERS = ["image", "layers run", "answer"]
BATCHING_HEADERS = ["question", "its route: layers run", "union: layers run", "answer (own route)",
                    "answer (union)", "answer (every layer)"]
BATCHING_CAPTION = (
    "RoE decides a route per example, so a batch mixes routes. Here each layer runs only the examples routed "
    "through it (gathered, then scattered back) and the others pass through its adapter. The authors' rule for "
    "batches runs a layer for the whole batch if any example wants it: the union of the routes. All three are timed "
    "live in interleaved rounds after a warm-up; background work, so anyone's plain question goes first.")
SWEEP_CAPTION = (
    "Every threshold answers the same questions in the same batches, and so does every layer (dense), in one run: "
    "speedup is the dense pass's time over the threshold's (pauses for other users' questions excluded). Accuracy is "
    "exact match with the scene generator's answers. The star is the model's calibrated threshold; click a row of "
    "the table to re-answer the last question at that threshold in *What if…*.")
SPEED_HEADERS = ["path", "layers run", "latency (s)", "tokens/s", "tokens", "answer"]
WHATIF_HEADERS = ["path", "layers run", "latency (s)", "tokens/s", "answer"]
N_TURN_VIEWS = 11   # chat, trace, l1, route, usage, adapters, layers, threshold, speed plot, table, summary


def model_markdown(info: dict) -> str:
    """What is loaded, where, and what it knows: one line from pipe.info."""
    parts = [f"**Model** `{info.get('model')}`", f"**device** {info.get('device')} ({info.get('dtype')})",
             f"**decoder layers** {info.get('num_layers')}", f"**RoE parts** {info.get('roe', '—')}"]
    if info.get("trained_on"):
        parts.append(f"**trained on** {info['trained_on']}")
    shown = {"model", "device", "dtype", "num_layers", "roe", "trained_on"}
    parts += [f"**{k.replace('_', ' ')}** {v}" for k, v in info.items()
              if k not in shown and isinstance(v, (str, int, float)) and len(str(v)) < 120]
    text = " · ".join(parts)
    if info.get("model") == "embedded":
        text += ("\n\nThe embedded model learned from generated scenes of coloured shapes (like the examples): it "
                 "is not a photo model. `python app.py --model <LLaVA folder or hub id> --roe <RoE folder>` "
                 "loads a full LLaVA.")
    return text


class Explorer:
    """The page's handlers. Each takes this user's Conversation first and returns the new one first."""

    def __init__(self, pipe: RoEPipeline, max_new_tokens: int = 48, speed_repeats: int = 3,
                 systems: dict[str, Pipeline] | None = None, server: Server | None = None):
        self.pipe = pipe
        self.server = server or Server()
        self.systems = dict(systems or {"roe": pipe})
        self.max_new_tokens = max_new_tokens
        self.speed_repeats = speed_repeats
        self.num_layers = int(pipe.info["num_layers"])
        self.workdir = Path(tempfile.mkdtemp(prefix="roe_explorer_"))   # rendered scenes, exports
        atexit.register(shutil.rmtree, self.workdir, ignore_errors=True)  # gradio serves its own copies

    # ---- the conversation ----
    def ask(self, conv: Conversation, image, question: str, request: gr.Request = None):
        """Answers `question` about `image`, streaming the text; a new image starts a new conversation.
        Bad input leaves the conversation as it was and says why. The question joins whatever batch the
        server is gathering; a new question stops this user's own background work first."""
        question = (question or "").strip()
        user = owner_of(request)
        try:
            path = upload_path(image, self.workdir)
            if path is None:
                raise InputError("there is no image: upload one, pick an example or press New scene")
            if not question:
                raise InputError("the question is empty: type one (or pick an example)")
            if conv.image is not None and (not Path(path).is_file() or file_key(path) == conv.image_key):
                here = conv   # the same image (or its upload aged out of gradio's cache: the page still shows it)
            else:
                here = Conversation.about(path, upload_name(image))
            yield from self._answer(here, question, user)
        except Exception as e:  # noqa: BLE001  (every failure is shown; the app keeps serving)
            yield (conv, problem("Could not answer", e), *self.views(conv), question)

    def ask_box(self, conv: Conversation, image, box, request: gr.Request = None):
        """The multimodal box: its text is the question; an image attached to it becomes the conversation's
        image (a new conversation when it differs). Outputs as ask's, then the box and the image panel."""
        box = box if isinstance(box, dict) else {"text": str(box or ""), "files": []}
        text = box.get("text") or ""
        files = box.get("files") or []
        attached = upload_path(files[0], self.workdir) if files else None
        for out in self.ask(conv, attached or image, text, request):
            *views, left = out
            if left == "":            # answered: the box empties, the image panel shows the image asked about
                yield (*views, {"text": "", "files": []}, attached if attached else gr.skip())
            elif isinstance(left, str):   # refused: the box keeps what was typed (and attached)
                yield (*views, {"text": left, "files": files}, gr.skip())
            else:                     # streaming
                yield (*views, gr.skip(), gr.skip())

    def _answer(self, here: Conversation, question: str, user):
        """Streams the answer to `question` after the turns of `here`; yields the page's outputs."""
        if user is not None:
            self.server.cancel(user, questions=False)     # this user's speed measurement, what-if...
        answer = None
        for item in stream_ticket(lambda on_token: self.server.submit(
                self.pipe, here.image, question, here.history(), owner=user, on_token=on_token,
                max_new_tokens=self.max_new_tokens, trace_l1=True, dense_l1=True)):
            if isinstance(item, str):
                yield (gr.skip(), "", here.chat_messages(pending=(question, item)),
                       *[gr.skip()] * (N_TURN_VIEWS - 1), gr.skip())
            else:
                answer = item
        new = here.with_turn(Turn(question, answer.text, answer.trace))
        yield (new, "", *self.views(new), "")

    def retry(self, conv: Conversation, request: gr.Request = None):
        """The chat's retry: the last question asked again (its turn is replaced)."""
        last = conv.last
        if last is None:
            yield (conv, problem("Nothing to retry", "ask a question first"), *self.views(conv), gr.skip())
            return
        try:
            yield from self._answer(conv.without_last_turn(), last.question, owner_of(request))
        except Exception as e:  # noqa: BLE001
            yield (conv, problem("Could not answer", e), *self.views(conv), gr.skip())

    def undo(self, conv: Conversation):
        """The chat's undo: the last turn is taken back; its question returns to the box."""
        last = conv.last
        if last is None:
            return (conv, problem("Nothing to undo", "the conversation is empty"), *self.views(conv), gr.skip())
        new = conv.without_last_turn()
        return (new, "Took back the last turn.", *self.views(new), last.question)

    def stop(self, conv: Conversation, request: gr.Request = None):
        """The stop button: this user's question and background work end at their next token."""
        n = self.server.cancel(owner_of(request)) if owner_of(request) is not None else 0
        return ("Stopped." if n else "Nothing to stop."), conv.chat_messages()

    def closed(self, request: gr.Request = None):
        """The tab was closed: this user's background work ends at its next token. A question in flight
        (a second at most) is left to finish: gradio also reports a page whose heartbeat merely
        reconnected as closed, and that user is still waiting for the answer."""
        if owner_of(request) is not None:
            self.server.cancel(owner_of(request), questions=False)

    def set_image(self, conv: Conversation, image):
        """A new image (upload, example, new scene) starts a new conversation; the same image changes nothing."""
        path = upload_path(image, self.workdir)
        if path is None or not Path(path).is_file() or (conv.image is not None
                                                        and file_key(path) == conv.image_key):
            return (gr.skip(),) * (3 + N_TURN_VIEWS)
        try:
            new = Conversation.about(path, upload_name(image))
        except Exception as e:  # noqa: BLE001
            previous = conv.image_path if conv.image_path and Path(conv.image_path).is_file() else None
            return (conv, problem("Could not use that image", e), *self.views(conv), previous)
        return (new, f"New conversation about **{new.image_name}**.", *self.views(new), gr.skip())

    def new_scene(self, conv: Conversation):
        """A random scene from the scene generator, with a suggested question."""
        seed, img, qa = scene_sample()
        path = self.workdir / f"scene-{seed}.png"
        img.save(path)
        new = Conversation.about(path, f"scene {seed}")
        status = (f"New scene (seed {seed}) with a suggested question; the scene generator's own answer "
                  f"is **{qa.answer}**")
        return (new, status, *self.views(new), str(path), qa.question)

    def reset(self, conv: Conversation):
        new = conv.cleared()
        return (new, "New conversation about the same image." if new.image is not None else "", *self.views(new))

    # ---- what this turn's route did ----
    def views(self, conv: Conversation) -> tuple:
        """Everything shown about the last turn (and the conversation), in the order of build_demo's turn_views."""
        last = conv.last
        chat = conv.chat_messages()
        if last is None:
            return (chat, None, F.empty_figure("Ask a question: each layer's L1 change appears here"),
                    F.empty_figure("Ask a question: the expert path appears here"),
                    F.empty_figure("Adapter usage over the conversation appears here"), "",
                    list(range(self.num_layers)), gr.skip(),
                    F.empty_figure("Speed against every layer appears here"), None, "")
        t = last.trace
        trace = {"turn": len(conv.turns), "question": last.question, "answer": last.answer, **t.to_dict()}
        used = ", ".join(map(str, t.adapters_used)) or "none"
        adapters = (f"**Adapters this turn:** layers {used} ({len(t.adapters_used)} of {len(t.route)}) were skipped "
                    f"and their adapters stood in. Map: every turn of this conversation (orange = skipped); bars: how "
                    f"often each layer was skipped across its {len(conv.turns)} turn(s).")
        return (chat, trace, F.plot_layer_l1(t), F.plot_route(t), F.plot_adapter_usage([x.trace for x in conv.turns]),
                adapters, [i for i, r in enumerate(t.route) if r], t.threshold, *speed_views(last.speed))

    def speed(self, conv: Conversation, measure: bool = True, request: gr.Request = None):
        """Times the last turn with its route and with every layer (interleaved repeats), once per turn.
        Background work: plain questions of any user go first, at every token."""
        last = conv.last
        if last is None:
            return conv, gr.skip(), gr.skip(), ""
        if last.speed is not None:
            return (conv, *speed_views(last.speed))
        if not measure:
            return conv, gr.skip(), gr.skip(), SPEED_OFF
        try:
            with self.server.background(owner_of(request)) as job:
                cmp = self.pipe.compare(conv.image, last.question, conv.history(-1), route="auto",
                                        threshold=last.trace.threshold, max_new_tokens=self.max_new_tokens,
                                        repeats=self.speed_repeats, checkpoint=job.checkpoint)
        except Cancelled:
            return conv, gr.skip(), gr.skip(), SPEED_STOPPED
        except Exception as e:  # noqa: BLE001
            return conv, gr.skip(), gr.skip(), problem("Could not measure the speed", e)
        new = conv.with_speed(cmp)
        return (new, *speed_views(cmp))

    def speed_now(self, conv: Conversation, request: gr.Request = None):
        return self.speed(conv, True, request)

    def whatif(self, conv: Conversation, how: str, layers: list[int], threshold: float, request: gr.Request = None):
        """Re-answers the last question on a hand-picked route or at another router threshold, timed
        against every layer (background work, like the speed measurement)."""
        last = conv.last
        if last is None:
            return conv, problem("Nothing to re-answer", "ask a question first"), None, gr.skip(), gr.skip()
        L = self.num_layers
        try:
            if how == "threshold":
                route, thr = "auto", float(threshold)
                what = f"the router at threshold **{thr:.2f}**"
            else:
                keep = {int(i) for i in (layers or [])}
                route, thr = [i in keep for i in range(L)], last.trace.threshold
                what = f"layers **{', '.join(map(str, sorted(keep))) or 'none'}** executed by hand"
            with self.server.background(owner_of(request)) as job:
                cmp = self.pipe.compare(conv.image, last.question, conv.history(-1), route=route, threshold=thr,
                                        max_new_tokens=self.max_new_tokens, repeats=self.speed_repeats,
                                        checkpoint=job.checkpoint)
        except Cancelled:
            return conv, "_The what-if run was stopped._", None, gr.skip(), gr.skip()
        except Exception as e:  # noqa: BLE001
            return conv, problem("Could not re-answer", e), None, gr.skip(), gr.skip()
        new = conv.with_whatif(WhatIf(len(conv.turns) - 1, how, cmp))
        w = cmp.roe.trace
        same = "the **same** answer" if cmp.roe.text == last.answer else "a **different** answer"
        md = (f"**Turn {len(conv.turns)}, re-answered with {what}:** {w.layers_executed} of {L} layers ran "
              f"(the router's route ran {last.trace.layers_executed}); {same}; **{cmp.speedup:.2f}×** the speed of "
              f"every layer (medians of {cmp.repeats} interleaved run(s)).")
        orig = last.speed
        rows = [["router's route (this turn)", last.trace.layers_executed,
                 round(orig.roe_s, 4) if orig else None,
                 round(F.tokens_per_s(orig.roe.trace.new_tokens, orig.roe_s), 1) if orig else None, last.answer],
                ["what-if", w.layers_executed, round(cmp.roe_s, 4),
                 round(F.tokens_per_s(w.new_tokens, cmp.roe_s), 1), cmp.roe.text],
                ["every layer (dense)", cmp.dense.trace.layers_executed, round(cmp.dense_s, 4),
                 round(F.tokens_per_s(cmp.dense.trace.new_tokens, cmp.dense_s), 1), cmp.dense.text]]
        return (new, md, pd.DataFrame(rows, columns=WHATIF_HEADERS), F.plot_route(w, label="What-if path"),
                F.plot_speed(cmp, label="what-if"))

    # ---- export ----
    def export(self, conv: Conversation):
        """The conversation's traces as CSV (one row per turn x layer) and JSON."""
        if not conv.turns:
            return None, None, problem("Nothing to export", "ask a question first")
        csv_path, json_path = conv.export(self.workdir / "exports")
        rows = len(conv.rows())
        return (str(csv_path), str(json_path),
                f"Exported {len(conv.turns)} turn(s) and {len(conv.whatifs)} what-if(s): {rows} rows.")

    # ---- the side-by-side view ----
    def system_pipe(self, name: str) -> Pipeline:
        name = (name or "roe").strip()
        if name not in self.systems:
            raise InputError(f"unknown system {name!r}: this app has {', '.join(self.systems)}")
        return self.systems[name]

    def compare_systems(self, conv: Conversation, chosen: list[str], question: str, request: gr.Request = None):
        """The same question (default: the last one asked) about this conversation's image, with its earlier
        turns, to each chosen system in turn. -> (summary, table, figure, then per loaded MoE system its
        expert load and token pathways, and the rigidity figure of the MoE systems)."""
        moe_loaded = [n for n in MOE_SYSTEMS if n in self.systems]
        keep = (gr.skip(),) * (2 + 2 * len(moe_loaded) + (1 if moe_loaded else 0))
        try:
            chosen = [c for c in (chosen or []) if c in self.systems]
            if not chosen:
                raise InputError("pick at least one system")
            question = (question or "").strip()
            history = conv.history()
            if not question and conv.last is not None:   # the last question, asked again with what preceded it
                question, history = conv.last.question, conv.history(-1)
            if not question:
                raise InputError("the question is empty: type one here or ask one in the chat first")
            if conv.image is None:
                raise InputError("there is no image: upload one (or pick an example) before asking")
            rows, moe = [], {}
            with self.server.background(owner_of(request)) as job:
                answers = {}
                for name in chosen:
                    pipe = self.systems[name]
                    item = pipe.prepare(conv.image, question, history)
                    answers[name] = timed(job, lambda on_step: pipe.answer_batch(
                        [item], max_new_tokens=self.max_new_tokens, on_step=on_step)[0])
                    job.turn()
            for name in chosen:
                pipe, ans = self.systems[name], answers[name]
                secs = ans.timing.total_s
                if isinstance(pipe, RoEPipeline):
                    counts = pipe.parameter_counts(ans.trace.layers_executed)
                    decided = f"ran {ans.trace.layers_executed} of {len(ans.trace.route)} layers"
                elif name in MOE_SYSTEMS:
                    counts = pipe.parameter_counts()
                    moe[name] = (pipe, ans)
                    decided = (f"top-{pipe.model.config.top_k} of {pipe.model.config.num_experts} experts in "
                               f"{len(pipe.model.moe_layers)} MoE layers")
                else:
                    counts = pipe.parameter_counts()
                    decided = "every layer"
                rows.append({"system": LABELS.get(name, name), "answer": ans.text, "seconds": secs,
                             "tokens_per_s": F.tokens_per_s(ans.trace.new_tokens, secs),
                             "active_m": counts.active / 1e6, "total_m": counts.total / 1e6, "decided": decided})
        except Cancelled:
            return ("_The side-by-side run was stopped._", *keep)
        except Exception as e:  # noqa: BLE001
            return (problem("Could not compare", e), *keep)
        table = pd.DataFrame([[r["system"], r["answer"], round(r["seconds"], 3), round(r["tokens_per_s"], 1),
                               round(r["active_m"], 3), round(r["total_m"], 3), r["decided"]] for r in rows],
                             columns=SYSTEM_HEADERS)
        fastest = min(rows, key=lambda r: r["seconds"])
        md = f"**{question}** — fastest: **{fastest['system']}** ({fastest['seconds']:.3f} s). " + " · ".join(
            f"{r['system']}: {r['seconds']:.3f} s ({r['seconds'] / fastest['seconds']:.2f}×)" for r in rows)
        if len({r["answer"] for r in rows}) > 1:
            md += " · the answers differ."
        figs = []
        for name in moe_loaded:
            if name not in moe:
                figs += [F.empty_figure(f"Tick {LABELS[name]} to see its expert load and token pathways", 300)] * 2
                continue
            pipe, ans = moe[name]
            tok = pipe.encoder.tokenizer
            image_id = pipe.model.base.config.image_token_id
            words = ["<image>" if t == image_id else tok.convert_ids_to_tokens(t) for t in ans.trace.token_ids.tolist()]
            figs.append(F.plot_expert_load(ans.trace, pipe.model.config.num_experts,
                                           f"{LABELS[name]}: expert load per MoE layer, this turn (image | text tokens)"))
            figs.append(F.plot_token_pathways(ans.trace, words, f"{LABELS[name]}: token pathways, this turn "
                                                                "(hover a token)"))
        if moe_loaded:
            figs.append(F.plot_rigidity({LABELS[n]: (moe[n][1].trace, moe[n][0].model.config.num_experts) for n in moe})
                        if moe else F.empty_figure("Tick a MoE system to see its router rigidity", 280))
        return (md, table, F.plot_systems(rows), *figs)

    # ---- explore: the route atlas, adapter fidelity, the trade-off curve ----
    def question_set(self, source: str, n: int, files) -> list:
        """The scene test split's first-turn questions, or the uploaded LLaVA JSON's (with its images)."""
        n = max(1, int(n))
        if source == "upload":
            paths = [upload_path(f, self.workdir) for f in (files or [])]
            paths = [Path(x) for x in paths if x]
            if not any(x.suffix.lower() == ".json" for x in paths):
                raise InputError("upload a LLaVA JSON file (with the images it names), or pick the scene test split")
            folder = Path(tempfile.mkdtemp(prefix="set-", dir=self.workdir))
            for x in paths:     # one folder, the uploaded names: the JSON finds its images beside it
                shutil.copy(x, folder / (x.name if x.suffix.lower() != ".json" else "questions.json"))
            return load_llava_questions(folder, limit=n)
        return [q for q in test_questions(3 * n) if not q.history][:n]

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
        keep = (gr.skip(),) * 7
        try:
            questions = self.question_set(source, n, files)
            with self.server.background(owner_of(request)) as job:
                progress((0, len(questions)), desc="answering", unit="questions")
                atlas = build_atlas(self.pipe, questions, batch_size=8, max_new_tokens=self.max_new_tokens,
                                    progress=lambda d, t: progress((d, t), desc="answering", unit="questions"),
                                    on_step=job.step, between_layers=job.checkpoint)
        except Cancelled:
            return ("_The atlas run was stopped._", *keep)
        except Exception as e:  # noqa: BLE001
            return (problem("Could not build the atlas", e), *keep)
        rows = atlas.rows()
        csv_path = self.workdir / "exports" / f"roe-atlas-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(csv_path, index=False)
        counts = atlas.route_counts()
        scored = [e for e in atlas.entries if e.correct is not None]
        md = (f"**{len(atlas.entries)} questions, {atlas.distinct_routes} distinct routes**; the most common is "
              f"taken by {counts[0][1]} ({counts[0][1] / len(atlas.entries):.0%}), {sum(1 for _, c in counts if c == 1)} "
              f"routes occur once. Mean {statistics.mean(e.layers_executed for e in atlas.entries):.1f} of "
              f"{atlas.num_layers} layers run" + (f"; exact match {statistics.mean(e.correct for e in scored):.3f} "
                                                 f"on the {len(scored)} with a reference" if scored else "") + ".")
        table = pd.DataFrame([[r["rank"], r["index"], r["qtype"], r["question"], r["answer"], r["gold"],
                               "" if r["correct"] is None else ("✓" if r["correct"] else "✗"), r["layers_executed"],
                               r["route"]] for r in rows], columns=ATLAS_HEADERS)
        return (md, F.plot_atlas(atlas), F.plot_skip_by_type(atlas), F.plot_route_counts(atlas), table, str(csv_path),
                atlas.to_dict(), (atlas, questions))

    def open_atlas_example(self, state, evt: gr.SelectData):
        """A row of the atlas table -> that example's image and question in the chat (a new conversation)."""
        if not state or evt is None or evt.index is None:
            return gr.skip(), gr.skip()
        atlas, questions = state
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        q = questions[atlas.entries[atlas.order[int(row)]].index]
        if isinstance(q.image, (str, Path)):
            path = str(q.image)
        else:
            path = str(self.workdir / f"atlas-{hashlib.sha1(q.image.tobytes()).hexdigest()[:16]}.png")
            if not Path(path).is_file():
                q.image.save(path)
        return path, q.question

    def fidelity(self, conv: Conversation, request: gr.Request = None):
        """How good each adapter of the last turn was, and how far the route drifted from its dense twin."""
        keep = (gr.skip(),) * 3
        last = conv.last
        if last is None:
            return (problem("Nothing to measure", "ask a question first"), *keep)
        try:
            with self.server.background(owner_of(request)) as job:
                fid = adapter_fidelity(self.pipe, conv.image, last.question, conv.history(-1), route=last.trace.route,
                                       between_layers=job.checkpoint)
                job.turn()
                dense = self.pipe.answer_batch([self.pipe.prepare(conv.image, last.question, conv.history(-1))],
                                               "dense", None, self.max_new_tokens, on_step=job.step,
                                               between_layers=job.checkpoint)[0]
        except Cancelled:
            return ("_The fidelity run was stopped._", *keep)
        except Exception as e:  # noqa: BLE001
            return (problem("Could not measure the adapters", e), *keep)
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
                              for i, r in enumerate(fid.route)], columns=FIDELITY_HEADERS)
        data = {"turn": len(conv.turns), "question": last.question, "answer": last.answer, "dense_answer": dense.text,
                "answers_agree": same, **fid.to_dict()}
        return md, F.plot_fidelity(fid, last.trace.l1_dense), table, data

    def sweep(self, thresholds_text: str, n: int, request: gr.Request = None, progress=gr.Progress()):
        """Accuracy against layers executed and measured speed over router thresholds."""
        keep = (gr.skip(),) * 4
        try:
            thresholds = parse_thresholds(thresholds_text) + [self.pipe.threshold]
            questions = self.question_set("scenes", n, None)
            with self.server.background(owner_of(request)) as job:
                total = len(set(thresholds)) + 1
                progress((0, total), desc="sweeping", unit="passes")
                points = sweep_thresholds(
                    self.pipe, questions, thresholds, batch_size=8, max_new_tokens=self.max_new_tokens,
                    progress=lambda d, t: progress((d, t), desc="sweeping", unit="passes"), on_step=job.step,
                    clock=lambda: time.perf_counter() - job.paused_s, between_layers=job.checkpoint)
        except Cancelled:
            return ("_The sweep was stopped._", *keep)
        except Exception as e:  # noqa: BLE001
            return (problem("Could not sweep", e), *keep)
        cal = next(p for p in points if p.calibrated)
        metric = "exact match"
        md = (f"**{len(points) - 1} thresholds on {len(questions)} questions.** At the calibrated threshold "
              f"{cal.threshold:.2f}: {cal.mean_layers_executed:.1f} of {self.num_layers} layers, {metric} "
              f"{cal.accuracy:.3f} (every layer: {points[0].accuracy:.3f}), **{cal.speedup:.2f}×** every layer's speed.")
        table = pd.DataFrame([["dense" if p.threshold is None else round(p.threshold, 3), round(p.mean_layers_executed, 2),
                               None if p.accuracy is None else round(p.accuracy, 3), round(p.agreement_with_dense, 3),
                               round(p.examples_per_s, 2), round(p.speedup, 2), "★" if p.calibrated else ""]
                              for p in points], columns=SWEEP_HEADERS)
        data = {"n_questions": len(questions), "points": [p.to_dict() for p in points]}
        return md, F.plot_sweep(points), table, data, points

    def batching(self, chosen: list[int], request: gr.Request = None):
        """The chosen examples in one batch: own routes, the union rule and every layer, timed live."""
        keep = (gr.skip(),) * 3
        examples = load_examples()
        try:
            picked = [examples[int(k)] for k in (chosen or []) if 0 <= int(k) < len(examples)]
            if len(picked) < 2:
                raise InputError("pick at least two questions")
            items = [(e["image"], e["question"], ()) for e in picked]
            with self.server.background(owner_of(request)) as job:
                c = compare_batching(self.pipe, items, repeats=self.speed_repeats, max_new_tokens=self.max_new_tokens,
                                     checkpoint=job.checkpoint)
        except Cancelled:
            return ("_The batch run was stopped._", *keep)
        except Exception as e:  # noqa: BLE001
            return (problem("Could not run the batch", e), *keep)
        L = self.num_layers
        md = (f"**{len(items)} questions, {len({tuple(r) for r in c.routes})} different routes.** Per-example routing "
              f"ran {c.layer_runs['per_example']} (example, layer) pairs, the union rule {c.layer_runs['union']} "
              f"({sum(c.union)} of {L} layers for everyone), every layer {c.layer_runs['dense']}. Measured: "
              f"**{c.speedup_vs_union:.2f}×** the union rule's speed and **{c.speedup_vs_dense:.2f}×** every layer's "
              f"({c.seconds['per_example']:.3f} s, {c.seconds['union']:.3f} s, {c.seconds['dense']:.3f} s; medians of "
              f"{c.repeats}).")
        table = pd.DataFrame([[q, sum(r), sum(c.union), c.answers["per_example"][k], c.answers["union"][k],
                               c.answers["dense"][k]] for k, (q, r) in enumerate(zip(c.questions, c.routes))],
                             columns=BATCHING_HEADERS)
        return md, F.plot_batching(c), table, c.to_dict()

    def load_for_edit(self, conv: Conversation):
        if conv.image is None:
            return gr.skip(), problem("Nothing to edit", "upload an image (or pick an example) first")
        return conv.image.copy(), "_Crop or paint, then re-answer._"

    def edited(self, conv: Conversation, editor, request: gr.Request = None):
        """The last question again, on the edited image (same earlier turns): route and answer before and after."""
        keep = (gr.skip(),) * 3
        last = conv.last
        try:
            if last is None:
                raise InputError("ask a question about the image first")
            image = editor.get("composite") if isinstance(editor, dict) else editor
            if image is None:
                raise InputError("load the conversation's image into the editor (or upload one) and edit it")
            image = image.convert("RGB")
            with self.server.background(owner_of(request)) as job:
                after = self.pipe.answer_batch([self.pipe.prepare(image, last.question, conv.history(-1))], "auto",
                                               last.trace.threshold, self.max_new_tokens, on_step=job.step,
                                               between_layers=job.checkpoint)[0]
        except Cancelled:
            return ("_The edited re-answer was stopped._", *keep)
        except Exception as e:  # noqa: BLE001
            return (problem("Could not re-answer on the edited image", e), *keep)
        b, a = last.trace, after.trace
        changed = [i for i in range(len(b.route)) if b.route[i] != a.route[i]]
        md = (f"**{last.question}** — the edit changed {len(changed)} of {len(b.route)} layer decisions"
              + (f" (layers {', '.join(map(str, changed))})" if changed else "")
              + f": {b.layers_executed} → {a.layers_executed} layers run; the answer "
              + ("stayed the same." if after.text == last.answer else f"changed: “{last.answer}” → “{after.text}”."))
        table = pd.DataFrame([["original", b.layers_executed, last.answer], ["edited", a.layers_executed, after.text]],
                             columns=EDIT_HEADERS)
        data = {"question": last.question, "changed_layers": changed,
                "original": {"answer": last.answer, "route": b.route, "p_run": b.p_run},
                "edited": {"answer": after.text, "route": a.route, "p_run": a.p_run}}
        return md, F.plot_route_change(b, a), table, data

    def pick_threshold(self, points, evt: gr.SelectData):
        """A row of the sweep table -> the what-if threshold."""
        if not points or evt is None or evt.index is None:
            return gr.skip(), gr.skip(), gr.skip()
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        p = points[int(row)]
        if p.threshold is None:
            return gr.skip(), gr.skip(), "_That row is every layer (dense): pick a threshold's row._"
        return (p.threshold, "threshold", f"_Threshold **{p.threshold:.2f}** from the sweep: press **Re-answer the last "
                                          "question** to see this turn at it._")

    # ---- the stateless endpoint ----
    def answer_json(self, image, question: str, history_json: str = "[]", route: str = "auto",
                    threshold: float | None = None, system: str = "roe", request: gr.Request = None) -> str:
        """Answers a question about an image with RoE Explorer's model and says how: for RoE, which decoder
        layers ran and which were skipped through their adapters (the route), with the router's
        probabilities; for the MoE systems, the experts each token used.

        Args:
            image: the image file
            question: the question about it
            history_json: earlier turns as JSON, [["question", "answer"], ...] ("[]" for none)
            route: RoE's route: "auto" (the router decides), "dense" (every layer) or a JSON list of
                booleans, one per decoder layer
            threshold: RoE's router threshold (empty: the model's calibrated one)
            system: "roe", "dense", "moe_llava" or "evomoe"
        Returns:
            JSON {"answer", "trace", "num_layers", "model", "system", "seconds"}, or {"error"} with what
            was wrong (route and threshold are RoE's only)
        """
        try:
            pipe = self.system_pipe(system)
            path = upload_path(image, self.workdir)
            if path is None:
                raise InputError("there is no image")
            history = parse_history(history_json)
            if isinstance(pipe, RoEPipeline):
                options = dict(route=parse_route(route, self.num_layers), trace_l1=True, dense_l1=True,
                               threshold=None if threshold is None else float(threshold))
            else:
                if (route or "auto").strip() != "auto" or threshold is not None:
                    raise InputError(f"route and threshold are RoE's options; {pipe.system} takes none")
                options = {}
            ans = self.server.answer(pipe, path, question, history, owner=owner_of(request),
                                     max_new_tokens=self.max_new_tokens, **options)
            return json.dumps({"answer": ans.text, "trace": ans.trace.to_dict(), "num_layers": self.num_layers,
                               "model": pipe.info.get("model"), "system": pipe.system,
                               "seconds": ans.timing.total_s if ans.timing else None})
        except Exception as e:  # noqa: BLE001
            return json.dumps({"error": message_of(e)})


def speed_views(cmp) -> tuple:
    """(speed figure, table, summary) of a SpeedComparison, or placeholders while it is being measured."""
    if cmp is None:
        return F.empty_figure("Timing the route against every layer…"), None, SPEED_PENDING
    rows = []
    for name, a, secs in (("RoE route", cmp.roe, cmp.roe_s), ("every layer (dense)", cmp.dense, cmp.dense_s)):
        rows.append([name, a.trace.layers_executed, round(secs, 4), round(F.tokens_per_s(a.trace.new_tokens, secs), 1),
                     a.trace.new_tokens, a.text])
    md = (f"**{cmp.speedup:.2f}×** the speed of every layer: {cmp.roe_s:.3f} s against {cmp.dense_s:.3f} s "
          f"(medians of {cmp.repeats} interleaved run(s) each, measured live on this turn). "
          + ("Same answer." if cmp.roe.text == cmp.dense.text else "The answers differ (below)."))
    return F.plot_speed(cmp), pd.DataFrame(rows, columns=SPEED_HEADERS), md


def default_thresholds(calibrated: float) -> list[float]:
    """A sweep around the calibrated threshold, from few layers skipped to many."""
    return sorted({round(min(0.95, max(0.05, calibrated + d)), 2) for d in (-0.3, -0.2, -0.1, -0.05, 0.05, 0.1, 0.2)})


def parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(x) for x in (text or "").replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise InputError(f"thresholds should be numbers between 0 and 1, separated by commas (e.g. 0.3, 0.5, 0.7); "
                         f"got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise InputError("thresholds should be numbers between 0 and 1, separated by commas (e.g. 0.3, 0.5, 0.7)")
    if len(values) > 12:
        raise InputError(f"at most 12 thresholds per sweep (got {len(values)})")
    return values


def stream_ticket(submit, every: float = 0.05):
    """submit(on_token) -> Future of an Answer (Server.submit). Yields the text so far (at most every
    `every` s) while the server answers, then the Answer; raises the request's own error."""
    q: queue.Queue = queue.Queue()
    future = submit(q.put)
    future.add_done_callback(lambda f: q.put(None))
    shown = 0.0
    while True:
        item = q.get()
        if item is None:
            yield future.result()
            return
        if time.perf_counter() - shown >= every:
            shown = time.perf_counter()
            yield item


def timed(job: Job, run):
    """run(on_step) -> Answer, run again (at most twice) when the job paused for other users' questions
    during it, so that its timing is its own."""
    for _ in range(3):
        before = job.pauses
        ans = run(job.step)
        if job.pauses == before:
            break
    return ans


def owner_of(request: gr.Request | None):
    """Whose request this is: the browser tab's (or gradio_client's) session."""
    return getattr(request, "session_hash", None) if request is not None else None


def upload_path(value, workdir: Path) -> str | None:
    """The server path of an uploaded file, from an unprocessed component value (FileData dict or path)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if value.get("path"):
            return value["path"]
        url = value.get("url") or ""
        if url.startswith("data:"):   # pasted images may arrive inline
            data = base64.b64decode(url.split(",", 1)[1])
            path = workdir / f"pasted-{hashlib.sha1(data).hexdigest()[:16]}"
            path.write_bytes(data)
            return str(path)
    return None


def upload_name(value) -> str | None:
    return value.get("orig_name") if isinstance(value, dict) else None


HISTORY_EXAMPLE = '[["How many circles are there?", "2"], ["What colour is the big one?", "red"]]'


def parse_history(text) -> list[tuple[str, str]]:
    """history_json: a JSON list of [question, answer] pairs (or {"question", "answer"} objects)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return []
    if isinstance(text, str):
        try:
            pairs = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"history_json is not valid JSON (at character {e.pos}: {e.msg.lower()}). It should be "
                             f"a list of [question, answer] pairs, e.g. {HISTORY_EXAMPLE}, or [] for none") from None
    else:
        pairs = text
    if not isinstance(pairs, list):
        raise InputError(f"history_json should be a list of [question, answer] pairs, e.g. {HISTORY_EXAMPLE}; got "
                         f"a JSON {type(pairs).__name__}")
    out = []
    for k, p in enumerate(pairs):
        if isinstance(p, dict):
            p = (p.get("question"), p.get("answer"))
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p)):
            raise InputError(f"turn {k + 1} of history_json is not a [question, answer] pair of strings; the whole "
                             f"history should look like {HISTORY_EXAMPLE}")
        out.append((p[0], p[1]))
    return out


def parse_route(route, num_layers: int | None = None) -> str | list[bool]:
    """"auto", "dense", or a JSON list of booleans / 0-1, one per decoder layer."""
    route = (route or "auto") if isinstance(route, str) else route
    if isinstance(route, str) and route.strip() in ("auto", "dense"):
        return route.strip()
    want = f"{num_layers} " if num_layers else ""
    usage = (f'route should be "auto" (the router decides), "dense" (every layer) or a JSON list of {want}'
             "booleans, one per decoder layer (true: run it, false: skip it through its adapter)")
    if isinstance(route, str):
        try:
            items = json.loads(route)
        except json.JSONDecodeError:
            raise InputError(f"{usage}; got {route[:60]!r}") from None
    else:
        items = route
    if not isinstance(items, list) or not all(isinstance(x, (bool, int)) and x in (0, 1) for x in items):
        raise InputError(f"{usage}; got {str(route)[:60]!r}")
    if num_layers and len(items) != num_layers:
        raise InputError(f"{usage}; got a list of {len(items)}")
    return [bool(x) for x in items]


def message_of(e: BaseException) -> str:
    if isinstance(e, (InputError, json.JSONDecodeError)):
        return str(e)
    if isinstance(e, Image.DecompressionBombError):   # raised by PIL while opening, before load_image's own check
        return f"the image is too large to open safely (a decompression bomb?): {e}"
    log.exception("unexpected error", exc_info=e)
    return f"{type(e).__name__}: {e}"


def problem(what: str, e) -> str:
    """A message for the page (and a toast); the conversation is never touched by it."""
    msg = (e if isinstance(e, str) else message_of(e)).rstrip(".")
    gr.Warning(f"{what}: {msg}")
    return f"> ⚠️ **{what}:** {msg}. The conversation so far is kept."
