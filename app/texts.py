"""The page's words: the header, captions, placeholders and table headers, in page order. No logic
beyond filling in the header from pipe.info (never a server path: parts are named by their folder)."""
from __future__ import annotations

import os
import re
from pathlib import Path

TITLE = "RoE Explorer"

# ---- Chat ----------------------------------------------------------------------------------------
STATUS_EXAMPLE = "An example is loaded: press **Ask**, or upload your own image."
IMAGE_LABEL = "Image (changing it starts a new conversation)"
CHAT_PLACEHOLDER = (
    "Press **Ask**: the answer streams here. For every answer the router decides, from the question alone, which "
    "decoder layers run and which are skipped through a small adapter. Beside the chat: that route, how much each "
    "layer changes the example (Fig. 1) and the speed the route bought, measured live.")
QUESTION_PLACEHOLDER = "Ask a question about the image… (or attach a new image with it)"
EXAMPLES_LABEL = "Examples: generated scenes, each with a suggested question"
L1_CAPTION = (
    "**L1 distance** (the paper's Fig. 1), measured at prefill for each decoder layer: the mean over tokens "
    "of mean<sub>j</sub> |h<sub>out</sub> − h<sub>in</sub>|<sub>j</sub>, between the layer's input and output "
    "hidden states. A low value means the layer barely changes this example's features. Dotted grey: every "
    "layer run; blue: the path this turn took, each layer ● executed or ◆ skipped through its adapter.")
ROUTE_CAPTION = (
    "**Route:** one square per decoder layer, **blue** executed, **orange** skipped through its adapter. Bars: the "
    "router's probability of running each layer (hover for values); a layer runs when it is above the threshold.")
ROUTE_EMPTY = "Ask a question: the route appears here"
L1_EMPTY = "Ask a question: each layer's L1 change appears here"
USAGE_EMPTY = "Adapter usage over the conversation appears here"
SPEED_EMPTY = "Speed against every layer appears here"
SPEED_TIMING = "Timing the route against every layer…"
SPEED_PENDING = "_Speed: the same turn is then run with every layer, interleaved, to time both paths…_"
SPEED_STOPPED = "_The speed measurement was stopped: press **Measure speed now** to time this turn._"
SPEED_OFF = ("_Speed not measured for this turn: press **Measure speed now** (or tick the box) to time it against "
             "every layer._")
MEASURE_LABEL = "Measure speed against every layer after each answer"
SPEED_HEADERS = ["path", "layers run", "latency (s)", "tokens/s", "tokens", "answer"]

# ---- What if -------------------------------------------------------------------------------------
WHATIF_INTRO = "_Ask a question first; then switch layers or move the threshold._"
WHATIF_LAYERS_LABEL = ("Layers to execute (unticked: skipped through the adapter; filled in with the last route)")
WHATIF_THRESHOLD_LABEL = "Router threshold (a layer runs when p_run is above it)"
WHATIF_HEADERS = ["path", "layers run", "latency (s)", "tokens/s", "answer"]

# ---- Side by side --------------------------------------------------------------------------------
SYSTEM_HEADERS = ["system", "answer", "latency (s)", "tokens/s", "active params (M)", "total params (M)",
                  "what it decided"]
SYSTEMS_INTRO = ("_Pick systems and ask: each answers the same question; their latency is measured live, one after "
                 "the other._")
SYSTEMS_QUESTION_LABEL = ("Question (empty: the last one asked), about the chat's image, with this conversation's "
                          "earlier turns")
SYSTEMS_CAPTION_END = (
    "Active parameters are those one token touches (the layers a routed system ran plus its adapters; an MoE's "
    "chosen experts). All share one base: the same vision tower, projector and decoder.")

# ---- Explore -------------------------------------------------------------------------------------
ATLAS_HEADERS = ["rank", "#", "type", "question", "answer", "reference", "correct", "layers run", "route"]
ATLAS_INTRO = "_Build the atlas: every question is answered and its route drawn._"
ATLAS_CAPTION = (
    "Each question is answered as in the chat (routes decided per example, in batches) and its route is drawn "
    "as a row: blue layers ran, orange ones were skipped through their adapters. Rows are clustered: identical "
    "routes together, each next one the nearest by Hamming distance. Your own set: a LLaVA JSON file "
    "(`[{\"image\": \"a.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nQ\"}, "
    "{\"from\": \"gpt\", \"value\": \"A\"}]}]`) uploaded with its images. Runs in the background: anyone's "
    "plain question goes first.")
FIDELITY_HEADERS = ["layer", "ran", "adapter vs layer L1", "adapter vs layer cosine", "the layer's own change L1",
                    "routed vs dense twin L1", "twin cosine"]
FIDELITY_INTRO = ("_Ask a question, then measure: each skipped layer's adapter against the layer it stood in "
                  "for._")
FIDELITY_CAPTION = (
    "The last turn's prompt is run once more on its route. At every layer both the layer and its adapter see the "
    "same input, so a skipped layer's orange diamond is exactly the adapter's error there (L1: the mean over tokens "
    "of mean<sub>j</sub> |adapter − layer|<sub>j</sub>, beside the layer's own change, the grey Fig. 1 curve). "
    "Purple: how far the routed run has drifted from its dense twin after each layer. The summary gives the KL of "
    "the two runs' next-token distributions and whether the dense model answers the same.")
SWEEP_HEADERS = ["threshold", "layers run (mean)", "accuracy", "agrees with dense", "examples/s", "speedup",
                 "calibrated"]
SWEEP_INTRO = "_Sweep: every threshold answers the same questions, timed in one run beside every layer._"
SWEEP_CAPTION = (
    "Every threshold answers the same questions in the same batches, and so does every layer (dense), in one run: "
    "speedup is the dense pass's time over the threshold's (pauses for other users' questions excluded). Accuracy is "
    "exact match with the scene generator's answers. The star is the model's calibrated threshold; click a row of "
    "the table to re-answer the last question at that threshold in *What if*. Where a fixed-path system is loaded, "
    "its path at several k (the same layers skipped for every input, RoE's adapters standing in) is drawn too: "
    "where RoE's curve is not above it, per-example routing buys nothing on these questions.")
BATCHING_HEADERS = ["question", "its route: layers run", "union: layers run", "answer (own route)",
                    "answer (union)", "answer (every layer)"]
BATCHING_INTRO = ("_Pick a few questions: they are answered together, with their own routes, with the union of "
                  "their routes and with every layer._")
BATCHING_CAPTION = (
    "RoE decides a route per example, so a batch mixes routes. Here each layer runs only the examples routed "
    "through it (gathered, then scattered back) and the others pass through its adapter. The authors' rule for "
    "batches runs a layer for the whole batch if any example wants it: the union of the routes. All three are timed "
    "live in interleaved rounds after a warm-up; background work, so anyone's plain question goes first.")
EDIT_HEADERS = ["image", "layers run", "answer"]
EDIT_INTRO = "_Load the image, edit it, and re-answer: the route and the answer before and after, side by side._"

# ---- Fit -----------------------------------------------------------------------------------------
NOT_FITTED = "not fitted"         # info["parts"] of a system loaded without parts (roe_core.systems.NOT_FITTED)
NOT_FITTED_CHAT = (
    "_RoE is **not fitted** for this model: this answer ran **every layer** (the dense model's own). No router or "
    "adapter has been fitted, so no layer is skipped: fit them in the **Fit** tab (a few minutes), then ask again._")
NOT_FITTED_SPEED = "_No route to time: RoE is not fitted for this model (see the **Fit** tab)._"
SPEED_DENSE_TURN = "_This turn ran every layer (asked before RoE was fitted): ask again to time its route._"
FIT_INTRO = ("_Fit RoE's routers and adapters, and the fixed path, to this model: the model's own answers on the "
             "inputs are the targets, no answers needed._")
FIT_CAPTION = (
    "The fit records what each decoder layer does on the inputs and fits, for every layer, a small adapter that "
    "stands in for it and a router that learns from the model's own evidence which layers each example needs; the "
    "threshold is chosen on held-out inputs. The fixed path (the same layers skipped for every input) is fitted on "
    "the same inputs. Background work: anyone's plain question goes first, and **Cancel** (or Stop) ends it. Once "
    "fitted, the routes are live on this page (every tab), and the parts can be downloaded as a zip: start the app "
    "again with `--roe <folder>/roe --static <folder>/static` to load them. Inputs: generated scenes of the train "
    "split, or your LLaVA JSON (`[{\"image\": \"a.png\", \"conversations\": [{\"from\": \"human\", "
    "\"value\": \"<image>\\nQ\"}, ...]}]`) uploaded with its images (answers in it are not used).")
FIT_INTRO_FITTED = ("_This model's RoE is fitted already; a new fit replaces its parts on this page (for everyone) "
                    "until the app restarts._")
FIT_RUNNING = "a fit is already running on this model: wait for it, or cancel it"

HISTORY_EXAMPLE = '[["How many circles are there?", "2"], ["What colour is the big one?", "red"]]'


def public_name(value) -> str:
    """A model or parts location as visitors may see it: a path on this server becomes its folder's name;
    a hub id or a word ("embedded", "shipped (roe/)", "untrained ...") stays as it is."""
    text = str(value)
    looks_like_path = os.path.isabs(text) or text.startswith(("./", "../", "~"))
    if looks_like_path or (os.sep in text and Path(text).exists()):
        name = Path(text.rstrip("/\\")).name
        return f"{name}/" if name else "a local folder"
    return text


def without_paths(text: str) -> str:
    """A message for visitors: every absolute server path in it shortened to its last part."""
    return re.sub(r"(?<![\w.:/~])/(?:[^\s'\"():,/]+/)*([^\s'\"():,/]+)/?", r"\1", str(text))


def parts_words(info: dict, hint: bool = True) -> str:
    """Where a system's parts come from, for visitors: shipped (folder), a folder's name, "fitted here on N
    inputs", or not fitted (hint: pointing at the Fit tab)."""
    parts = info.get("parts", "—")
    if parts == NOT_FITTED:
        return "**not fitted**" + (" (see the *Fit* tab)" if hint else "")
    return public_name(parts)


def header_markdown(info: dict, others=()) -> str:
    """One compact line about what is loaded, from the routed pipe's info (a whitelist: nothing else leaks);
    others: (label, info) of the other systems with parts that must be fitted (the fixed path)."""
    parts = [f"**Model** `{public_name(info.get('model'))}`"]
    if info.get("decoder"):
        parts.append(str(info["decoder"]).split(" (")[0])
    parts += [f"{info.get('num_layers')} decoder layers", f"{info.get('device')} ({info.get('dtype')})",
              f"**RoE parts** {parts_words(info)}"]
    parts += [f"**{label} parts** {parts_words(other, hint=False)}" for label, other in others]
    if info.get("trained_on"):
        parts.append(f"trained on {str(info['trained_on']).split(' — ')[0]}")
    return " · ".join(parts)


def model_note(info: dict) -> str:
    """Below the first screen: what the model knows, and how to load another."""
    text = f"**The model** was trained on {info['trained_on']}." if info.get("trained_on") else ""
    if info.get("model") == "embedded":
        text += (" `python app.py --model <LLaVA folder or hub id> --roe <RoE folder>` loads a full LLaVA.")
    return text.strip()


def systems_caption(specs) -> str:
    """What each loaded system does, from the registry's summaries, then what the columns mean."""
    return " ".join(f"**{s.label}**: {s.summary}." for s in specs) + " " + SYSTEMS_CAPTION_END
