"""What arrives from the page and from clients, checked: uploads, history JSON, routes, thresholds; and how
a problem is shown (a message on the page and a toast; the conversation is never touched by it)."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
from pathlib import Path

import gradio as gr
from PIL import Image

from roe_core import InputError, NotFittedError

from .texts import HISTORY_EXAMPLE, without_paths

log = logging.getLogger("roe_explorer")


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


def default_thresholds(calibrated: float) -> list[float]:
    """A sweep around the calibrated threshold, from few layers skipped to many."""
    return sorted({round(min(0.95, max(0.05, calibrated + d)), 2) for d in (-0.3, -0.2, -0.1, -0.05, 0.05, 0.1, 0.2)})


def parse_thresholds(text: str) -> list[float]:
    usage = "thresholds should be numbers between 0 and 1, separated by commas (e.g. 0.3, 0.5, 0.7)"
    try:
        values = [float(x) for x in (text or "").replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{usage}; got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise InputError(usage)
    if len(values) > 12:
        raise InputError(f"at most 12 thresholds per sweep (got {len(values)})")
    return values


def message_of(e: BaseException) -> str:
    if isinstance(e, (InputError, NotFittedError, json.JSONDecodeError)):
        return str(e)
    if isinstance(e, Image.DecompressionBombError):   # raised by PIL while opening, before load_image's own check
        return f"the image is too large to open safely (a decompression bomb?): {e}"
    log.exception("unexpected error", exc_info=e)
    return without_paths(f"{type(e).__name__}: {e}")


def problem(what: str, e) -> str:
    """A message for the page (and a toast); the conversation is never touched by it."""
    msg = (e if isinstance(e, str) else message_of(e)).rstrip(".")
    gr.Warning(f"{what}: {msg}")
    return f"> ⚠️ **{what}:** {msg}. The conversation so far is kept."
