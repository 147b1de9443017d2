"""The one call every routing system answers: an image + a question (+ the conversation so far) ->
the answer and what the system decided for it.

    from roe_core.systems import load_system, load_systems
    pipe = load_system("roe")                       # any name in registry.SYSTEMS; the embedded model
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
from ..runtime.engine import MODES as ENGINE_MODES, DecodeEngine
from ..runtime.familiarity import Familiarity, ImageCheck
from ..runtime.generation import Timing
from ..runtime.images import load_image
from ..runtime.loading import ModelLoadError, NotFittedError
from ..runtime.sources import LoadedBase, load_base, parts_root
from . import registry
from .trace import Trace

History = Sequence[tuple[str, str]]   # [(question, answer), ...] of earlier turns about the same image


@dataclass
class Answer:
    text: str
    trace: Trace                  # the system's trace (RouteTrace, ExpertTrace, DenseTrace): see trace.py
    question: str = ""
    system: str = "roe"
    timing: Timing | None = None  # the batch's prefill + decode time (shared by a batch's answers)
    image_check: ImageCheck | None = None   # how familiar the image looks to the base (None: the base has no check)


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


def shipped_parts(loaded: LoadedBase, system: str) -> str | None:
    """A system's shipped parts folder in the loaded source's parts root (<root>/<parts_folder>, complete
    when its config file is there), else None."""
    spec = registry.get(system)
    if loaded.parts_root is None or not spec.has_parts:
        return None
    folder = Path(loaded.parts_root) / spec.parts_folder
    return str(folder) if (folder / spec.parts_config).is_file() else None


# info["parts"] of a system that refuses untrained parts and was loaded without any (Pipeline.needs_fit)
NOT_FITTED = "not fitted"


def shipped_systems(model: str = "embedded") -> list[str]:
    """Every system a model has parts for: a source's shipped ones (systems without parts always); any
    other model all of them (RoE and the fixed path then load "not fitted", unless given parts)."""
    root = parts_root(model)
    if root is None:
        return list(registry.names())
    return [n for n, s in registry.SYSTEMS.items()
            if not s.has_parts or (Path(root) / s.parts_folder / s.parts_config).is_file()]


class Pipeline:
    """One system over a LLaVA base: answers, batches, streams. Subclasses set `system` (its registry
    name) and implement `generate(batch, max_new_tokens, callback, **options) -> (token ids per example,
    traces, Timing)` and `parameter_counts()`; `from_base(loaded, parts)` builds one over a loaded base.

    A system whose untrained parts would change its answers (RoE, the fixed path: `refuses_untrained`)
    loaded over a base without parts for it is "not fitted" (`needs_fit`): it refuses routed answers
    (NotFittedError) unless built with fresh=True, which asks for untrained parts explicitly (training
    starts from them; tests use them)."""
    system = "?"
    refuses_untrained = False

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
        self.engine: DecodeEngine | None = None
        self.loaded: LoadedBase | None = None       # the base it wraps, where built by from_base
        self.use_engine("auto")

    def use_engine(self, mode: str | None = "auto") -> "Pipeline":
        """How decoding runs: "graphs" (the static-shape engine with CUDA graphs, runtime.engine), "eager"
        (the same engine uncaptured), "off" / None (the eager loop with a growing cache), "auto" (graphs
        on CUDA, off on the CPU, where the eager loop is as fast). Tokens are the same in every mode. If the
        graphs' guard finds a replay unlike the eager step, the engine goes on eagerly and info says so
        (info["engine"] "eager", info["engine_fallback"] why)."""
        mode = "off" if mode is None else mode
        if mode == "auto":
            mode = "graphs" if self.device.type == "cuda" else "off"
        if mode == "off":
            self.engine = None
        elif mode in ENGINE_MODES:
            if self.engine is None or self.engine.mode != mode:
                self.engine = DecodeEngine(mode, on_fallback=self._engine_fell_back)
        else:
            raise ValueError(f"engine mode must be auto, off or one of {ENGINE_MODES}, not {mode!r}")
        self.info["engine"] = mode
        self.info.pop("engine_fallback", None)
        return self

    def _engine_fell_back(self, message: str) -> None:
        self.info["engine"] = "eager"
        self.info["engine_fallback"] = message

    def engine_stats(self) -> dict:
        """The decode engine's counts (arenas built and reused, graphs captured, generations, examples);
        {} on the eager loop."""
        return dict(self.engine.stats) if self.engine is not None else {}

    @property
    def spec(self) -> registry.SystemSpec:
        return registry.get(self.system)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def num_layers(self) -> int:
        return self.info["num_layers"]

    @property
    def fitted(self) -> bool:
        """Its parts came from somewhere (shipped, a folder, a fit, training); False for fresh ones."""
        return bool(self.info.get("fitted", True))

    @property
    def needs_fit(self) -> bool:
        """It refuses routed answers: its parts are fresh and nobody asked for untrained ones."""
        return self.refuses_untrained and not self.fitted and not self.info.get("untrained_ok", False)

    def require_fitted(self, every_layer: bool = False) -> None:
        """NotFittedError when this answer would come from untrained parts (every_layer: nothing but the
        base runs, which is always allowed)."""
        if self.needs_fit and not every_layer:
            raise NotFittedError(self.label, f"--{self.system.replace('_', '-')}")

    # --- building ---
    @classmethod
    def from_base(cls, loaded: LoadedBase, parts: str | None = None, seed: int = 0) -> "Pipeline":
        raise NotImplementedError

    @classmethod
    def build(cls, loaded: LoadedBase, parts: str | None = None, seed: int = 0, fresh: bool = False) -> "Pipeline":
        """from_base, with fresh=True passed to the systems that refuse untrained parts (the others make
        fresh parts as before, or need none)."""
        if fresh and cls.refuses_untrained:
            return cls.from_base(loaded, parts, seed, fresh=True)
        return cls.from_base(loaded, parts, seed)

    @classmethod
    def load(cls, model: str = "embedded", parts: str | None = None, device: str | None = "auto",
             dtype: str | torch.dtype | None = None, seed: int = 0, fresh: bool = False) -> "Pipeline":
        """model: "embedded", "tiny", a local folder or a hub id. parts: the system's folder (None: the
        model's shipped parts; for any other model "not fitted", or fresh untrained parts with fresh=True)."""
        if parts is not None and not Path(parts).is_dir():
            raise ModelLoadError(f"{registry.label(cls.system)} folder {parts!r} does not exist")
        return cls.build(load_base(model, device, dtype, seed), parts, seed, fresh)

    @staticmethod
    def make_encoder(loaded: LoadedBase) -> ConversationEncoder:
        return ConversationEncoder.for_model(loaded.base, loaded.tokenizer, loaded.image_processor,
                                             system_prompt=loaded.info.get("system_prompt"))

    @staticmethod
    def base_info(loaded: LoadedBase) -> dict:
        return {k: v for k, v in loaded.info.items() if k != "system_prompt"}

    @classmethod
    def with_parts(cls, loaded: LoadedBase, parts: str | None, seed: int, load: Callable, fresh: Callable,
                   untrained: str, asked_fresh: bool = False) -> "Pipeline":
        """A system whose parts wrap the base: load(base, folder) from `parts` (None: the source's shipped
        ones), else fresh(base) seeded. info["parts"] says which: the folder's name for shipped parts
        (never a server path), the path given for others, `untrained` for fresh parts, or NOT_FITTED for
        fresh parts of a system that refuses them (unless asked_fresh). info["fitted"]: parts came from a
        folder. The pipeline keeps `loaded` (a fit builds its successor over the same base)."""
        info = cls.base_info(loaded)
        shipped = parts is None and shipped_parts(loaded, cls.system) is not None
        parts = parts or shipped_parts(loaded, cls.system)
        if parts is not None:
            if not Path(parts).is_dir():
                raise ModelLoadError(f"{registry.label(cls.system)} folder {parts!r} does not exist")
            model = load(loaded.base, parts)
            info["parts"] = f"shipped ({Path(parts).name}/)" if shipped else str(parts)
            info["parts_path"] = str(parts)
        else:
            torch.manual_seed(seed)
            model = fresh(loaded.base)
            info["parts"] = NOT_FITTED if cls.refuses_untrained and not asked_fresh else untrained
            info["untrained_ok"] = asked_fresh
        info["fitted"] = parts is not None
        pipe = cls(model.to(device=loaded.base.device, dtype=loaded.base.dtype), cls.make_encoder(loaded), info)
        pipe.loaded = loaded
        return pipe

    # --- what each system implements ---
    def generate(self, batch, max_new_tokens: int, callback=None, **options) -> tuple[list[list[int]], list, Timing]:
        raise NotImplementedError

    def parameter_counts(self, layers_executed: float | None = None) -> ParamCounts:
        """Parameters in total and active per token; layers_executed: the mean layers an answer ran, for a
        system that skips layers (the others ignore it)."""
        raise NotImplementedError

    def skip_order(self) -> list[int] | None:
        """For a system that skips a fixed set of layers chosen by a measured score: every layer, the one it
        would skip first leading (so its path at k skips the first k). None for the others. The sweep uses
        it to draw that fixed path at every k (analysis.sweep_fixed)."""
        return None

    # --- answering ---
    def answer(self, image, question: str, history: History = (), *, max_new_tokens: int = 48,
               on_token: Callable[[str], None] | None = None, **options) -> Answer:
        """Answers one question about one image; on_token(text_so_far) streams the answer. options: the
        system's own (registry `options`, e.g. RoE's route and threshold)."""
        return self.answer_batch([(image, question, history)], max_new_tokens=max_new_tokens, on_token=on_token,
                                 **options)[0]

    def answer_batch(self, items: Sequence, *, max_new_tokens: int = 48,
                     on_token: Callable[[str], None] | None = None, on_step: Callable | None = None,
                     **options) -> list[Answer]:
        """items: [(image, question, history)] or Prepared ones, answered as one batch (left-padded).
        on_token(text) streams example 0's answer; on_step(step, tokens (B,)) sees every example's tokens
        (and may raise to stop)."""
        if not items:
            return []
        return self.answer_collated(items, self.batch(items), max_new_tokens=max_new_tokens, on_token=on_token,
                                    on_step=on_step, **options)

    def answer_collated(self, items: Sequence, batch, *, max_new_tokens: int = 48,
                        on_token: Callable[[str], None] | None = None, on_step: Callable | None = None,
                        **options) -> list[Answer]:
        """answer_batch on items already collated into `batch` (self.batch(items)), for a system that
        reuses the batch after generating."""
        tokens, traces, timing = self.generate(batch, max_new_tokens, self.step_callback(on_token, on_step),
                                               **options)
        return self.answers(items, tokens, traces, timing, self.image_checks(batch))

    def answers(self, items, tokens, traces, timing, checks=None) -> list[Answer]:
        """Answers from generated ids; each trace gets the parameters its answer touched per token."""
        tok = self.encoder.tokenizer
        out = []
        checks = checks or [None] * len(items)
        for ids, trace, item, check in zip(tokens, traces, items, checks):
            trace.active_params = self.parameter_counts(trace.layers_executed).active
            out.append(Answer(tok.decode(ids, skip_special_tokens=True).strip(), trace, question_of(item),
                              self.system, timing, check))
        return out

    @property
    def familiarity(self) -> Familiarity | None:
        """The base's image-familiarity statistics (runtime.familiarity) from its parts root, if it has them."""
        if not hasattr(self, "_familiarity"):
            root = self.loaded.parts_root if self.loaded is not None else self.info.get("parts_root")
            self._familiarity = Familiarity.load(root)
        return self._familiarity

    def image_checks(self, batch) -> list[ImageCheck] | None:
        """Per example, how familiar its image looks to the base (None without statistics or images)."""
        fam = self.familiarity
        if fam is None or getattr(batch, "pixel_values", None) is None:
            return None
        return fam.check(self.model.base, batch.pixel_values)

    def step_callback(self, on_token, on_step=None):
        """callback(step, tokens) for generate: streams example 0's text to on_token until example 0 emits a
        stop token (in a batch the others may go on; example 0's stream must not run past its own end),
        and calls on_step."""
        if on_token is None:
            return on_step
        streamed: list[int] = []
        done = [False]
        tok = self.encoder.tokenizer
        stop_ids = self.encoder.stop_ids or set()

        def callback(step, tokens):
            if not done[0]:
                t = int(tokens[0])
                if t in stop_ids:
                    done[0] = True
                else:
                    streamed.append(t)
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
