"""The dense model's language-model stages on `train.loop.fit`, and its exact-match check.

    align      the projector (+ the ViT at a low LR) through the frozen decoder
    finetune   LoRA on the decoder (peft) + projector + ViT

Both train `LMObjective`: mean cross-entropy over the answer tokens of right-padded conversations
(`lm_loss`), named AdamW groups, a linear warm-up then a cosine to 10% of each group's LR. fit
checkpoints into runs/embedded/<stage>/ (resumable with --resume) and the stage ships its weights
into assets/embedded at every checkpoint; the learning curve goes to assets/embedded/logs/<stage>.jsonl.
The vision stage is in vision.py, the routing systems' stages in routing.py.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.loading import cpu_bf16_is_fast
from ..train.loop import LoopConfig, fit
from .base import ASSETS, LORA_DIR, LORA_WIDE, LORA_WIDE_DIR, RUNS, add_lora, build_base, make_encoder, save_lora, save_vision_parts, write_state
from .data import LMCollator, PixelConversations, pixel_cache
from .fitting import CurveMirror, log_row, resume_point


def lm_loss(base, ids: Tensor, ans: Tensor, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean CE over answer tokens (LM head only there); also token accuracy."""
    h = base.model(input_ids=ids, pixel_values=pixel_values, use_cache=False).last_hidden_state
    b, p = ans[:, 1:].nonzero(as_tuple=True)
    logits = base.lm_head(h[b, p]).float()
    target = ids[b, p + 1]
    return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()


@dataclass
class LMConfig(LoopConfig):
    """fit's config for align / finetune. lr, projector_lr, vit_lr: the groups' peak LRs (a stage
    uses those it trains); warm_from: the step the warm-up starts at (a resume from shipped weights,
    without optimizer state, warms up again)."""
    lr: float = 1e-3                 # align: the projector; finetune: the LoRA
    projector_lr: float = 5e-4       # finetune
    vit_lr: float = 1e-4             # 0: the ViT stays frozen
    warmup_steps: int = 20
    lr_floor: float = 0.1            # the cosine ends at this fraction of the peak
    warm_from: int = 0
    eval_every: int = 0              # validate() every that many steps (0: never)


class LMObjective:
    """A language-model stage for train.loop.fit: the given AdamW groups train (nothing else), on
    lm_loss. A learning-curve row averages loss and token accuracy over the steps since the last row
    (the recipe's curves always did) and adds the batch's sequence length; every eval_every steps it
    also holds validate(step)'s fields. ship(step) runs at every checkpoint (the trained tensors
    themselves are in fit's backbone.safetensors)."""

    def __init__(self, model: nn.Module, groups: list[dict], cfg: LMConfig, desc: str = "LM",
                 validate: Callable[[int], dict] | None = None, ship: Callable[[int], None] | None = None):
        self.cfg, self.desc, self.validate, self.ship = cfg, desc, validate, ship
        self.groups = [g for g in groups if g["params"]]
        self.params = [p for g in self.groups for p in g["params"]]
        ids = {id(p) for p in self.params}
        self.names = [n for n, p in model.named_parameters() if id(p) in ids]
        self.window: list[tuple[float, float]] = []
        self.seq_len = 0
        self.done = 0                # optimizer steps taken so far
        self._frozen = False

    def param_groups(self, model: nn.Module) -> list[dict]:
        return self.groups

    def set_trainable(self, model: nn.Module, step: int) -> None:
        if not self._frozen:
            model.requires_grad_(False)
            for p in self.params:
                p.requires_grad_(True)
            self._frozen = True

    def lr_factor(self, step: int) -> float:
        c = self.cfg
        warm = min(1.0, (step - c.warm_from + 1) / c.warmup_steps)
        return warm * (c.lr_floor + (1 - c.lr_floor) * 0.5 * (1 + math.cos(math.pi * step / c.steps)))

    def loss(self, model: nn.Module, batch, step: int) -> dict[str, Tensor]:
        loss, acc = lm_loss(model, batch.input_ids, batch.answer_mask, batch.pixel_values)
        self.window.append((float(loss.detach()), float(acc)))
        self.seq_len = batch.input_ids.shape[1]
        return {"loss": loss, "token_acc": acc}

    def after_step(self, model: nn.Module, step: int) -> None:
        self.done = step + 1

    def row(self, step: int) -> dict:
        n, c = step + 1, self.cfg
        if not (n % c.log_every == 0 or n == c.steps) or not self.window:
            return {}
        k = len(self.window)
        row = {"loss": sum(w[0] for w in self.window) / k, "token_acc": sum(w[1] for w in self.window) / k,
               "seq_len": self.seq_len}
        self.window = []
        if self.validate is not None and c.eval_every and n % c.eval_every == 0 and n < c.steps:
            t0 = time.perf_counter()
            row.update(self.validate(n))
            row["eval_s"] = time.perf_counter() - t0      # included in this row's s_per_step
        return row

    def save_parts(self, model: nn.Module, out) -> None:
        if self.ship is not None:
            self.ship(self.done)

    def load_parts(self, model: nn.Module, out) -> None:
        pass                          # everything trained is in backbone.safetensors

    def base_tensors(self, model: nn.Module) -> list[str]:
        return self.names


def evaluate(base, tok, n: int = 200, split: str = "val", batch_size: int = 25, max_new_tokens: int = 40,
             samples=None) -> dict:
    """Exact match (answers_match) on n single-question samples of a split, greedy, dense route
    (analysis.evaluate through an RoE pipeline over `base` with every layer run)."""
    from ..analysis.evaluate import evaluate as answer_all
    from ..scenes import Question, make_shifted_split, make_split, render
    from ..systems.roe import RoEModel, RoEPipeline
    if samples is None:
        samples = make_shifted_split(n) if split == "shifted" else make_split(split, n, n_turns=1)
    qs = [Question(s.image() if hasattr(s, "image") else render(s.scene, 256), s.turns[0].question, [],
                   s.turns[0].answer, s.turns[0].qtype) for s in samples]
    was_training = base.training
    pipe = RoEPipeline(RoEModel(base), make_encoder(base, tok), {})   # RoEModel holds base by reference
    try:
        with torch.no_grad():
            preds, ok, _ = answer_all(pipe, qs, batch_size, max_new_tokens, route="dense")
    finally:
        base.train(was_training)
    per: dict[str, list[int]] = {}
    for q, good in zip(qs, ok):
        per.setdefault(q.qtype, []).append(int(good))
    examples = [(q.question, q.gold, p) for q, p in zip(qs[:12], preds)]
    return {"split": split, "n": len(ok), "exact_match": sum(ok) / max(1, len(ok)),
            "per_qtype": {k: sum(v) / len(v) for k, v in sorted(per.items())},
            "n_per_qtype": {k: len(v) for k, v in sorted(per.items())}, "examples": examples}


COUNTING = ("count", "relcount")


def evaluate_wide(base, tok, n_plain: int, n_wide: int) -> dict:
    """The finetune's choice on val: exact match on n_plain plain val questions and on the first question of
    n_wide val samples reworded and restyled (grammar.make_wide_sample, the --wide-data distribution), each
    alone and their mean
    (`score`, what the best checkpoint is chosen by), with counting (count + relcount) reported apart."""
    from ..scenes.grammar import make_wide_sample
    from ..scenes.splits import split_seeds
    plain = evaluate(base, tok, n_plain)
    wide = evaluate(base, tok, n_wide, samples=[make_wide_sample(s) for s in split_seeds("val", n_wide)])

    def counting(ev):
        got = [(ev["per_qtype"][k], ev["n_per_qtype"][k]) for k in COUNTING if k in ev["per_qtype"]]
        return sum(a * m for a, m in got) / max(1, sum(m for _, m in got))
    return {"score": (plain["exact_match"] + wide["exact_match"]) / 2,
            "plain": plain["exact_match"], "wide": wide["exact_match"],
            "plain_counting": counting(plain), "wide_counting": counting(wide),
            "plain_per_qtype": plain["per_qtype"], "wide_per_qtype": wide["per_qtype"],
            "n_plain": plain["n"], "n_wide": wide["n"]}


def stage_lm(stage: str, args) -> None:
    """align: projector (+ViT at a low LR) through the frozen decoder.
    finetune: LoRA on the decoder + projector + ViT; --wide-data adds --n-wide train samples reworded and
    restyled (scenes.grammar) beside the plain ones and validates on plain and wide val (counting apart),
    keeping the best checkpoint's weights in runs/embedded/finetune/best/; --count-boost K repeats the
    samples with a counting turn K more times.
    widen: a second, small LoRA (base.LORA_WIDE, rank 4) on the finetune LoRA merged, always on the wide
    data beside the plain; the vision side frozen. Saved to assets/embedded/lora_wide/, merged at load
    once the stage is done."""
    from tqdm.auto import tqdm
    torch.manual_seed(args.seed)
    # align --with-lora: the projector learns to feed the decoder with the LoRA in assets/ merged
    # (frozen), e.g. a new vision tower fitted to an already finetuned decoder, which finetune
    # --resume then trains on from that LoRA
    with_lora = stage == "align" and args.with_lora
    widen = stage == "widen"
    base, tok = build_base(("vision", "align", "finetune") if stage == "finetune" or with_lora or widen
                           else ("vision", "align"), merge_lora=with_lora or widen)
    encoder = make_encoder(base, tok)
    pv, samples = pixel_cache(args.n_train, augment=args.augment)
    wide = stage in ("finetune", "widen") and args.wide_data
    if wide:   # the same kind of scenes reworded and restyled, beside the plain ones
        from .data import wide_pixel_cache
        wpv, wsamples = wide_pixel_cache(args.n_wide or args.n_train)
        pv, samples = torch.cat([pv, wpv]), list(samples) + list(wsamples)
    base.requires_grad_(False)
    proj = list(base.model.multi_modal_projector.parameters())
    vit = list(base.model.vision_tower.parameters()) if args.vit_lr > 0 else []
    out = RUNS / stage
    start, from_shipped = resume_point(out, stage) if args.resume else (0, False)
    cfg = LMConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or 1e-3, vit_lr=args.vit_lr,
                   seed=args.seed, save_every=args.save_every, log_every=args.log_every, bf16=cpu_bf16_is_fast(),
                   warm_from=start if from_shipped else 0, eval_every=args.eval_every)
    if stage == "align":
        groups = [{"params": proj, "lr": cfg.lr, "name": "projector"}, {"params": vit, "lr": cfg.vit_lr, "name": "vit"}]
    elif widen:
        groups = [{"params": add_lora(base, ASSETS / LORA_WIDE_DIR if args.resume else None, spec=LORA_WIDE),
                   "lr": cfg.lr, "name": "lora"}]
    else:
        lora = add_lora(base, ASSETS / LORA_DIR if args.resume else None)
        groups = [{"params": lora, "lr": cfg.lr, "name": "lora"},
                  {"params": proj, "lr": cfg.projector_lr, "name": "projector"},
                  {"params": vit, "lr": cfg.vit_lr, "name": "vit"}]
    curve = CurveMirror(stage, out, args.resume)

    def ship(step: int, done: bool = False, **info) -> None:
        if widen:
            save_lora(base, name=LORA_WIDE_DIR)
        else:
            save_vision_parts(base)
        if stage == "finetune":
            save_lora(base)
        write_state(stage, step=step, target_steps=args.steps, done=done, **info)
        curve.sync()

    best = {"score": -1.0}

    def validate(step: int) -> dict:
        if wide:   # plain and reworded/restyled val, counting apart; the best checkpoint kept in runs/
            ev = evaluate_wide(base, tok, args.eval_n, args.eval_n)
            tqdm.write(f"[{stage} {step}] val plain {ev['plain']:.3f} wide {ev['wide']:.3f} counting "
                       f"{ev['plain_counting']:.3f} / {ev['wide_counting']:.3f}")
            if ev["score"] > best["score"]:
                best.update(ev, step=step)
                if widen:
                    save_lora(base, folder=out / "best", name=LORA_WIDE_DIR)
                else:
                    save_vision_parts(base, folder=out / "best")
                    save_lora(base, folder=out / "best")
                (out / "best" / "val.json").write_text(json.dumps(best, indent=1))
            return {"val_exact_match": ev["score"], "val": {k: v for k, v in ev.items() if k != "score"}}
        ev = evaluate(base, tok, args.eval_n)
        tqdm.write(f"[{stage} {step}] val exact match {ev['exact_match']:.3f} {ev['per_qtype']}")
        return {"val_exact_match": ev["exact_match"], "val_n": ev["n"], "val_per_qtype": ev["per_qtype"]}

    objective = LMObjective(base, groups, cfg, stage, validate, ship)
    data = PixelConversations(pv, samples)
    if args.count_boost:   # more counting: samples with a counting turn appear 1 + count_boost times
        from torch.utils.data import Subset
        counting = [i for i, s in enumerate(samples) if any(t.qtype in COUNTING for t in s.turns)]
        data = Subset(data, list(range(len(samples))) + counting * args.count_boost)
    fit(base, objective, LMCollator(encoder), data, cfg, out, resume=args.resume)
    step = max(objective.done, start)
    ev = evaluate(base, tok, args.final_eval_n)
    ship(step, done=True, val_exact_match=ev["exact_match"], val_n=ev["n"], val_per_qtype=ev["per_qtype"])
    log_row(stage, {"step": step, "final_val_exact_match": ev["exact_match"], "val_n": ev["n"],
                    "val_per_qtype": ev["per_qtype"], "examples": ev["examples"]})   # after the curve's last sync
    print(f"{stage} val:", json.dumps(ev, indent=1))
