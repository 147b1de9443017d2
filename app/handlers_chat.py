"""The Chat tab's events: ask (streamed), retry, undo, stop, a new image, a new scene, a new conversation,
the speed measurement and the export. Each handler takes this user's Conversation (a value in gr.State)
and returns its outputs by name ({"conv": new one, "status": ..., **turn_views}); a failure leaves the
conversation as it was and says why."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from roe_core import InputError

from . import texts as T
from .background import AppContext, background_task, owner_of, stream_ticket
from .examples import scene_sample
from .inputs import problem, upload_name, upload_path
from .session import Conversation, Turn, file_key
from . import figures as F
from .views import SPEED_HEIGHT, speed_views, turn_views


class ChatHandlers:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx

    def views(self, conv: Conversation) -> dict:
        return turn_views(conv, self.ctx.num_layers)

    # ---- asking ----
    def ask(self, conv: Conversation, image, question: str, request: gr.Request = None):
        """Answers `question` about `image`, streaming the text; a new image starts a new conversation.
        Bad input leaves the conversation as it was and says why. The question joins whatever batch the
        server is gathering; a new question stops this user's own background work first."""
        question = (question or "").strip()
        try:
            path = upload_path(image, self.ctx.workdir)
            if path is None:
                raise InputError("there is no image: upload one, pick an example or press New scene")
            if not question:
                raise InputError("the question is empty: type one (or pick an example)")
            if conv.image is not None and (not Path(path).is_file() or file_key(path) == conv.image_key):
                here = conv   # the same image (or its upload aged out of gradio's cache: the page still shows it)
            else:
                here = Conversation.about(path, upload_name(image))
            yield from self._answer(here, question, owner_of(request))
        except Exception as e:  # noqa: BLE001  (every failure is shown; the app keeps serving)
            yield {"conv": conv, "status": problem("Could not answer", e), **self.views(conv), "question": question}

    def ask_box(self, conv: Conversation, image, box, request: gr.Request = None):
        """The multimodal box: its text is the question; an image attached to it becomes the conversation's
        image (a new conversation when it differs). Outputs as ask's, with the box and the image panel."""
        box = box if isinstance(box, dict) else {"text": str(box or ""), "files": []}
        files = box.get("files") or []
        attached = upload_path(files[0], self.ctx.workdir) if files else None
        for out in self.ask(conv, attached or image, box.get("text") or "", request):
            left = out.pop("question", None)
            if left == "":               # answered: the box empties, the image panel shows the image asked about
                out["question_box"] = {"text": "", "files": []}
                if attached:
                    out["image"] = attached
            elif isinstance(left, str):  # refused: the box keeps what was typed (and attached)
                out["question_box"] = {"text": left, "files": files}
            yield out

    def _answer(self, here: Conversation, question: str, user):
        """Streams the answer to `question` after the turns of `here`. RoE not fitted (a base without parts,
        before a fit): every layer runs, and the status says so (no untrained router or adapter is used)."""
        if user is not None:
            self.ctx.server.cancel(user, questions=False)     # this user's speed measurement, what-if...
        pipe = self.ctx.pipe
        options = {"route": "dense"} if pipe.needs_fit else {}
        status = T.NOT_FITTED_CHAT if pipe.needs_fit else ""
        answer = None
        for item in stream_ticket(lambda on_token: self.ctx.server.submit(
                pipe, here.image, question, here.history(), owner=user, on_token=on_token,
                max_new_tokens=self.ctx.max_new_tokens, trace_l1=True, dense_l1=True, **options)):
            if isinstance(item, str):
                yield {"status": "", "chat": here.chat_messages(pending=(question, item))}
            else:
                answer = item
        check = answer.image_check
        new = here.with_turn(Turn(question, answer.text, answer.trace, note=check.note if check else None))
        yield {"conv": new, "status": status, **self.views(new), "question": ""}

    def retry(self, conv: Conversation, request: gr.Request = None):
        """The chat's retry: the last question asked again (its turn is replaced)."""
        last = conv.last
        if last is None:
            yield {"conv": conv, "status": problem("Nothing to retry", "ask a question first"), **self.views(conv)}
            return
        try:
            yield from self._answer(conv.without_last_turn(), last.question, owner_of(request))
        except Exception as e:  # noqa: BLE001
            yield {"conv": conv, "status": problem("Could not answer", e), **self.views(conv)}

    def undo(self, conv: Conversation):
        """The chat's undo: the last turn is taken back; its question returns to the box."""
        last = conv.last
        if last is None:
            return {"conv": conv, "status": problem("Nothing to undo", "the conversation is empty"), **self.views(conv)}
        new = conv.without_last_turn()
        return {"conv": new, "status": "Took back the last turn.", **self.views(new), "question": last.question}

    def stop(self, conv: Conversation, request: gr.Request = None):
        """The stop button: this user's question and background work end at their next token."""
        n = self.ctx.server.cancel(owner_of(request)) if owner_of(request) is not None else 0
        return {"status": "Stopped." if n else "Nothing to stop.", "chat": conv.chat_messages()}

    def closed(self, request: gr.Request = None):
        """The tab was closed: this user's background work ends at its next token. A question in flight
        (a second at most) is left to finish: gradio also reports a page whose heartbeat merely
        reconnected as closed, and that user is still waiting for the answer."""
        if owner_of(request) is not None:
            self.ctx.server.cancel(owner_of(request), questions=False)

    # ---- the image and the conversation ----
    def set_image(self, conv: Conversation, image):
        """A new image (upload, example, new scene) starts a new conversation; the same image changes nothing."""
        path = upload_path(image, self.ctx.workdir)
        if path is None or not Path(path).is_file() or (conv.image is not None and file_key(path) == conv.image_key):
            return {}
        try:
            new = Conversation.about(path, upload_name(image))
        except Exception as e:  # noqa: BLE001
            previous = conv.image_path if conv.image_path and Path(conv.image_path).is_file() else None
            return {"conv": conv, "status": problem("Could not use that image", e), **self.views(conv),
                    "image": previous}
        return {"conv": new, "status": f"New conversation about **{new.image_name}**.", **self.views(new)}

    def new_scene(self, conv: Conversation):
        """A random scene from the scene generator, with a suggested question."""
        seed, img, qa = scene_sample()
        path = self.ctx.workdir / f"scene-{seed}.png"
        img.save(path)
        new = Conversation.about(path, f"scene {seed}")
        status = (f"New scene (seed {seed}) with a suggested question; the scene generator's own answer "
                  f"is **{qa.answer}**")
        return {"conv": new, "status": status, **self.views(new), "image": str(path), "question": qa.question}

    def reset(self, conv: Conversation):
        new = conv.cleared()
        return {"conv": new, "status": "New conversation about the same image." if new.image is not None else "",
                **self.views(new)}

    # ---- speed and export ----
    @background_task("speed_md", stopped=T.SPEED_STOPPED, failed="Could not measure the speed")
    def speed(self, conv: Conversation, measure: bool = True, request: gr.Request = None):
        """Times the last turn with its route and with every layer (interleaved repeats), once per turn.
        Background work: plain questions of any user go first, at every token."""
        last = conv.last
        if last is None:
            return {"speed_md": ""}
        if last.speed is not None:
            return speed_views(last.speed)
        if not measure:
            return {"speed_md": T.SPEED_OFF}
        if last.trace.route_mode == "dense":      # asked before RoE was fitted: every layer ran, no route to time
            md = T.NOT_FITTED_SPEED if self.ctx.pipe.needs_fit else T.SPEED_DENSE_TURN
            return {"speed_md": md, "speed_fig": F.empty_figure(md.strip("_"), SPEED_HEIGHT)}
        with self.ctx.job(request) as job:
            cmp = self.ctx.pipe.compare(conv.image, last.question, conv.history(-1), route="auto",
                                        threshold=last.trace.threshold, max_new_tokens=self.ctx.max_new_tokens,
                                        repeats=self.ctx.speed_repeats, checkpoint=job.checkpoint)
        return {"conv": conv.with_speed(cmp), **speed_views(cmp)}

    def speed_now(self, conv: Conversation, request: gr.Request = None):
        return self.speed(conv, True, request)

    def export(self, conv: Conversation):
        """The conversation's traces as CSV (one row per turn x layer) and JSON."""
        if not conv.turns:
            return {"export_csv": None, "export_json": None,
                    "export_md": problem("Nothing to export", "ask a question first")}
        csv_path, json_path = conv.export(self.ctx.workdir / "exports")
        return {"export_csv": str(csv_path), "export_json": str(json_path),
                "export_md": f"Exported {len(conv.turns)} turn(s) and {len(conv.whatifs)} what-if(s): "
                             f"{len(conv.rows())} rows."}
