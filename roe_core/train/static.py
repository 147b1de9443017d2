"""The fixed-path baseline's training (systems/static.py) on the shared loop.

First the layers are chosen: the k whose output changes their input least over the first --score-n
training examples (Fig. 1's L1, or ShortGPT's 1 - cosine), every layer running. Then the adapters that
stand in for them train on the same data and objective as RoE's refine (CE on answers, optionally +
KL to the every-layer path); the base stays frozen.

    python -m roe_core.train --system static --model <llava> --data train.json --out runs/static --skip 11
    python -m roe_core.train --system static ... --skip-layers 3,4,5      # a hand-picked set instead
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..runtime.conversation import ConversationEncoder
from ..runtime.weights import load_tensors
from ..systems.static import METRICS, WEIGHTS_NAME, StaticModel, layer_scores, lowest, static_lm_loss
from .loop import (LlavaJsonDataset, LoopConfig, TrainableParts, add_config_args, config_from_args, fit, make_collate,
                   train_device)


@dataclass
class StaticTrainConfig(LoopConfig):
    lr: float = 1e-3
    warmup: float = 0.03
    distill: float = 0.0             # weight of KL(p_dense || p_static) on answer tokens


class StaticObjective(TrainableParts):
    """The adapters of the skipped layers train; nothing else (loop.TrainableParts)."""
    desc = "static-path adapters"

    def __init__(self, model: StaticModel, cfg: StaticTrainConfig):
        super().__init__(cfg, model, model.adapter_parameters())

    def loss(self, model: StaticModel, batch, step: int) -> dict[str, Tensor]:
        return static_lm_loss(model, batch, self.cfg.distill)

    def save_parts(self, model: StaticModel, out: Path) -> None:
        model.save_static(out)

    def load_parts(self, model: StaticModel, out: Path) -> None:
        model.load_state_dict(load_tensors(out / WEIGHTS_NAME), strict=False)    # plain or packed

    def part_names(self, model: StaticModel) -> list[str]:
        return list(model.static_state_dict())

    def fsdp_units(self, model: StaticModel) -> list[list[nn.Module]]:
        """Each decoder layer (StaticModel.layer calls it whole), and each skipped layer's adapter."""
        return [[layer] for layer in model.layers] + [[a] for a in model.adapters.values()]


def choose_layers(base, encoder: ConversationEncoder, dataset: Dataset, k: int, metric: str = "l1", n: int = 256,
                  batch_size: int = 16) -> tuple[list[int], list[float]]:
    """(the k layers to skip, the per-layer scores) over the first n examples of `dataset`."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    loader = DataLoader(items, batch_size=batch_size, collate_fn=make_collate(encoder))
    scores = layer_scores(base, loader, metric)
    return lowest(scores, k), scores


def init_from_roe(model: StaticModel, roe_folder: str | Path) -> list[int]:
    """Starts each skipped layer's adapter from the adapter RoE trained to stand in for that layer (the same
    SkipAdapter; ranks must match): the baseline then starts with all that RoE's training gave its
    adapters. Returns the layers initialised."""
    from ..systems.roe import CONFIG_NAME as ROE_CONFIG, WEIGHTS_NAME as ROE_WEIGHTS
    roe_cfg = json.loads(Path(roe_folder, ROE_CONFIG).read_text())
    if roe_cfg["adapter_rank"] != model.config.adapter_rank:
        raise ValueError(f"RoE's adapters have rank {roe_cfg['adapter_rank']}, these {model.config.adapter_rank}")
    state = load_tensors(Path(roe_folder, ROE_WEIGHTS))          # plain or packed (runtime.weights)
    done = []
    for i in model.config.skipped:
        own = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"adapters.{i}.")}
        model.adapters[str(i)].load_state_dict(own)
        done.append(i)
    model.config.extra["init_from_roe"] = str(roe_folder)
    return done


def train_static(model: StaticModel, encoder: ConversationEncoder, dataset: Dataset, cfg: StaticTrainConfig,
                 out: str | Path, resume: bool = False, progress: bool = True) -> list[dict]:
    """Trains the adapters in place (loop.fit); checkpoints in `out`: static_config.json + static.safetensors,
    optimizer.safetensors + trainer_state.json, train_log.jsonl."""
    model.config.extra.setdefault("training", asdict(cfg))
    if not model.config.skipped:
        raise ValueError("no layer is skipped: there is nothing to train (choose k > 0)")
    return fit(model, StaticObjective(model, cfg), encoder, dataset, cfg, out, resume, progress)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m roe_core.train --system static", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="embedded | tiny | local LLaVA folder | hub id")
    ap.add_argument("--data", required=True, help="LLaVA conversation JSON")
    ap.add_argument("--images", default=None, help="image folder (default: the JSON's folder)")
    ap.add_argument("--out", required=True, help="output folder (checkpoints, train_log.jsonl)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    ap.add_argument("--skip", type=int, default=None, help="k: how many layers every input skips")
    ap.add_argument("--skip-layers", default=None, help="comma-separated layers to skip instead of choosing them")
    ap.add_argument("--metric", choices=METRICS, default="l1", help="how the layers are chosen")
    ap.add_argument("--score-n", type=int, default=256, help="training examples the choice is measured on")
    ap.add_argument("--adapter-rank", type=int, default=0,
                    help="0: hidden_size // 4 (RoE's default), or the rank of --init-from-roe's adapters")
    ap.add_argument("--init-from-roe", default=None,
                    help="an RoE parts folder: each skipped layer's adapter starts from RoE's for that layer")
    add_config_args(ap, StaticTrainConfig)
    args = ap.parse_args(argv)
    cfg = config_from_args(StaticTrainConfig, args)

    from ..runtime.sources import load_base
    from ..systems.pipeline import Pipeline
    loaded = load_base(args.model, train_device(), "float32")
    encoder = Pipeline.make_encoder(loaded)
    dataset = LlavaJsonDataset(args.data, args.images)
    if args.resume and (Path(args.out) / "static_config.json").is_file():
        model = StaticModel.from_static_folder(loaded.base, args.out)
    else:
        if args.skip_layers:
            skipped, scores = sorted(int(x) for x in args.skip_layers.split(",")), []
        elif args.skip is not None:
            skipped, scores = choose_layers(loaded.base, encoder, dataset, args.skip, args.metric, args.score_n)
        else:
            ap.error("give --skip K (chosen by --metric) or --skip-layers")
        rank = args.adapter_rank
        if args.init_from_roe and not rank:
            rank = json.loads(Path(args.init_from_roe, "roe_config.json").read_text())["adapter_rank"]
        model = StaticModel(loaded.base, base_model=args.model, skipped=skipped, metric=args.metric,
                            layer_scores=scores, adapter_rank=rank)
        model.config.extra.update(train_data=str(args.data), score_n=args.score_n)
        if args.init_from_roe:
            init_from_roe(model, args.init_from_roe)
        print(f"skipping layers {skipped} ({args.metric})")
    train_static(model, encoder, dataset, cfg, args.out, resume=args.resume)
    print(f"saved the static-path parts to {args.out}")


if __name__ == "__main__":
    main()
