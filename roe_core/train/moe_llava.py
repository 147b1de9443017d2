"""MoE-LLaVA's stage III, "MoE-tuning" (MOE_METHODS.md), on the shared loop.

Starting from a dense LLaVA (stages I-II done), the FFN of every other decoder layer is upcycled into
E experts (exact copies) with a top-2 router; then every FFN (experts and the dense FFNs of the other
layers) and the routers train, attention, embeddings, vision tower and projector frozen, on
CE + 0.01 x the sum over MoE layers of l_aux, with a cosine learning rate after a 3% warm-up.

    python -m roe_core.train --system moe_llava --model <llava> --data train.json --out runs/moe
    accelerate launch -m roe_core.train --system moe_llava ...      (several processes)

With `expert_delta_rank` / `dense_delta_rank` r > 0 each trained FFN is its upcycled weights (frozen)
plus a trained rank-r delta per projection, so the checkpoint holds routers + deltas only (the
embedded model ships this way to fit the size budget).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..runtime.weights import load_tensors
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..runtime.conversation import ConversationEncoder
from ..systems.moe_llava import MoELlavaModel, moe_lm_loss
from .loop import LoopConfig, TrainableParts, add_config_args, config_from_args, fit


@dataclass
class MoETuneConfig(LoopConfig):
    lr: float = 2e-5                 # the method's, for full FFN weights; rank-r deltas want more (the embedded recipe: 5e-4)
    warmup: float = 0.03             # fraction of steps, then cosine to 0


class PartsObjective(TrainableParts):
    """An MoE system's stage: its set of parameters trains (loop.TrainableParts), loss CE + coef x the sum
    of l_aux, the system's own checkpoint files."""
    desc = "MoE training"

    def __init__(self, model: MoELlavaModel, cfg, params: list):
        ids = {id(p) for p in params}
        stored = set(model.moe_state_dict())
        # trained tensors the MoE checkpoint does not hold (full-weight dense FFNs of the base)
        super().__init__(cfg, model, params,
                         [n for n, p in model.named_parameters() if id(p) in ids and n not in stored])

    def loss(self, model: MoELlavaModel, batch, step: int) -> dict[str, Tensor]:
        return moe_lm_loss(model, batch)

    def save_parts(self, model: MoELlavaModel, out: Path) -> None:
        model.save_moe(out)

    def load_parts(self, model: MoELlavaModel, out: Path) -> None:
        model.load_state_dict(load_tensors(out / model.config.WEIGHTS), strict=False)

    def part_names(self, model: MoELlavaModel) -> list[str]:
        return list(model.moe_state_dict())

    def fsdp_units(self, model: MoELlavaModel) -> list[list[nn.Module]]:
        """One FSDP unit per decoder layer holding what MoELlavaModel.layer calls: the input norm, the
        attention, the post-attention norm and the FFN that runs there (the MoE, a delta-stored dense FFN,
        or the base's). A base FFN that no longer runs gets a unit of its own, never gathered."""
        units = []
        for i, layer in enumerate(model.layers):
            ffn = model.moe[str(i)] if str(i) in model.moe else model.dense_ffn[str(i)] if str(i) in model.dense_ffn \
                else layer.mlp
            units.append([layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, ffn])
            if ffn is not layer.mlp:
                units.append([layer.mlp])
        return units

    def checkpointed(self, model: MoELlavaModel) -> list[nn.Module]:
        """Activation checkpointing: the attention and the FFN of each layer (MoELlavaModel.layer calls
        them one by one, never the decoder layer whole)."""
        return [m for u in self.fsdp_units(model) if len(u) == 4 for m in (u[1], u[3])]


class MoETuneObjective(PartsObjective):
    """MoE-tuning: the FFNs (experts, dense FFNs of the other layers) and routers train, nothing else."""
    desc = "MoE-tuning"

    def __init__(self, model: MoELlavaModel, cfg: MoETuneConfig):
        super().__init__(model, cfg, model.ffn_parameters())


def train_moe_llava(model: MoELlavaModel, encoder: ConversationEncoder, dataset: Dataset, cfg: MoETuneConfig,
                    out: str | Path, resume: bool = False, progress: bool = True) -> list[dict]:
    """MoE-tunes `model` in place (loop.fit); returns the learning curve. Checkpoints in `out`:
    moe_config.json + moe.safetensors, backbone.safetensors (full-weight dense FFNs, if they train),
    optimizer.safetensors + trainer_state.json."""
    model.config.extra.setdefault("moe_tuning", asdict(cfg))
    return fit(model, MoETuneObjective(model, cfg), encoder, dataset, cfg, out, resume, progress)


def main(argv=None) -> None:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m roe_core.train --system moe_llava", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="embedded | tiny | local LLaVA folder | hub id (the dense model)")
    ap.add_argument("--data", required=True, help="LLaVA conversation JSON")
    ap.add_argument("--images", default=None, help="image folder (default: the JSON's folder)")
    ap.add_argument("--out", required=True, help="output folder (checkpoints, train_log.jsonl)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ap.add_argument("--num-experts", type=int, default=4)
    ap.add_argument("--moe-layers", default=None, help="comma-separated layer indices (default: 0, 2, 4, ...)")
    ap.add_argument("--expert-delta-rank", type=int, default=0,
                    help="r > 0: experts train rank-r deltas over the upcycled FFN (small checkpoints)")
    ap.add_argument("--dense-delta-rank", type=int, default=0,
                    help="r > 0: the other layers' FFNs train rank-r deltas, stored with the MoE parts; "
                         "0: their full weights train and are saved in backbone.safetensors")
    add_config_args(ap, MoETuneConfig)
    args = ap.parse_args(argv)
    cfg = config_from_args(MoETuneConfig, args)

    from ..systems.pipeline import Pipeline, load_base
    from .loop import LlavaJsonDataset, train_device
    loaded = load_base(args.model, train_device(), "float32")
    layers = [int(x) for x in args.moe_layers.split(",")] if args.moe_layers else []
    model = MoELlavaModel(loaded.base, base_model=args.model, num_experts=args.num_experts, moe_layers=layers,
                          expert_delta_rank=args.expert_delta_rank, dense_delta_rank=args.dense_delta_rank)
    model.config.extra.update(train_data=str(args.data))
    train_moe_llava(model, Pipeline.make_encoder(loaded), LlavaJsonDataset(args.data, args.images), cfg, args.out,
                    resume=args.resume)
    print(f"saved MoE-LLaVA parts to {args.out}")
