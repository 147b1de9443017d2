"""The one call: an image + a question (+ the conversation so far) -> the answer and its trace.

    from roe_core import RoEPipeline
    pipe = RoEPipeline.load()                    # the embedded model, on GPU if there is one
    ans = pipe.answer("scene.png", "How many circles are there?")
    ans.text, ans.trace.route, ans.trace.l1, ans.trace.timing.tokens_per_s
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from ..runtime.conversation import ConversationEncoder, InputError
from ..runtime.images import load_image
from ..runtime.loading import ModelLoadError, load_llava, pick_device, pick_dtype
from .roe import Route, RoEModel, RouteTrace, generate, prefill_l1

History = Sequence[tuple[str, str]]   # [(question, answer), ...] of earlier turns about the same image


@dataclass
class Answer:
    text: str
    trace: RouteTrace
    question: str = ""


@dataclass
class SpeedComparison:
    """The same turn answered with the route and with every layer, timed in interleaved repeats."""
    roe: Answer
    dense: Answer
    roe_s: float                  # median seconds (prefill + whole answer)
    dense_s: float
    repeats: int
    roe_times: list[float] = field(default_factory=list)
    dense_times: list[float] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.dense_s / self.roe_s if self.roe_s > 0 else float("nan")


class RoEPipeline:
    def __init__(self, model: RoEModel, encoder: ConversationEncoder, info: dict | None = None):
        self.model = model.eval()
        self.encoder = encoder
        self.device = next(model.parameters()).device
        self.info = dict(info or {})
        self.info.setdefault("device", str(self.device))
        self.info.setdefault("dtype", str(next(model.parameters()).dtype).replace("torch.", ""))
        self.info.setdefault("num_layers", model.num_layers)

    @property
    def threshold(self) -> float:
        """The routers' default threshold (run a layer iff p_run > it), from the RoE parts' config."""
        return self.model.config.threshold

    @classmethod
    def load(cls, model: str = "embedded", roe: str | None = None, device: str | None = "auto",
             dtype: str | torch.dtype | None = None, seed: int = 0) -> "RoEPipeline":
        """model: "embedded" (shipped), "tiny" (random, for tests), a local folder or a hub id.
        roe: an RoE folder (roe_config.json + roe.safetensors); None = the embedded model's own
        parts, or fresh untrained ones for any other model."""
        dev = pick_device(device)
        dt = pick_dtype(dev, dtype)
        info = {"model": model}
        if model == "embedded":
            from ..embedded.base import load_embedded
            base, tokenizer, image_processor, roe_dir, extra = load_embedded(dev, dt)
            roe = roe or roe_dir
            info.update(extra)
        elif model == "tiny":
            from ..runtime.tiny import tiny_llava
            base, tokenizer, image_processor = tiny_llava(seed=seed)
            base = base.to(device=dev, dtype=dt)
            info["trained_on"] = "nothing: random weights (tests and smoke runs)"
        else:
            base, tokenizer, image_processor = load_llava(model, dev, dt)
        if roe is not None:
            if not Path(roe).is_dir():
                raise ModelLoadError(f"RoE folder {roe!r} does not exist")
            rmodel = RoEModel.from_roe_folder(base, roe)
            info["roe"] = str(roe)
        else:
            torch.manual_seed(seed)
            rmodel = RoEModel(base)
            info["roe"] = "untrained (fresh routers and adapters)"
        encoder = ConversationEncoder.for_model(base, tokenizer, image_processor,
                                                system_prompt=info.pop("system_prompt", None))
        return cls(rmodel, encoder, info)

    # --- answering ---
    def answer(self, image, question: str, history: History = (), route: Route = "auto",
               threshold: float | None = None, max_new_tokens: int = 48, trace_l1: bool = True,
               dense_l1: bool = True, on_token: Callable[[str], None] | None = None) -> Answer:
        """Answers one question about one image. The route is decided on this question alone and held
        for the whole answer. on_token(text_so_far) streams the answer."""
        return self.answer_batch([(image, question, history)], route, threshold, max_new_tokens,
                                 trace_l1, dense_l1, on_token)[0]

    def answer_batch(self, items: Sequence[tuple], route: Route = "auto", threshold: float | None = None,
                     max_new_tokens: int = 48, trace_l1: bool = False, dense_l1: bool = False,
                     on_token: Callable[[str], None] | None = None) -> list[Answer]:
        """items: [(image, question, history)]. Examples in one batch may take different routes."""
        if not items:
            return []
        batch = self.batch(items)
        tok = self.encoder.tokenizer
        callback = None
        if on_token is not None:
            streamed: list[int] = []

            def callback(step, tokens):
                streamed.append(int(tokens[0]))
                on_token(tok.decode(streamed, skip_special_tokens=True))
        gen = generate(self.model, batch, route, max_new_tokens, self.encoder.stop_ids, threshold,
                       trace_l1=trace_l1, callback=callback)
        if dense_l1:
            for trace, row in zip(gen.traces, prefill_l1(self.model, batch, "dense").tolist()):
                trace.l1_dense = row
        return [Answer(tok.decode(ids, skip_special_tokens=True).strip(), trace, q)
                for ids, trace, (_, q, _) in zip(gen.tokens, gen.traces, items)]

    def batch(self, items: Sequence[tuple]):
        convs, images = [], []
        for image, question, history in items:
            if question is None or not str(question).strip():
                raise InputError("the question is empty")
            if image is None:
                raise InputError("there is no image: upload one (or pick an example) before asking")
            turns = [(q, a) for q, a in history] + [(str(question), None)]
            convs.append(self.encoder.encode(turns, has_image=True))
            images.append(load_image(image) if not isinstance(image, Image.Image) else image)
        return self.encoder.collate(convs, images, last_turn_only=True)

    def compare(self, image, question: str, history: History = (), route: Route = "auto",
                threshold: float | None = None, max_new_tokens: int = 48, repeats: int = 3) -> SpeedComparison:
        """Times this turn with its route and densely, interleaved (RoE, dense, RoE, dense, ...) after
        one untimed warm-up of each; medians. Also returns both answers."""
        items = [(image, question, history)]
        roe = self.answer_batch(items, route, threshold, max_new_tokens, trace_l1=True, dense_l1=True)[0]
        dense = self.answer_batch(items, "dense", threshold, max_new_tokens, trace_l1=True)[0]
        batch = self.batch(items)
        roe_t, dense_t = [], []
        for _ in range(max(1, repeats)):
            for r, out in ((route, roe_t), ("dense", dense_t)):
                t0 = time.perf_counter()
                generate(self.model, batch, r, max_new_tokens, self.encoder.stop_ids, threshold)
                out.append(time.perf_counter() - t0)
        dense.trace.l1_dense = dense.trace.l1
        return SpeedComparison(roe, dense, statistics.median(roe_t), statistics.median(dense_t),
                               repeats, roe_t, dense_t)
