"""Expert statistics of the MoE systems, written once: load per modality, router rigidity, expert-output
similarity, uniformity (shuffled routers), l_aux. The app's figures take the first two from traces;
the benchmark computes all of them.

    shares = modality_shares(traces)            # {"image": (M, E) shares, "text": (M, E)}, each row sums to 1
    rigidity(shares)                            # per MoE layer, JS(image || text) in bits
"""
from __future__ import annotations

import statistics
from typing import Sequence

import torch

from ..scenes.questions import Question
from .evaluate import evaluate, teacher_forced

MODALITIES = ("image", "text")          # "text": every token that is not an image token (answers included)


def modality_load(traces: Sequence) -> dict[str, torch.Tensor]:
    """{"image": (M, E), "text": (M, E)} top-1 assignment counts summed over ExpertTraces."""
    return {"image": sum(t.top1_load(kind="image") for t in traces).float(),
            "text": sum(t.top1_load(exclude="image") for t in traces).float()}


def modality_shares(traces: Sequence) -> dict[str, list[list[float]]]:
    """Per MoE layer, the share of image tokens and of text tokens whose top-1 is each expert. Each
    modality sums to 1 per layer, so both weigh the same whatever their token counts."""
    return {k: (v / v.sum(1, keepdim=True).clamp(min=1)).tolist() for k, v in modality_load(traces).items()}


def js_divergence(p, q) -> float:
    """Jensen-Shannon divergence (bits, 0 = the same, 1 = disjoint) of two distributions (sequences or
    tensors): how differently two groups of tokens (image, text) are spread over the experts."""
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    m = (p + q) / 2

    def kl(a, b):
        keep = a > 0
        return float((a[keep] * (a[keep] / b[keep]).log2()).sum())
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def rigidity(shares: dict[str, list[list[float]]]) -> list[float]:
    """Per MoE layer, JS(image shares || text shares): 0 = the router sends both modalities alike."""
    return [js_divergence(p, q) for p, q in zip(shares["image"], shares["text"])]


def expert_stats(pipe, qs: list[Question], traces, n_aux: int = 64) -> dict:
    """An MoE system's routing on evaluated questions: per MoE layer the top-1 expert shares of image and
    of text tokens, their divergence ("router rigidity"), and l_aux per layer on a teacher-forced pass
    over the first n_aux questions with their gold answers (balanced = 1.0 per layer; the loss sums them)."""
    model = pipe.model
    shares = modality_shares(traces)
    aux = []
    with torch.inference_mode():
        for b in teacher_forced(pipe, qs[:n_aux]):
            out = model(b.input_ids, b.token_ok, b.pixel_values, logits_at=torch.zeros_like(b.token_ok))
            aux.append(torch.stack([g.l_aux for g in out.gates]))
    per_layer = torch.stack(aux).mean(0).tolist()
    return {"moe_layers": list(model.moe_layers), "num_experts": model.config.num_experts,
            "expert_load": shares, "rigidity_js_per_layer": rigidity(shares),
            "l_aux_per_layer": per_layer, "l_aux_sum": sum(per_layer), "l_aux_balanced_sum": len(per_layer)}


def expert_similarity(pipe, qs: list[Question], n: int = 16) -> list[float]:
    """Per MoE layer, the mean pairwise cosine similarity of the experts' outputs on the same tokens
    (the layer's real inputs on n teacher-forced questions): 1.0 = the experts compute the same thing."""
    model = pipe.model
    inputs = {i: [] for i in model.moe_layers}
    hooks = [model.moe[str(i)].register_forward_hook(
        lambda mod, args, out, i=i: inputs[i].append(args[0][args[1]].detach() if len(args) > 1 and args[1] is not None
                                                     else args[0].reshape(-1, args[0].shape[-1]).detach()))
        for i in model.moe_layers]
    try:
        with torch.inference_mode():
            for b in teacher_forced(pipe, qs[:n]):
                model(b.input_ids, b.token_ok, b.pixel_values, logits_at=torch.zeros_like(b.token_ok))
    finally:
        for h in hooks:
            h.remove()
    sims = []
    with torch.inference_mode():
        for i in model.moe_layers:
            x = torch.cat(inputs[i])[:2048]
            outs = [e(x).float() for e in model.moe[str(i)].experts]
            pairs = [torch.nn.functional.cosine_similarity(outs[a], outs[b], dim=-1).mean()
                     for a in range(len(outs)) for b in range(a + 1, len(outs))]
            sims.append(float(torch.stack(pairs).mean()))
    return sims


def uniformity(pipe, qs: list[Question], ok: list[bool], batch_size: int, max_new_tokens: int,
               seed: int = 0) -> dict:
    """EvoMoE's "expert uniformity" probe: accuracy with every MoE layer's router scores shuffled per
    token at eval, beside the unshuffled accuracy on the same questions."""
    pipe.model.shuffle_routers(seed)
    try:
        _, shuffled, _ = evaluate(pipe, qs, batch_size, max_new_tokens)
    finally:
        pipe.model.shuffle_routers(None)
    return {"n": len(qs), "accuracy": statistics.mean(ok[:len(qs)]) if qs else None,
            "accuracy_shuffled_routers": statistics.mean(shuffled) if qs else None}
