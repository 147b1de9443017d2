"""The endpoints for programs (gradio_client api_names; a page's conversation state travels with the
client's session). The page's own events are these endpoints too; layout.py wires them.

    /ask        image, question              -> status, chat, trace, 4 figures... (streams the answer)
    /retry, /undo                            -> as /ask: the last turn asked again, or taken back
    /speed      measure                      -> speed figure, table, summary of the last turn
    /whatif     how, layers, threshold       -> what-if summary, table, route figure, speed figure
    /new_scene                               -> status, ..., image, suggested question
    /set_image  image                        -> status, ... (a new image starts a new conversation)
    /reset                                   -> status, ... (same image, no turns)
    /export                                  -> CSV file, JSON file, status
    /systems    systems, question            -> summary, table, figure, per experts system 2 figures, rigidity
    /atlas      source, n, files             -> summary, 3 figures, table, CSV, data: every route of a question set
    /fidelity                                -> summary, figure, table, data: the last turn's adapters vs its layers
    /sweep      thresholds, n                -> summary, figure, table, data: accuracy vs layers vs speed
    /edit       editor value                 -> summary, figure, table, data: the last question on an edited image
    /batching   chosen examples              -> summary, figure, table, data: own routes vs union rule vs dense
    /stop                                    -> status, chat: this session's work ends at its next token
    /answer     image, question, history_json, route, threshold, system -> JSON {answer, trace} (stateless)

With app.py --mcp only /answer and /atlas are MCP tools (named after their functions: answer_json, atlas).
"""
from __future__ import annotations

import json

import gradio as gr

from roe_core import InputError, NotFittedError, parse_route

from .background import AppContext, owner_of
from .inputs import message_of, parse_history, upload_path
from .texts import public_name

# The endpoints gradio's MCP server offers as tools (app.py --mcp)
MCP_TOOLS = ("answer", "atlas")


class ApiHandlers:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

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
            system: which loaded system answers: "roe" (the default), "dense", or any other loaded system (see /systems)
        Returns:
            JSON {"answer", "trace", "num_layers", "model", "system", "seconds", "engine" (the decode engine's
            counts: arenas built, graphs captured...; {} on the eager loop)}, or {"error"} with what
            was wrong (route and threshold are RoE's only; a system not fitted for this model answers
            nothing: {"error": "... is not fitted ..."}, until the page's Fit)
        """
        ctx = self.ctx
        try:
            pipe = ctx.system(system)
            if pipe.needs_fit:      # never an answer from untrained parts, whatever the route
                raise NotFittedError(pipe.label, f"--{pipe.system.replace('_', '-')}")
            path = upload_path(image, ctx.workdir)
            if path is None:
                raise InputError("there is no image")
            history = parse_history(history_json)
            if pipe.spec.routed:
                options = dict(route=parse_route(route, ctx.num_layers), trace_l1=True, dense_l1=True,
                               threshold=None if threshold is None else float(threshold))
            else:
                if (route or "auto").strip() != "auto" or threshold is not None:
                    raise InputError(f"route and threshold are RoE's options; {pipe.system} takes none")
                options = {}
            ans = ctx.server.answer(pipe, path, question, history, owner=owner_of(request),
                                    max_new_tokens=ctx.max_new_tokens, **options)
            trace = ans.trace.to_dict()
            if ans.image_check is not None:        # how familiar the image looked to the base, and the note
                trace["image_check"] = ans.image_check.to_dict()
            return json.dumps({"answer": ans.text, "trace": trace, "num_layers": ctx.num_layers,
                               "model": public_name(pipe.info.get("model")), "system": pipe.system,
                               "seconds": ans.timing.total_s if ans.timing else None,
                               "engine": pipe.engine_stats()})
        except Exception as e:  # noqa: BLE001
            return json.dumps({"error": message_of(e)})


def api_components() -> dict:
    """The stateless endpoint's inputs and output; never shown (call inside the page's Blocks)."""
    with gr.Group(visible=False):
        return {"api_image": gr.File(label="image"), "api_question": gr.Textbox(label="question"),
                "api_history": gr.Textbox(label="history_json", value="[]"),
                "api_route": gr.Textbox(label="route", value="auto"),
                "api_threshold": gr.Number(label="threshold", value=None),
                "api_system": gr.Textbox(label="system", value="roe"), "api_result": gr.Textbox(label="result_json"),
                "api_btn": gr.Button(), "api_ask_btn": gr.Button()}


def only_mcp_tools(demo: gr.Blocks) -> None:
    """With the MCP server on, only MCP_TOOLS become tools; the other endpoints stay callable by clients
    but undocumented."""
    for fn in demo.fns.values():
        if fn.api_visibility == "public" and fn.api_name not in MCP_TOOLS:
            fn.api_visibility = "undocumented"
