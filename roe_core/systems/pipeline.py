"""The one call every routing system answers: an image + a question (+ the conversation so far) ->
the answer and what the system decided for it.

    from roe_core.systems import load_system, load_systems
    pipe = load_system("moe_llava")                 # "dense", "roe", "moe_llava"; the embedded model
    ans = pipe.answer("scene.png", "How many circles are there?")
    ans.text, ans.trace, ans.timing.total_s, pipe.parameter_counts().active

`Pipeline` is written once: loading a base (the embedded model, the tiny test model, a local folder
or a hub id), encoding conversations, batching, streaming, timing. Each system's file subclasses it
with its own `generate` (batched greedy decoding through runtime.generation.greedy) and trace:
RoE a route per layer (RouteTrace), an MoE system the experts and weights per MoE layer and token
(ExpertTrace), the dense model the layers it ran (DenseTrace).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from ..runtime.conversation import ConversationEncoder, InputError
from ..runtime.generation import Timing
from ..runtime.images import load_image
from ..runtime.loading import ModelLoadError, load_llava, pick_device, pick_dtype

History = Sequence[tuple[str, str]]   # [(question, answer), ...] of earlier turns about the same image


@dataclass
class Answer:
    text: str
    trace: Any                    # the system's trace: RouteTrace, ExpertTrace, DenseTrace
    question: str = ""
    system: str = "roe"
    timing: Timing | None = None  # the batch's prefill + decode time (shared by a batch's answers)


@dataclass(frozen=True)
class Prepared:
    """One request checked and encoded (`Pipeline.prepare`), ready to join a batch: its errors
    (no image, an empty question, an unreadable image) are raised before any model work."""
    question: str
    conv: Any                     # EncodedConversation
    image: Image.Image


@dataclass
class ParamCounts:
    """Parameters of a system: in total, and active per token (an MoE token runs top-k experts)."""
    vision: int
    projector: int
    decoder_total: int              # embeddings, attention, norms, FFNs/experts, routers/adapters, LM head
    decoder_active: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.decoder_total

    @property
    def active(self) -> int:
        return self.vision + self.projector + self.decoder_active

    @classmethod
    def of_dense(cls, base: nn.Module) -> "ParamCounts":
        llava = base.model
        dec = numel(list(llava.language_model.parameters()) + list(base.lm_head.parameters()))
        return cls(numel(llava.vision_tower.parameters()), numel(llava.multi_modal_projector.parameters()), dec, dec)

    def to_dict(self) -> dict:
        return {"total": self.total, "active": self.active, "vision": self.vision, "projector": self.projector,
                "decoder_total": self.decoder_total, "decoder_active": self.decoder_active}


def numel(params) -> int:
    """Parameters counted once (tied embeddings are one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


@dataclass
class LoadedBase:
    """A LLaVA base with its tokenizer and image processor, shareable by several systems (each wraps it
    without editing it)."""
    base: nn.Module
    tokenizer: Any
    image_processor: Any
    info: dict
    embedded: bool = False


def load_base(model: str = "embedded", device: str | None = "auto", dtype: str | torch.dtype | None = None,
              seed: int = 0) -> LoadedBase:
    """model: "embedded" (shipped), "tiny" (random, for tests), a local folder or a hub id."""
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    info = {"model": model}
    if model == "embedded":
        from ..embedded.base import load_embedded
        base, tokenizer, image_processor, _, extra = load_embedded(dev, dt)
        info.update(extra)
    elif model == "tiny":
        from ..runtime.tiny import tiny_llava
        base, tokenizer, image_processor = tiny_llava(seed=seed)
        base = base.to(device=dev, dtype=dt)
        info["trained_on"] = "nothing: random weights (tests and smoke runs)"
    else:
        base, tokenizer, image_processor = load_llava(model, dev, dt)
    return LoadedBase(base.eval(), tokenizer, image_processor, info, embedded=model == "embedded")


def shipped_parts(loaded: LoadedBase, system: str) -> str | None:
    """The embedded model's shipped parts folder of a system (assets/embedded/<folder>), else None."""
    if not loaded.embedded:
        return None
    from ..embedded.base import parts_folder
    folder = parts_folder(system)
    return str(folder) if folder is not None else None


class Pipeline:
    """One system over a LLaVA base: answers, batches, streams. Subclasses set `system` and implement
    `generate(batch, max_new_tokens, callback, **options) -> (token ids per example, traces, Timing)`
    and `parameter_counts()`; `from_base(loaded, parts)` builds one over a loaded base."""
    system = "?"
    label = "?"

    def __init__(self, model: nn.Module, encoder: ConversationEncoder, info: dict | None = None):
        self.model = model.eval()
        self.encoder = encoder
        self.device = next(model.parameters()).device
        self.info = dict(info or {})
        self.info.setdefault("system", self.system)
        self.info.setdefault("device", str(self.device))
        self.info.setdefault("dtype", str(next(model.parameters()).dtype).replace("torch.", ""))
        self.info.setdefault("num_layers", model.base.config.text_config.num_hidden_layers
                             if hasattr(model, "base") else None)

    # --- building ---
    @classmethod
    def from_base(cls, loaded: LoadedBase, parts: str | None = None, seed: int = 0) -> "Pipeline":
        raise NotImplementedError

    @classmethod
    def load(cls, model: str = "embedded", parts: str | None = None, device: str | None = "auto",
             dtype: str | torch.dtype | None = None, seed: int = 0) -> "Pipeline":
        """model: "embedded", "tiny", a local folder or a hub id. parts: the system's folder (None: the
        embedded model's shipped parts, or fresh untrained ones for any other model)."""
        if parts is not None and not Path(parts).is_dir():
            raise ModelLoadError(f"{cls.system} folder {parts!r} does not exist")
        return cls.from_base(load_base(model, device, dtype, seed), parts, seed)

    @staticmethod
    def make_encoder(loaded: LoadedBase) -> ConversationEncoder:
        return ConversationEncoder.for_model(loaded.base, loaded.tokenizer, loaded.image_processor,
                                             system_prompt=loaded.info.get("system_prompt"))

    @staticmethod
    def base_info(loaded: LoadedBase) -> dict:
        return {k: v for k, v in loaded.info.items() if k != "system_prompt"}

    @classmethod
    def with_parts(cls, loaded: LoadedBase, parts: str | None, seed: int, load: Callable, fresh: Callable,
                   untrained: str) -> "Pipeline":
        """A system whose parts wrap the base: load(base, folder) from `parts` (None: the embedded model's
        shipped ones), else fresh(base) seeded; info[system] says which (or `untrained`)."""
        info = cls.base_info(loaded)
        parts = parts or shipped_parts(loaded, cls.system)
        if parts is not None:
            if not Path(parts).is_dir():
                raise ModelLoadError(f"{cls.label} folder {parts!r} does not exist")
            model = load(loaded.base, parts)
            info[cls.system] = str(parts)
        else:
            torch.manual_seed(seed)
            model = fresh(loaded.base)
            info[cls.system] = untrained
        return cls(model.to(device=loaded.base.device, dtype=loaded.base.dtype), cls.make_encoder(loaded), info)

    # --- what each system implements ---
    def generate(self, batch, max_new_tokens: int, callback=None, **options) -> tuple[list[list[int]], list, Timing]:
        raise NotImplementedError

    def parameter_counts(self) -> ParamCounts:
        raise NotImplementedError

    # --- answering ---
    def answer(self, image, question: str, history: History = (), max_new_tokens: int = 48,
               on_token: Callable[[str], None] | None = None, **options) -> Answer:
        """Answers one question about one image; on_token(text_so_far) streams the answer."""
        return self.answer_batch([(image, question, history)], max_new_tokens, on_token, **options)[0]

    def answer_batch(self, items: Sequence, max_new_tokens: int = 48,
                     on_token: Callable[[str], None] | None = None, on_step: Callable | None = None,
                     **options) -> list[Answer]:
        """items: [(image, question, history)] or Prepared ones, answered as one batch (left-padded).
        on_token(text) streams example 0's answer; on_step(step, tokens (B,)) sees every example's tokens."""
        if not items:
            return []
        batch = self.batch(items)
        tokens, traces, timing = self.generate(batch, max_new_tokens, self.step_callback(on_token, on_step),
                                               **options)
        return self.answers(items, tokens, traces, timing)

    def answers(self, items, tokens, traces, timing) -> list[Answer]:
        tok = self.encoder.tokenizer
        return [Answer(tok.decode(ids, skip_special_tokens=True).strip(), trace, question_of(item), self.system,
                       timing) for ids, trace, item in zip(tokens, traces, items)]

    def step_callback(self, on_token, on_step=None):
        """callback(step, tokens) for generate: streams example 0's text to on_token, and calls on_step."""
        if on_token is None:
            return on_step
        streamed: list[int] = []
        tok = self.encoder.tokenizer

        def callback(step, tokens):
            streamed.append(int(tokens[0]))
            on_token(tok.decode(streamed, skip_special_tokens=True))
            if on_step is not None:
                on_step(step, tokens)
        return callback

    def prepare(self, image, question: str, history: History = ()) -> Prepared:
        """Checks and encodes one request; InputError on an empty question, no image or an unreadable one."""
        if question is None or not str(question).strip():
            raise InputError("the question is empty")
        if image is None:
            raise InputError("there is no image: upload one (or pick an example) before asking")
        turns = [(q, a) for q, a in history] + [(str(question), None)]
        conv = self.encoder.encode(turns, has_image=True)
        return Prepared(str(question), conv, load_image(image) if not isinstance(image, Image.Image) else image)

    def batch(self, items: Sequence):
        """Encodes and collates [(image, question, history)] (or Prepared items); InputError on bad input."""
        prepared = [item if isinstance(item, Prepared) else self.prepare(*item) for item in items]
        return self.encoder.collate([p.conv for p in prepared], [p.image for p in prepared], last_turn_only=True)


def question_of(item) -> str:
    return item.question if isinstance(item, Prepared) else item[1]
