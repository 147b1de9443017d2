"""The RoE Explorer page, in page order: a one-line header, then gradio tabs: **Chat** (the image and the
conversation, beside them the route strip, Fig. 1 and the live speedup: the first screen), **Side by
side** (every system on one question), **What if** (the last question on another route), **Explore**
(route atlas, adapter fidelity, trade-off curve, batch composition, image edits) and **Fit** (RoE and the
fixed path fitted to the loaded model, live on the page once done; a base without parts starts "not fitted").

Every component gets a name here; handlers (handlers_*.py, api.py) return {name: value} and `Page.on`
wires them, so an event's outputs are listed once, by name, in the order its endpoint returns them.
"""
from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager

import gradio as gr

from roe_core.runtime.images import MAX_BYTES
from roe_core.serving import Server
from roe_core.systems.pipeline import Pipeline

from . import figures as F
from . import texts as T
from .api import ApiHandlers, api_components, only_mcp_tools
from .background import AppContext
from .examples import load_examples, opening_example
from .handlers_chat import ChatHandlers
from .handlers_compare import CompareHandlers
from .handlers_explore import ExploreHandlers
from .handlers_fit import FitHandlers, header, systems_choices
from .inputs import default_thresholds
from .session import Conversation
from .views import L1_HEIGHT, ROUTE_HEIGHT, SPEED_HEIGHT, TURN_VIEWS

# Gradio lets this many plain questions (chat turns, /answer) in at once, so that the server can batch
# them; background work (speed, what-if, side by side, explore) takes turns on the model through the server.
PLAIN = dict(concurrency_id="plain", concurrency_limit=32)
BACKGROUND = dict(concurrency_id="background", concurrency_limit=4)

CSS = """
#header { margin: 0; }
#header h2 { margin: 0 0 2px 0; font-size: 1.25em; }
#header p { margin: 0; font-size: 0.85em; color: #4b5563; }
.caption { font-size: 0.85em; color: #4b5563; }
#speed-summary { font-size: 0.9em; }
"""


def launch_options() -> dict:
    """Arguments for demo.launch() that belong to the page (gradio 6 takes them at launch)."""
    return dict(theme=gr.themes.Soft(primary_hue="blue", neutral_hue="slate", spacing_size="sm"), css=CSS,
                max_file_size=MAX_BYTES)


def build_demo(pipe: Pipeline, max_new_tokens: int = 48, speed_repeats: int = 3, notice: str | None = None,
               systems: dict[str, Pipeline] | None = None, server: Server | None = None, mcp: bool = False
               ) -> gr.Blocks:
    """The whole page around `pipe`, the routed system (RoE). notice: a warning under the title (e.g. why a
    fallback model is loaded). systems: every loaded system by name (pipe among them) for Side by side.
    server: batches and schedules the model's work (default: Server() with its default limits).
    mcp: the page will be launched with gradio's MCP server: only /answer and /atlas become tools."""
    ctx = AppContext(pipe, dict(systems or {pipe.system: pipe}), server or Server(), max_new_tokens, speed_repeats)
    examples = load_examples()
    # uploads, scenes and exports older than a day leave gradio's cache (checked hourly)
    with gr.Blocks(title=T.TITLE, fill_width=True, delete_cache=(3600, 86400)) as demo:
        ui = {"conv": gr.State(Conversation())}
        ui["header"] = gr.Markdown(header(ctx), elem_id="header")
        if notice:
            gr.Markdown(f"> ⚠️ **{T.without_paths(notice)}**")
        with gr.Tabs(selected="chat", elem_id="tabs") as ui["tabs"]:
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                ui |= chat_tab(ctx, examples)
            with gr.Tab("Side by side", id="systems", elem_id="systems-tab"):
                ui |= systems_tab(ctx)
            with gr.Tab("What if", id="whatif", elem_id="whatif-tab"):
                ui |= whatif_tab(ctx)
            with gr.Tab("Explore", id="explore", elem_id="explore-tab"):
                ui |= explore_tab(ctx, examples)
            with gr.Tab("Fit", id="fit", elem_id="fit-tab"):
                ui |= fit_tab(ctx)
        ui |= api_components()
        wire(Page(ui), ctx, demo)
    if mcp:
        only_mcp_tools(demo)
    demo.queue(max_size=128)
    return demo


# ---- the tabs, each returning its components by name --------------------------------------------------

def chat_tab(ctx: AppContext, examples: list[dict]) -> dict:
    first = opening_example(examples)
    c = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=330):
            c["image"] = gr.Image(value=first["image"] if first else None, type="filepath", label=T.IMAGE_LABEL,
                                  sources=["upload", "clipboard"], height=210, elem_id="image")
            c["chat"] = gr.Chatbot(label="Conversation", height=250, placeholder=T.CHAT_PLACEHOLDER, elem_id="chat",
                                   buttons=["copy", "copy_all"])
            with gr.Row():
                # the box people type in: a question, optionally with an image attached (or pasted)
                c["question_box"] = gr.MultimodalTextbox(
                    value={"text": first["question"] if first else "", "files": []}, placeholder=T.QUESTION_PLACEHOLDER,
                    file_types=["image"], file_count="single", sources=["upload"], show_label=False, scale=5, lines=1,
                    max_lines=4, submit_btn=False, elem_id="question")
                # the question as plain text: what /ask, the examples, New scene and undo read and write
                c["question"] = gr.Textbox(value=first["question"] if first else "", label="question", visible=False,
                                           elem_id="question-text")
                c["ask_btn"] = gr.Button("Ask", variant="primary", scale=1, min_width=64, elem_id="ask")
                c["stop_btn"] = gr.Button("Stop", variant="stop", scale=1, min_width=60, elem_id="stop")
            with gr.Row():
                c["new_scene_btn"] = gr.Button("New scene", size="sm", elem_id="new-scene")
                c["reset_btn"] = gr.Button("New conversation", size="sm")
            c["status"] = gr.Markdown(T.STATUS_EXAMPLE if first else "", label="status", elem_id="status")
        with gr.Column(scale=7, min_width=330):
            c["route"] = gr.Plot(F.empty_figure(T.ROUTE_EMPTY, ROUTE_HEIGHT), label="route_figure", show_label=False,
                                 elem_id="route-plot")
            c["l1"] = gr.Plot(F.empty_figure(T.L1_EMPTY, L1_HEIGHT), label="l1_figure", show_label=False,
                              elem_id="l1-plot")
            with gr.Row(equal_height=False):
                c["speed_fig"] = gr.Plot(F.empty_figure(T.SPEED_EMPTY, SPEED_HEIGHT), label="speed_figure",
                                         show_label=False, elem_id="speed-plot", scale=3)
                c["speed_md"] = gr.Markdown(label="speed_summary", elem_id="speed-summary", scale=2)
    # below the first screen: what the panels mean, the examples, the conversation's adapters, the timings
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=330):
            if examples:
                gr.Examples([[e["image"], e["question"]] for e in examples], inputs=[c["image"], c["question"]],
                            label=T.EXAMPLES_LABEL, example_labels=[f"{e['qtype']}: {e['question']}" for e in examples])
            gr.Markdown(T.ROUTE_CAPTION, elem_classes="caption")
            gr.Markdown(T.L1_CAPTION, elem_classes="caption")
            gr.Markdown(T.model_note(ctx.pipe.info), elem_classes="caption")
        with gr.Column(scale=7, min_width=330):
            c["usage"] = gr.Plot(F.empty_figure(T.USAGE_EMPTY), label="usage_figure", show_label=False,
                                 elem_id="usage-plot")
            c["adapters"] = gr.Markdown(label="adapters", elem_classes="caption")
            c["speed_table"] = gr.Dataframe(headers=T.SPEED_HEADERS, label="speed_table", interactive=False, wrap=True,
                                            show_label=False, max_height=220,
                                            column_widths=["17%", "9%", "10%", "9%", "8%", "47%"])
            with gr.Row():
                c["measure"] = gr.Checkbox(value=True, label=T.MEASURE_LABEL, scale=3)
                c["speed_btn"] = gr.Button("Measure speed now", size="sm", scale=1)
    with gr.Accordion("Export and raw trace", open=False):
        with gr.Row():
            c["export_btn"] = gr.Button("Export this conversation's traces")
            c["export_csv"] = gr.File(label="CSV (one row per turn × layer)")
            c["export_json"] = gr.File(label="JSON")
        c["export_md"] = gr.Markdown(label="export_status")
        c["trace"] = gr.JSON(label="trace (this turn)", open=False)
    return c


def systems_tab(ctx: AppContext) -> dict:
    c = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            c["systems_pick"] = gr.CheckboxGroup(**systems_choices(ctx), label="Systems to ask",
                                                 elem_id="arena-systems")
            c["systems_q"] = gr.Textbox(label=T.SYSTEMS_QUESTION_LABEL, elem_id="arena-question")
            c["systems_btn"] = gr.Button("Ask every system", variant="primary", elem_id="arena-go")
            gr.Markdown(T.systems_caption([p.spec for p in ctx.systems.values()]), elem_classes="caption")
        with gr.Column(scale=7):
            c["systems_md"] = gr.Markdown(T.SYSTEMS_INTRO, elem_id="arena-summary")
            c["systems_table"] = gr.Dataframe(headers=T.SYSTEM_HEADERS, label="arena_table", interactive=False,
                                              wrap=True, show_label=False, max_height=240)
            c["systems_plot"] = gr.Plot(F.empty_figure("Latency and active parameters appear here", 260),
                                        label="arena_figure", show_label=False)
    for name in ctx.expert_systems():
        label = ctx.systems[name].label
        with gr.Row():
            c[f"{name}_load"] = gr.Plot(F.empty_figure(f"{label}: expert load per MoE layer, image vs text", 300),
                                        label=f"{name}_expert_load_figure", show_label=False)
            c[f"{name}_paths"] = gr.Plot(F.empty_figure(f"{label}: each token's top-1 expert across layers", 300),
                                         label=f"{name}_token_pathways_figure", show_label=False)
    if ctx.expert_systems():
        c["rigidity"] = gr.Plot(F.empty_figure("Router rigidity: image vs text routing per MoE layer", 280),
                                label="rigidity_figure", show_label=False)
    return c


def whatif_tab(ctx: AppContext) -> dict:
    L, c = ctx.num_layers, {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=4):
            c["how"] = gr.Radio([("the layers ticked below", "layers"), ("the router at this threshold", "threshold")],
                                value="layers", label="Re-answer the chat's last question with")
            c["layers"] = gr.CheckboxGroup([(str(i), i) for i in range(L)], value=list(range(L)),
                                           label=T.WHATIF_LAYERS_LABEL, elem_id="whatif-layers")
            c["threshold"] = gr.Slider(0.0, 1.0, value=ctx.pipe.threshold, step=0.01, label=T.WHATIF_THRESHOLD_LABEL)
            c["whatif_btn"] = gr.Button("Re-answer the last question", variant="primary", elem_id="whatif-go")
        with gr.Column(scale=7):
            c["whatif_md"] = gr.Markdown(T.WHATIF_INTRO, label="whatif_summary", elem_id="whatif-summary")
            c["whatif_table"] = gr.Dataframe(headers=T.WHATIF_HEADERS, label="whatif_table", interactive=False,
                                             wrap=True, show_label=False, max_height=220,
                                             column_widths=["22%", "10%", "11%", "10%", "47%"])
            with gr.Row():
                c["whatif_route"] = gr.Plot(F.empty_figure("The what-if route appears here", 220),
                                            label="whatif_route_figure", show_label=False)
                c["whatif_speed"] = gr.Plot(F.empty_figure("Its speed against every layer appears here", 220),
                                            label="whatif_speed_figure", show_label=False)
    return c


def question_set(key: str, scenes: str, label: str, n: tuple[int, int, int, int],
                 n_label: str = "Inputs (at most)") -> dict:
    """A question set to work on: built-in scenes or an uploaded LLaVA JSON with its images (the Fit tab's and
    the atlas's): <key>_source, <key>_n (min, max, value, step), <key>_files."""
    lo, hi, value, step = n
    return {f"{key}_source": gr.Radio([(scenes, "scenes"), ("my LLaVA JSON + its images (upload below)", "upload")],
                                      value="scenes", label=label),
            f"{key}_n": gr.Slider(lo, hi, value=value, step=step, label=n_label),
            f"{key}_files": gr.File(label="LLaVA JSON file and its images", file_count="multiple",
                                    file_types=[".json", "image"])}


def fit_tab(ctx: AppContext) -> dict:
    c = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            c.update(question_set("fit", "generated scenes (train split)", "Inputs", (2, 2000, 256, 1)))
            with gr.Row():
                c["fit_btn"] = gr.Button("Fit", variant="primary", elem_id="fit-go")
                c["fit_cancel"] = gr.Button("Cancel", variant="stop", elem_id="fit-cancel")
            gr.Markdown(T.FIT_CAPTION, elem_classes="caption")
        with gr.Column(scale=7):
            c["fit_md"] = gr.Markdown(T.FIT_INTRO if ctx.pipe.needs_fit else T.FIT_INTRO_FITTED, elem_id="fit-summary")
            c["fit_zip"] = gr.File(label="the fitted parts (zip: roe/, static/, fit.json)", elem_id="fit-zip")
            c["fit_json"] = gr.JSON(label="fit summary", open=False)
    return c


def explore_tab(ctx: AppContext, examples: list[dict]) -> dict:
    c = {}

    @contextmanager
    def controls_then_summary(key: str, elem: str, intro: str, empty: str, height: int):
        """A row: the body of the with-block (the controls) on the left; the summary and the figure right."""
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300):
                yield
            with gr.Column(scale=7):
                c[f"{key}_md"] = gr.Markdown(intro, elem_id=f"{elem}-summary")
                c[f"{key}_plot"] = gr.Plot(F.empty_figure(empty, height), label=f"{elem}_figure", show_label=False,
                                           elem_id=f"{elem}-plot")

    with gr.Tabs():
        with gr.Tab("Route atlas", id="atlas-tab"):
            with controls_then_summary("atlas", "atlas", T.ATLAS_INTRO, "The route atlas appears here", 360):
                c.update(question_set("atlas", "scenes of the test split", "Question set", (4, 256, 48, 4),
                                      "Questions (at most)"))
                c["atlas_btn"] = gr.Button("Build the atlas", variant="primary", elem_id="atlas-go")
                gr.Markdown(T.ATLAS_CAPTION, elem_classes="caption")
            with gr.Row():
                c["atlas_types"] = gr.Plot(F.empty_figure("Skip rate per layer by question type", 240),
                                           label="atlas_types_figure", show_label=False)
                c["atlas_counts"] = gr.Plot(F.empty_figure("How often each route occurs", 240),
                                            label="atlas_counts_figure", show_label=False)
            c["atlas_table"] = gr.Dataframe(headers=T.ATLAS_HEADERS, label="Examples in atlas order (click a row to "
                                            "open it in the chat)", interactive=False, wrap=True, max_height=300,
                                            elem_id="atlas-table")
            with gr.Row():
                c["atlas_csv"] = gr.File(label="atlas CSV")
                c["atlas_json"] = gr.JSON(label="atlas data", open=False)
        with gr.Tab("Adapter fidelity", id="fidelity-tab"):
            with controls_then_summary("fid", "fidelity", T.FIDELITY_INTRO, "Adapter fidelity appears here", 360):
                c["fid_btn"] = gr.Button("Measure the last turn's adapters", variant="primary", elem_id="fidelity-go")
                gr.Markdown(T.FIDELITY_CAPTION, elem_classes="caption")
            c["fid_table"] = gr.Dataframe(headers=T.FIDELITY_HEADERS, label="per layer", interactive=False,
                                          max_height=300)
            c["fid_json"] = gr.JSON(label="fidelity data", open=False)
        with gr.Tab("Trade-off curve", id="sweep-tab"):
            with controls_then_summary("sweep", "sweep", T.SWEEP_INTRO, "The trade-off curve appears here", 360):
                c["sweep_thresholds"] = gr.Textbox(
                    value=", ".join(f"{t:.2f}" for t in default_thresholds(ctx.pipe.threshold)),
                    label="Router thresholds to sweep (the model's own is always added)")
                c["sweep_n"] = gr.Slider(4, 128, value=24, step=4, label="Questions (scenes of the test split)")
                c["sweep_btn"] = gr.Button("Sweep", variant="primary", elem_id="sweep-go")
                gr.Markdown(T.SWEEP_CAPTION, elem_classes="caption")
            c["sweep_table"] = gr.Dataframe(headers=T.SWEEP_HEADERS, label="Points (click one to use its threshold in "
                                            "What if)", interactive=False, max_height=300, elem_id="sweep-table")
            c["sweep_json"] = gr.JSON(label="sweep data", open=False)
        with gr.Tab("Batch composition", id="batching-tab"):
            with controls_then_summary("batch", "batching", T.BATCHING_INTRO,
                                       "Per-example routing against the union rule", 320):
                c["batch_pick"] = gr.CheckboxGroup(
                    [(f"{e['qtype']}: {e['question']}", k) for k, e in enumerate(examples)],
                    value=list(range(min(4, len(examples)))),
                    label="Questions answered in one batch (the examples, each with its image)")
                c["batch_btn"] = gr.Button("Answer them in one batch, three ways", variant="primary",
                                           elem_id="batching-go")
                gr.Markdown(T.BATCHING_CAPTION, elem_classes="caption")
            c["batch_table"] = gr.Dataframe(headers=T.BATCHING_HEADERS, label="per example", interactive=False,
                                            wrap=True, max_height=300)
            c["batch_json"] = gr.JSON(label="batch data", open=False)
        with gr.Tab("Image edits", id="edits-tab"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=5, min_width=300):
                    c["editor"] = gr.ImageEditor(type="pil", label="Crop it, or paint over part of it",
                                                 sources=["upload", "clipboard"], height=320, elem_id="editor")
                    with gr.Row():
                        c["edit_load_btn"] = gr.Button("Load the conversation's image", size="sm")
                        c["edit_btn"] = gr.Button("Re-answer the last question on the edited image",
                                                  variant="primary", elem_id="edit-go")
                with gr.Column(scale=5):
                    c["edit_md"] = gr.Markdown(T.EDIT_INTRO, elem_id="edit-summary")
                    c["edit_plot"] = gr.Plot(F.empty_figure("The two routes appear here", 240),
                                             label="edit_route_figure", show_label=False, elem_id="edit-plot")
                    c["edit_table"] = gr.Dataframe(headers=T.EDIT_HEADERS, interactive=False, wrap=True,
                                                   label="before and after")
                    c["edit_json"] = gr.JSON(label="edit data", open=False)
    c["atlas_state"] = gr.State(None)
    c["sweep_state"] = gr.State(None)
    return c


# ---- the events ---------------------------------------------------------------------------------------

class Page:
    """The page's components by name. `on` wires a handler that returns {name: value}: gradio receives
    {component: value} (outputs it leaves out keep their value, as gr.skip() would)."""

    def __init__(self, components: dict):
        self.c = components

    def __getitem__(self, name: str):
        return self.c[name]

    def on(self, triggers, fn, inputs=(), outputs=(), **kw):
        ins = [self.c[n] for n in inputs]
        outs = {n: self.c[n] for n in outputs}
        return gr.on(triggers, self.named(fn, outs), ins, list(outs.values()), **kw)

    def named(self, fn, outputs: dict):
        """fn, its results turned from {name: value} into {component: value} (its name, docstring and
        signature kept: gradio reads them for the API, MCP tools, gr.Request and gr.Progress)."""
        def convert(result):
            if not isinstance(result, dict):
                return result
            unknown = set(result) - set(self.c)
            if unknown:
                raise KeyError(f"{fn.__name__} returned outputs the page does not have: {sorted(unknown)}")
            out = {outputs[n]: v for n, v in result.items() if n in outputs}
            return out or gr.skip()

        if inspect.isgeneratorfunction(inspect.unwrap(fn)):
            @functools.wraps(fn)
            def stream(*args, **kwargs):
                for result in fn(*args, **kwargs):
                    yield convert(result)
            return stream

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return convert(fn(*args, **kwargs))
        return call


def wire(p: Page, ctx: AppContext, demo: gr.Blocks) -> None:
    chat, cmp, ex, api = ChatHandlers(ctx), CompareHandlers(ctx), ExploreHandlers(ctx), ApiHandlers(ctx)
    fit = FitHandlers(ctx)
    turn = ["conv", "status", *TURN_VIEWS]
    speed_out = ["conv", "speed_fig", "speed_table", "speed_md"]

    # Chat
    asked = p.on([p["ask_btn"].click, p["question_box"].submit], chat.ask_box, ["conv", "image", "question_box"],
                 [*turn, "question_box", "image"], api_visibility="private", preprocess=False, **PLAIN)
    p.on([p["api_ask_btn"].click], chat.ask, ["conv", "image", "question"], [*turn, "question"], api_name="ask",
         preprocess=False, **PLAIN)
    gr.on([p["question"].change], lambda q: {"text": q or "", "files": []}, p["question"], p["question_box"],
          queue=False, api_visibility="private")
    p.on([p["chat"].retry], chat.retry, ["conv"], [*turn, "question"], api_name="retry", **PLAIN)
    p.on([p["chat"].undo], chat.undo, ["conv"], [*turn, "question"], api_name="undo", **PLAIN)
    speed_evt = asked.then(p.named(chat.speed, {n: p[n] for n in speed_out}), [p["conv"], p["measure"]],
                           [p[n] for n in speed_out], api_name="speed", **BACKGROUND)
    speed_now_evt = p.on([p["speed_btn"].click], chat.speed_now, ["conv"], speed_out, api_visibility="private",
                         **BACKGROUND)
    p.on([p["image"].change], chat.set_image, ["conv", "image"], [*turn, "image"], api_name="set_image",
         preprocess=False, **PLAIN)
    p.on([p["new_scene_btn"].click], chat.new_scene, ["conv"], [*turn, "image", "question"], api_name="new_scene",
         **PLAIN)
    p.on([p["reset_btn"].click], chat.reset, ["conv"], turn, api_name="reset", **PLAIN)
    p.on([p["export_btn"].click], chat.export, ["conv"], ["export_csv", "export_json", "export_md"],
         api_name="export", concurrency_limit=None)

    # What if
    gr.on([p["layers"].input], lambda: "layers", None, p["how"], queue=False, api_visibility="private")
    gr.on([p["threshold"].input], lambda: "threshold", None, p["how"], queue=False, api_visibility="private")
    whatif_evt = p.on([p["whatif_btn"].click], cmp.whatif, ["conv", "how", "layers", "threshold"],
                      ["conv", "whatif_md", "whatif_table", "whatif_route", "whatif_speed"], api_name="whatif",
                      **BACKGROUND)

    # Side by side
    experts = [f"{n}_{v}" for n in ctx.expert_systems() for v in ("load", "paths")]
    systems_evt = p.on([p["systems_btn"].click], cmp.compare_systems, ["conv", "systems_pick", "systems_q"],
                       ["systems_md", "systems_table", "systems_plot", *experts, *(["rigidity"] if experts else [])],
                       api_name="systems", **BACKGROUND)

    # Explore
    atlas_evt = p.on([p["atlas_btn"].click], ex.atlas, ["atlas_source", "atlas_n", "atlas_files"],
                     ["atlas_md", "atlas_plot", "atlas_types", "atlas_counts", "atlas_table", "atlas_csv", "atlas_json",
                      "atlas_state"], api_name="atlas", **BACKGROUND)
    p.on([p["atlas_table"].select], ex.open_atlas_example, ["atlas_state"], ["image", "question", "tabs"],
         api_visibility="private")
    fid_evt = p.on([p["fid_btn"].click], ex.fidelity, ["conv"], ["fid_md", "fid_plot", "fid_table", "fid_json"],
                   api_name="fidelity", **BACKGROUND)
    sweep_evt = p.on([p["sweep_btn"].click], ex.sweep, ["sweep_thresholds", "sweep_n"],
                     ["sweep_md", "sweep_plot", "sweep_table", "sweep_json", "sweep_state"], api_name="sweep",
                     **BACKGROUND)
    p.on([p["sweep_table"].select], ex.pick_threshold, ["sweep_state"], ["threshold", "how", "whatif_md", "tabs"],
         api_visibility="private")
    batch_evt = p.on([p["batch_btn"].click], ex.batching, ["batch_pick"],
                     ["batch_md", "batch_plot", "batch_table", "batch_json"], api_name="batching", **BACKGROUND)
    p.on([p["edit_load_btn"].click], ex.load_for_edit, ["conv"], ["editor", "edit_md"], api_visibility="private",
         queue=False)
    edit_evt = p.on([p["edit_btn"].click], ex.edited, ["conv", "editor"], ["edit_md", "edit_plot", "edit_table",
                                                                          "edit_json"], api_name="edit", **BACKGROUND)

    # Fit: the parts live on this page once done, for every visitor (a page opened later gets them at load)
    fitted = ["header", "systems_pick", "threshold", "sweep_thresholds"]
    fit_evt = p.on([p["fit_btn"].click], fit.fit, ["fit_source", "fit_n", "fit_files"],
                   ["fit_md", "fit_json", "fit_zip", *fitted], api_name="fit", **BACKGROUND)
    p.on([p["fit_cancel"].click], fit.cancel, [], ["fit_md"], api_name="fit_cancel", queue=False)
    p.on([demo.load], fit.page_views, [], fitted, api_visibility="private", queue=False)

    # for programs
    gr.on([p["api_btn"].click], api.answer_json, [p[n] for n in ("api_image", "api_question", "api_history",
                                                                 "api_route", "api_threshold", "api_system")],
          p["api_result"], api_name="answer", **PLAIN)

    # Stop: this user's work ends at its next token (the page's events and the model's work alike)
    p.on([p["stop_btn"].click], chat.stop, ["conv"], ["status", "chat"], api_name="stop", queue=False,
         cancels=[asked, speed_evt, speed_now_evt, whatif_evt, systems_evt, atlas_evt, fid_evt, sweep_evt, batch_evt,
                  edit_evt, fit_evt])
    demo.unload(chat.closed)
