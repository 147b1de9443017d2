"""Conversations -> token ids, with the spans RoE routes on.

The model's own chat template renders the conversation; character offsets then tell which tokens
belong to which turn, which are question text (read by that turn's text routing token), which are
the answer (trained on), and which are system prompt + image (read by the image routing token).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

IMAGE_PLACEHOLDER = "<image>"  # how LLaVA data marks the image in the first human turn


class InputError(ValueError):
    """Bad user input (empty question, over-long conversation, unreadable image...): safe to show."""


@dataclass
class EncodedConversation:
    input_ids: list[int]
    turn_ids: list[int]                      # -1 shared (system prompt, image), t = turn t
    question_spans: list[tuple[int, int]]    # token [start, end) of each question's text
    answer_spans: list[tuple[int, int]]      # token [start, end) of each answer + its end-of-turn token
    image_end: int                           # tokens [0, image_end) are system prompt + image

    @property
    def num_turns(self) -> int:
        return len(self.question_spans)


@dataclass
class Batch:
    """Left-padded tensors for `RoEModel.layout` (+ labels when training)."""
    input_ids: Tensor        # (B, S)
    token_ok: Tensor         # (B, S) bool
    turn_ids: Tensor         # (B, S)
    image_keys: Tensor       # (B, S) bool
    question_keys: Tensor    # (B, T, S) bool
    answer_mask: Tensor      # (B, S) bool: tokens whose next-token prediction is trained
    pixel_values: Tensor | None

    def to(self, device, **kwargs) -> "Batch":   # accelerate may pass non_blocking=...
        return Batch(*(t.to(device, **kwargs) if isinstance(t, Tensor) else t for t in
                       (self.input_ids, self.token_ok, self.turn_ids, self.image_keys,
                        self.question_keys, self.answer_mask, self.pixel_values)))


class ConversationEncoder:
    """Renders (image, [(question, answer), ...]) with a model's chat template and tokenizer."""

    def __init__(self, tokenizer, image_processor, image_token_id: int, num_image_tokens: int,
                 system_prompt: str | None = None, max_length: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("ConversationEncoder needs a fast tokenizer (character offsets)")
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.num_image_tokens = num_image_tokens
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.special_ids = set(tokenizer.all_special_ids)
        self.stop_ids = self._find_stop_ids()

    @classmethod
    def for_model(cls, model, tokenizer, image_processor, **kw) -> "ConversationEncoder":
        """Reads the image token and image token count from a LlavaConfig."""
        cfg = model.config
        v = cfg.vision_config
        n = (v.image_size // v.patch_size) ** 2 + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        max_len = getattr(cfg.text_config, "max_position_embeddings", None)
        return cls(tokenizer, image_processor, cfg.image_token_id, n, max_length=max_len, **kw)

    def _find_stop_ids(self) -> set[int]:
        """The template's end-of-answer token(s): EOS plus whatever special token closes an answer."""
        stops = {self.tokenizer.eos_token_id} - {None}
        enc = self.encode([("q", "zzz")], has_image=False)
        s, e = enc.answer_spans[0]
        if e - s >= 1 and enc.input_ids[e - 1] in self.special_ids:
            stops.add(enc.input_ids[e - 1])
        return stops

    def render(self, turns: list[tuple[str, str | None]], has_image: bool, generating: bool | None = None) -> str:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for t, (q, a) in enumerate(turns):
            image = f"{self.image_token * self.num_image_tokens}\n" if (t == 0 and has_image) else ""
            messages.append({"role": "user", "content": image + q})
            if a is not None:
                messages.append({"role": "assistant", "content": a})
        if generating is None:
            generating = turns[-1][1] is None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generating)

    def _char_start(self, text: str, prefix: str, needle: str, cursor: int) -> int:
        """Where `needle` starts in `text`: right after `prefix` when the template renders prefixes
        consistently (it then cannot be confused with template text), else the next occurrence."""
        if text.startswith(prefix):
            c = len(prefix) + text[len(prefix):].index(needle)  # a template may put spaces first
            if c >= cursor:
                return c
        return text.index(needle, cursor)

    def encode(self, turns: list[tuple[str, str | None]], has_image: bool = True) -> EncodedConversation:
        """turns: [(question, answer)], the last answer None when the model is to answer it."""
        if not turns:
            raise InputError("a conversation needs at least one question")
        for q, a in turns:
            if not q or not q.strip():
                raise InputError("the question is empty")
            if IMAGE_PLACEHOLDER in q or self.image_token in q:
                raise InputError(f"questions may not contain the image token {self.image_token!r}")
        if any(a is None for _, a in turns[:-1]):
            raise InputError("only the last turn may be unanswered")
        turns = [(q.strip(), a) for q, a in turns]
        text = self.render(turns, has_image)
        tok = self.tokenizer
        add_bos = bool(tok.bos_token) and not text.startswith(tok.bos_token) and tok.bos_token_id is not None
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if add_bos and getattr(tok, "add_bos_token", False):
            ids, offsets = [tok.bos_token_id] + ids, [(0, 0)] + offsets

        def token_span(c0: int, c1: int) -> tuple[int, int]:
            inside = [k for k, (s, e) in enumerate(offsets) if s < c1 and e > c0]
            return (inside[0], inside[-1] + 1)

        q_spans, a_spans, cursor = [], [], 0
        for t, (q, a) in enumerate(turns):
            sentinel = "\x00q\x00"
            pre = self.render(turns[:t] + [(sentinel, None)], has_image, generating=False)
            c = self._char_start(text, pre[:pre.index(sentinel)], q, cursor)
            q_spans.append(token_span(c, c + len(q)))
            cursor = c + len(q)
            if a is not None:
                pre = self.render(turns[:t] + [(q, None)], has_image, generating=True)
                if a:
                    c = self._char_start(text, pre, a, cursor)
                    s, e = token_span(c, c + len(a))
                    cursor = c + len(a)
                else:   # empty answer: only the end-of-turn token
                    s = e = next(k for k, (s0, _) in enumerate(offsets) if s0 >= max(cursor, len(pre)))
                if e < len(ids) and ids[e] in self.special_ids:   # learn to stop
                    e += 1
                a_spans.append((s, e))
        turn_ids = [-1] * len(ids)
        for t, (s, _) in enumerate(q_spans):
            end = q_spans[t + 1][0] if t + 1 < len(q_spans) else len(ids)
            turn_ids[s:end] = [t] * (end - s)
        n_img = sum(1 for i in ids if i == self.image_token_id)
        if has_image and n_img != self.num_image_tokens:
            raise InputError(f"expected {self.num_image_tokens} image tokens, found {n_img}")
        if self.max_length is not None and len(ids) > self.max_length:
            raise InputError(
                f"the conversation is {len(ids)} tokens long; this model reads at most {self.max_length}. "
                "Ask a shorter question or start a new conversation.")
        return EncodedConversation(ids, turn_ids, q_spans, a_spans, image_end=q_spans[0][0])

    def image_tensor(self, images: list[Image.Image]) -> Tensor:
        return self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def collate(self, convs: list[EncodedConversation], images: list[Image.Image] | None,
                last_turn_only: bool = False) -> Batch:
        """Left-pads a list of encoded conversations. last_turn_only: one text routing token, for the
        last question (inference routes each answer on its own question)."""
        B, S = len(convs), max(len(c.input_ids) for c in convs)
        T = 1 if last_turn_only else max(c.num_turns for c in convs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((B, S), pad, dtype=torch.long)
        token_ok = torch.zeros(B, S, dtype=torch.bool)
        turn_ids = torch.full((B, S), -1, dtype=torch.long)
        image_keys = torch.zeros(B, S, dtype=torch.bool)
        question_keys = torch.zeros(B, T, S, dtype=torch.bool)
        answer_mask = torch.zeros(B, S, dtype=torch.bool)
        for b, c in enumerate(convs):
            o = S - len(c.input_ids)  # left padding offset
            input_ids[b, o:] = torch.tensor(c.input_ids)
            token_ok[b, o:] = True
            turn_ids[b, o:] = torch.tensor(c.turn_ids)
            image_keys[b, o:o + c.image_end] = True
            spans = c.question_spans[-1:] if last_turn_only else c.question_spans
            for t, (s, e) in enumerate(spans):
                question_keys[b, t, o + s:o + e] = True
            for s, e in c.answer_spans:
                answer_mask[b, o + s:o + e] = True
        if last_turn_only:   # one routing turn: every turn's tokens follow the last question's route
            turn_ids = torch.where(turn_ids >= 0, torch.zeros_like(turn_ids), turn_ids)
        pixel_values = self.image_tensor(images) if images else None
        return Batch(input_ids, token_ok, turn_ids, image_keys, question_keys, answer_mask, pixel_values)
