"""Adapter fidelity: how good was the adapter that stood in for each skipped layer?

    f = adapter_fidelity(pipe, image, question, history, route=turn.trace.route)
    f.adapter_l1[i], f.adapter_cos[i]     # layer i's adapter against the real layer, on the same input
    f.twin_l1[i]                          # the routed stream against the dense twin after layer i
    f.kl_next_token, f.top1_agree         # the final next-token distributions of both runs

One prefill of the prompt under the route (the path the answer took): at every layer both the layer
and its adapter run on the routed stream's input, and the one the route chose goes on, so a skipped
layer's distances are exactly the adapter's error at that point (a layer that ran has distance 0).
Beside it the dense twin (every layer) runs the same prompt. Distances are over the prompt's real
tokens: L1 is the mean over tokens of mean_j |a - b|_j (the paper's Fig. 1 measure), cosine the mean
over tokens. KL is KL(dense || routed) of the next-token distributions at the last position, in nats.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..systems.pipeline import History
from ..systems.roe import RoEPipeline, forced_route, layer_l1, layout_batch


@dataclass
class Fidelity:
    route: list[bool]
    adapter_l1: list[float]        # per layer: |adapter(h) - layer(h)| on the routed input (0 where the layer ran)
    adapter_cos: list[float]       # cosine(adapter(h), layer(h)) (1 where the layer ran)
    layer_l1: list[float]          # |layer(h) - h|: how much the real layer would change h (for scale)
    twin_l1: list[float]           # per layer: |h_routed - h_dense| after the layer
    twin_cos: list[float]
    kl_next_token: float           # KL(dense || routed) at the last prompt position, nats
    top1_agree: bool               # the same first answer token

    def to_dict(self) -> dict:
        return asdict(self)


def _cos(a: Tensor, b: Tensor, ok: Tensor) -> float:
    c = F.cosine_similarity(a.float(), b.float(), dim=-1)[ok]
    return float(c.mean()) if c.numel() else 1.0


@torch.inference_mode()
def adapter_fidelity(pipe: RoEPipeline, image, question: str, history: History = (), route="auto",
                     threshold: float | None = None, between_layers=None) -> Fidelity:
    """route: "auto" (the router decides, at `threshold`) or the route a turn took (booleans per layer).
    between_layers() is called after each layer (a server's checkpoint)."""
    model = pipe.model
    x = layout_batch(model, pipe.batch([(image, question, history)]))
    R, L = x.num_routing, model.num_layers
    thr = model.threshold_or(threshold)
    forced = forced_route(route, 1, L, x.embeds.device)
    ok = x.token_ok[0]                                     # real (not padding) ordinary tokens
    pos_emb = model.rotary(x.embeds, x.position_ids)
    h, h_dense = x.embeds, x.embeds
    taken, a_l1, a_cos, l_l1, t_l1, t_cos = [], [], [], [], [], []
    for i in range(L):
        run = bool(model.decide(i, h, R, thr, forced)[0][0])
        real = model.run_layer(i, h, x.mask, pos_emb, None)
        adapted = model.adapters[i](h)
        l_l1.append(float(layer_l1(real, h, x.token_ok, R)[0]))           # the paper's Fig. 1 measure
        a_l1.append(0.0 if run else float(layer_l1(adapted, real, x.token_ok, R)[0]))
        a_cos.append(1.0 if run else _cos(adapted[0, R:], real[0, R:], ok))
        h = real if run else adapted
        h_dense = model.run_layer(i, h_dense, x.mask, pos_emb, None)
        t_l1.append(float(layer_l1(h, h_dense, x.token_ok, R)[0]))
        t_cos.append(_cos(h[0, R:], h_dense[0, R:], ok))
        taken.append(run)
        if between_layers is not None:
            between_layers()
    logp = model.final_logits(h[:, -1]).float().log_softmax(-1)
    logq = model.final_logits(h_dense[:, -1]).float().log_softmax(-1)
    kl = float((logq.exp() * (logq - logp)).sum())
    return Fidelity(taken, a_l1, a_cos, l_l1, t_l1, t_cos, max(kl, 0.0), bool(logp.argmax() == logq.argmax()))
