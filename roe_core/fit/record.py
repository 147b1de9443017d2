"""The fit's passes over the calibration inputs, each resumable from its cache on disk.

    dense_pass(model, encoder, items, ...)    -> DensePass: the dense answers, per example the routers' inputs
                                                 and Fig. 1's L1 per layer, and (record=True) the layers'
                                                 normal equations (standins.Moments)
    evidence_pass(model, encoder, items, answers, ...) -> per example and layer: the first-order change
                                                 of the dense answer's log-likelihood when that layer alone is
                                                 replaced by its stand-in ("taylor"), and the stand-in's
                                                 relative error on that example's tokens ("residual")

The dense pass is one greedy generation per batch (RoE's every-layer path); forward hooks on the decoder
layers read each layer's input and output at prefill, so the normal equations, the router inputs and
the L1 come at no extra forward. Generated tokens are not recorded (a handful per answer beside ~100
prompt tokens).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..systems.roe import RoEModel, generate, layer_l1, layout_batch
from .standins import Moments, rms_normalise

Progress = Callable[[str, int, int], None] | None


@dataclass
class DensePass:
    answers: list[str] = field(default_factory=list)
    feats: list[Tensor] = field(default_factory=list)     # per batch (B, L, 2d) bf16: what each router reads
    l1: list[Tensor] = field(default_factory=list)        # per batch (B, L) fp32

    @property
    def n(self) -> int:
        return len(self.answers)

    def features(self) -> Tensor:
        return torch.cat(self.feats) if self.feats else torch.zeros(0)

    def l1_all(self) -> Tensor:
        return torch.cat(self.l1) if self.l1 else torch.zeros(0)


class _Recorder:
    """Forward hooks on every decoder layer, armed for one prefill at a time."""

    def __init__(self, model: RoEModel, moments: Moments | None):
        self.model, self.moments = model, moments
        self.eps = model.layers[0].input_layernorm.variance_epsilon if hasattr(
            model.layers[0].input_layernorm, "variance_epsilon") else 1e-6
        self.rows: Tensor | None = None          # (B, R+S) bool: real positions of the prefill
        self.token_ok: Tensor | None = None
        self.R = 0
        self.feats: list[Tensor | None] = []
        self.l1: list[Tensor | None] = []
        self.hooks = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(model.layers)]

    def arm(self, batch, device) -> None:
        token_ok = batch.token_ok.to(device)
        B = token_ok.shape[0]
        self.R = 1 + batch.question_keys.shape[1]            # the image routing token + one per turn
        self.rows = torch.cat([torch.ones(B, self.R, dtype=torch.bool, device=device), token_ok], 1)
        self.token_ok = token_ok
        self.feats = [None] * len(self.hooks)
        self.l1 = [None] * len(self.hooks)

    def _hook(self, i: int):
        def hook(module, args, output):
            h_in = args[0] if args else None
            if self.rows is None or h_in is None or h_in.shape[1] != self.rows.shape[1]:
                return None                                   # a decode step, or not armed
            h_out = output[0] if isinstance(output, tuple) else output
            rt = module.input_layernorm(h_in[:, :self.R])
            self.feats[i] = torch.cat([rt[:, 0], rt[:, -1]], -1).to(torch.bfloat16).cpu()
            self.l1[i] = layer_l1(h_out, h_in, self.token_ok, self.R).float().cpu()
            if self.moments is not None:
                n = rms_normalise(h_in[self.rows], self.eps)
                self.moments.add(i, n, (h_out[self.rows].float() - h_in[self.rows].float()))
            return None
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _save_dense(cache: Path, res: DensePass, moments: Moments | None, key: str) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    if moments is not None:
        moments.save(cache / "moments.safetensors")
    save_file({"feats": res.features().contiguous(), "l1": res.l1_all().contiguous()}, str(cache / "dense.tmp"))
    (cache / "dense.tmp").replace(cache / "dense.safetensors")
    (cache / "dense.json").write_text(json.dumps({"key": key, "n_done": res.n, "answers": res.answers}))


def _load_dense(cache: Path, key: str, record: bool, device) -> tuple[DensePass, Moments | None] | None:
    meta = cache / "dense.json"
    if not meta.is_file():
        return None
    m = json.loads(meta.read_text())
    if m.get("key") != key or (record and not (cache / "moments.safetensors").is_file()):
        return None
    t = load_file(str(cache / "dense.safetensors"))
    res = DensePass(m["answers"], [t["feats"]] if m["n_done"] else [], [t["l1"]] if m["n_done"] else [])
    return res, (Moments.load(cache / "moments.safetensors", device) if record else None)


@torch.inference_mode()
def dense_pass(model: RoEModel, encoder, items, batch_size: int, max_new_tokens: int, record: bool,
               cache: Path | None, key: str, progress: Progress = None, checkpoint=None, stage: str = "dense",
               save_every_s: float = 60.0) -> tuple[DensePass, Moments | None]:
    """Dense answers (and what the hooks read) for items [(image, question)], in batches; resumes from
    `cache` when it holds a pass with the same key. record: also the normal equations."""
    dev = next(model.parameters()).device
    got = _load_dense(cache, key, record, dev) if cache is not None else None
    res, moments = got if got is not None else (DensePass(), None)
    if record and moments is None:
        moments = Moments(model.num_layers, model.config.hidden_size, dev)
    rec = _Recorder(model, moments)
    last = time.monotonic()
    try:
        for start in range(res.n, len(items), batch_size):
            if progress is not None:
                progress(stage, start, len(items))
            if checkpoint is not None:
                try:
                    checkpoint()
                except BaseException:               # cancelled between batches: keep what is done
                    if cache is not None:
                        _save_dense(cache, res, moments, key)
                    raise
            chunk = items[start:start + batch_size]
            convs = [encoder.encode([(q, None)], has_image=True) for _, q in chunk]
            batch = encoder.collate(convs, [im for im, _ in chunk], last_turn_only=True)
            rec.arm(batch, dev)
            gen = generate(model, batch, "dense", max_new_tokens, encoder.stop_ids)
            rec.rows = None
            res.answers += [encoder.tokenizer.decode(t, skip_special_tokens=True).strip() for t in gen.tokens]
            res.feats.append(torch.stack(rec.feats, 1))
            res.l1.append(torch.stack(rec.l1, 1))
            if cache is not None and time.monotonic() - last > save_every_s:
                _save_dense(cache, res, moments, key)
                last = time.monotonic()
    finally:
        rec.close()
    if cache is not None:
        _save_dense(cache, res, moments, key)
    if progress is not None:
        progress(stage, len(items), len(items))
    return res, moments


def evidence_pass(model: RoEModel, encoder, items, answers: list[str], batch_size: int, cache: Path | None,
                  key: str, progress: Progress = None, checkpoint=None) -> dict[str, Tensor]:
    """Per example and layer (n, L): "taylor" = |g . e| summed over the example's tokens, g the gradient of
    the dense answer's log-likelihood (teacher forced) at the layer's output and e = stand-in(h) - layer(h)
    (the first-order change when that layer alone is skipped); "residual" = ||e||^2 / ||layer(h) - h||^2.
    The model's adapters must hold the stand-ins."""
    out = {"taylor": [], "residual": []}
    path = cache / "evidence.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        t = load_file(str(path))
        meta = json.loads((cache / "evidence.json").read_text())
        if meta.get("key") == key:
            out = {k: [t[k]] for k in out if t[k].numel()}
            out = {k: out.get(k, []) for k in ("taylor", "residual")}
    done = sum(x.shape[0] for x in out["taylor"])
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    last = time.monotonic()
    try:
        for start in range(done, len(items), batch_size):
            if progress is not None:
                progress("evidence", start, len(items))
            if checkpoint is not None:
                try:
                    checkpoint()
                except BaseException:
                    if path is not None:
                        _save_evidence(cache, out, key)
                    raise
            chunk = items[start:start + batch_size]
            convs = [encoder.encode([(q, a)], has_image=True) for (_, q), a in zip(chunk, answers[start:start + batch_size])]
            batch = encoder.collate(convs, [im for im, _ in chunk], last_turn_only=True)
            t, r = _evidence_batch(model, batch)
            out["taylor"].append(t)
            out["residual"].append(r)
            if path is not None and time.monotonic() - last > 60:
                _save_evidence(cache, out, key)
                last = time.monotonic()
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    if path is not None:
        _save_evidence(cache, out, key)
    if progress is not None:
        progress("evidence", len(items), len(items))
    return {k: torch.cat(v) if v else torch.zeros(0, model.num_layers) for k, v in out.items()}


def _save_evidence(cache: Path, out: dict, key: str) -> None:
    save_file({k: (torch.cat(v) if v else torch.zeros(0)).contiguous() for k, v in out.items()},
              str(cache / "evidence.tmp"))
    (cache / "evidence.tmp").replace(cache / "evidence.safetensors")
    (cache / "evidence.json").write_text(json.dumps({"key": key}))


def _evidence_batch(model: RoEModel, batch) -> tuple[Tensor, Tensor]:
    x = layout_batch(model, batch)
    b = batch.to(x.embeds.device)
    R = x.num_routing
    rows = torch.cat([torch.ones_like(x.token_ok[:, :R]), x.token_ok], 1).float()       # (B, R+S)
    target = b.answer_mask[:, 1:]                                                      # (B, S-1)
    at = torch.nn.functional.pad(target, (0, 1))                                      # predicting positions
    pos_emb = model.rotary(x.embeds, x.position_ids)
    h = x.embeds.detach().requires_grad_(True)
    outs, errs, moved = [], [], []
    with torch.enable_grad():
        for i in range(model.num_layers):
            h_in = h
            h = model.run_layer(i, h_in, x.mask, pos_emb, None)
            h.retain_grad()
            with torch.no_grad():
                e = (model.adapters[i](h_in) - h).float()
                errs.append(e)
                moved.append(((h - h_in).float().pow(2).sum(-1) * rows).sum(-1))       # (B,)
            outs.append(h)
        logits = model.final_logits(h[:, R:][at]).float()
        logp = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:][target][:, None]).sum()
        logp.backward()
    taylor, resid = [], []
    for i in range(model.num_layers):
        g = outs[i].grad.float()
        taylor.append(((g * errs[i]).sum(-1) * rows).sum(-1).abs())
        resid.append((errs[i].pow(2).sum(-1) * rows).sum(-1) / moved[i].clamp(min=1e-12))
    return torch.stack(taylor, 1).detach().cpu(), torch.stack(resid, 1).detach().cpu()
