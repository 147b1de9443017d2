"""The training loop every routing system shares (RoE, MoE-LLaVA, ...), on `accelerate`.

    fit(model, objective, encoder, dataset, cfg, out, resume=False)

A system brings an `Objective`: which parameters train at which step (and at what learning rate),
its loss on a collated batch, and how its own parts are saved and loaded. The loop does the rest
the same way for all of them: data order, autocast, clipping, the learning-rate schedule, resumable
checkpoints and the learning curve (train_log.jsonl, a row every log_every steps).

One process, or several under `accelerate launch` (configs/ in the repository, docs/distributed.md):

    one process   the objective's loss is the forward of `ObjectiveModule(model, objective)`, the module
                  accelerate prepares
    DDP           the same module, wrapped by accelerate: DDP's hooks average the gradients
                  (find_unused_parameters: an MoE expert no token of a process reached, a stage's frozen parts)
    FSDP (FSDP2)  the same module, sharded by `shard_for_fsdp`: one unit per decoder layer holding the
                  modules the system calls at that layer (the objective's `fsdp_units`: RoE's layer with
                  its router and adapter, ...), one per vision layer, the projector, the embeddings,
                  [final norm, LM head]; the rest (routing tokens, ...) in the root

Checkpoints (safetensors + JSON, except the sharded AdamW state): the system's parts (its own files),
the trained base tensors (backbone.safetensors), trainer_state.json, and AdamW's moments:
optimizer.safetensors (one process, DDP) or optimizer/ (FSDP: each process writes its shards with
torch.distributed.checkpoint, as accelerate saves an FSDP optimizer). Under FSDP the parts and base
tensors are gathered and written by the main process, so any checkpoint resumes on any number of
processes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..runtime.conversation import IMAGE_PLACEHOLDER, ConversationEncoder
from ..runtime.images import load_image


class Objective(Protocol):
    """What one system's training needs beyond the shared loop."""
    desc: str                                                   # progress-bar label

    def param_groups(self, model: nn.Module) -> list[dict]: ...     # AdamW groups {"params", "lr"}

    def set_trainable(self, model: nn.Module, step: int) -> None: ...

    def loss(self, model: nn.Module, batch, step: int) -> dict[str, Tensor]: ...   # "loss" + logged stats

    def lr_factor(self, step: int) -> float: ...                # multiplies every group's LR

    def save_parts(self, model: nn.Module, out: Path) -> None: ...

    def load_parts(self, model: nn.Module, out: Path) -> None: ...

    def base_tensors(self, model: nn.Module) -> list[str]: ...  # names of trained tensors the parts do not hold

    def row(self, step: int) -> dict: ...                       # extra learning-curve fields of a step

    # optional:
    #   after_step(model, step)      runs after every optimizer step (e.g. EvoMoE's expert evolution)
    #   part_names(model)            the state-dict entries save_parts writes (FSDP gathers only those)
    #   fsdp_units(model)            [[modules of one FSDP unit], ...] for the decoder layers (default:
    #                                each decoder layer, for systems that call the base's layers whole)
    #   checkpointed(model)          modules whose activations are recomputed with activation
    #                                checkpointing (default: the decoder layers)
    # Under FSDP the parameters are replaced by sharded ones: param_groups and set_trainable must look
    # them up on the model they are given (by name), not keep the objects they saw at construction.


@dataclass
class LoopConfig:
    """What the loop itself needs; each system's training config extends it."""
    steps: int = 600
    batch_size: int = 8              # per process: N processes train on N x batch_size per step
    lr: float = 1e-3
    seed: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    save_every: int = 100
    log_every: int = 10
    bf16: bool = False
    activation_checkpointing: bool = False   # recompute decoder layers in backward (docs/distributed.md)


def add_config_args(ap, cls, flags: dict[str, str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """One --option per field of a config dataclass (bool fields in `flags`: store_true with that help)."""
    flags = {"bf16": "bf16 autocast",
             "activation_checkpointing": "recompute each decoder layer's activations in backward (less memory, "
                                         "~1/3 more compute)", **(flags or {})}
    for f in cls.__dataclass_fields__.values():
        if f.name in skip:
            continue
        if f.name in flags:
            ap.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=flags[f.name])
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)


def config_from_args(cls, args):
    return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__})


def train_device() -> str:
    """Where this process builds the model to train: its own GPU under `accelerate launch` (cuda:<local
    rank>), the GPU or the CPU in one process."""
    from accelerate import PartialState
    return str(PartialState(cpu=not torch.cuda.is_available()).device)


def cosine_with_warmup(step: int, steps: int, warmup: float = 0.03) -> float:
    """LR factor: linear warm-up over the first `warmup` of training, then cosine to 0."""
    w = max(1, round(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def named_params(model: nn.Module, names) -> list[nn.Parameter]:
    """The model's parameters of these names, as they are now (sharded ones under FSDP)."""
    named = dict(model.named_parameters())
    return [named[n] for n in names]


class TrainableParts:
    """The shared part of an objective in which one set of parameters trains and nothing else, with a
    cosine learning rate after warm-up (cfg.warmup); a subclass brings the loss and its checkpoint files.
    The parameters are kept by name (they are looked up on the model, so FSDP's sharded ones are found).
    base_names: trained tensors its own checkpoint does not hold (saved in backbone.safetensors)."""
    desc = "training"

    def __init__(self, cfg, model: nn.Module, params: list, base_names: list[str] = ()):
        ids = {id(p) for p in params}
        self.cfg = cfg
        self.names = [n for n, p in model.named_parameters() if id(p) in ids]
        self.base_names = list(base_names)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": named_params(model, self.names), "lr": self.cfg.lr}]

    def set_trainable(self, model: nn.Module, step: int) -> None:
        params = named_params(model, self.names)
        if step == 0 or not params[0].requires_grad:
            model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)

    def lr_factor(self, step: int) -> float:
        return cosine_with_warmup(step, self.cfg.steps, self.cfg.warmup)

    def row(self, step: int) -> dict:
        return {}

    def base_tensors(self, model: nn.Module) -> list[str]:
        return self.base_names


# --- data ---------------------------------------------------------------------------------------------

class LlavaJsonDataset(Dataset):
    """LLaVA conversation JSON: [{"image": "x.png", "conversations": [{"from": "human", "value":
    "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}, ...]. Records without an image are skipped."""

    def __init__(self, json_path: str | Path, image_folder: str | Path | None = None, max_turns: int = 4):
        records = json.loads(Path(json_path).read_text())
        self.folder = Path(image_folder) if image_folder else Path(json_path).parent
        self.items = []
        for r in records:
            conv = r.get("conversations", [])
            if "image" not in r or len(conv) < 2:
                continue
            turns = []
            for human, gpt in zip(conv[0::2], conv[1::2]):
                if human.get("from") != "human" or gpt.get("from") != "gpt":
                    raise ValueError(f"record {r.get('id')}: turns must alternate human/gpt")
                q = human["value"].replace(IMAGE_PLACEHOLDER, "").strip()
                turns.append((q, gpt["value"].strip()))
            self.items.append((r["image"], turns[:max_turns]))
        if not self.items:
            raise ValueError(f"{json_path}: no usable records (need 'image' and human/gpt 'conversations')")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        image, turns = self.items[i]
        return load_image(self.folder / image), turns


def make_collate(encoder: ConversationEncoder):
    def collate(items):
        images, turns = zip(*items)
        return encoder.collate([encoder.encode(t) for t in turns], list(images))
    return collate


# --- distributed: the module accelerate wraps, FSDP units, activation checkpointing -----------------------

class ObjectiveModule(nn.Module):
    """The system's model with its objective's loss as forward: what the loop hands to
    `accelerator.prepare` (or shards itself), so that DDP's and FSDP's hooks run around the loss. The
    objective reaches into the model (its parts, the base's LM head, ...) from inside this forward,
    never around the wrapper."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective          # not a module: holds no parameters

    def forward(self, batch, step: int) -> dict[str, Tensor]:
        return self.objective.loss(self.model, batch, step)


def has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def layer_modules(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's children that hold parameters (attention, MLP, the two norms). A system that
    calls them one by one (a router reading the input norm, an MoE FFN in the MLP's place) needs them as
    the FSDP unit's modules: FSDP gathers a unit's parameters when one of its modules runs forward."""
    return [c for c in layer.children() if has_params(c)]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base", model)
    return base.model.language_model.layers


def base_units(base: nn.Module) -> list[list[nn.Module]]:
    """The FSDP units of the LLaVA base every system shares, decoder layers aside: each vision encoder
    layer, the projector, the token embeddings, and [final norm, LM head] (with the embeddings if tied)."""
    llava = base.model
    units = []
    vision = getattr(llava, "vision_tower", None)
    if vision is not None:
        for name, m in vision.named_modules():
            if isinstance(m, nn.ModuleList) and name.endswith("layers"):
                units += [[layer] for layer in m if has_params(layer)]
    if getattr(llava, "multi_modal_projector", None) is not None:
        units.append([llava.multi_modal_projector])
    embed, head, norm = base.get_input_embeddings(), base.get_output_embeddings(), llava.language_model.norm
    if head is not None and embed is not None and head.weight is embed.weight:
        units.append([embed, norm, head])
    else:
        units += [[embed], [norm, head]]
    return units


def fsdp_requested(accelerator) -> bool:
    """FSDP was asked for (`accelerate launch --use_fsdp` or a config with distributed_type: FSDP). On
    GPUs accelerate says so; with CPU processes it runs DDP whatever the config says, so the request is
    read from the launcher's environment."""
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def fsdp_settings(accelerator):
    """accelerate's FSDP plugin (from the launch config); FSDP2 only."""
    from accelerate import FullyShardedDataParallelPlugin
    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("the training loop runs FSDP2 only (fully_shard): set fsdp_version: 2 in the accelerate "
                         "config (--fsdp_version 2); FSDP1 cannot change which parameters train between stages")
    return plugin


@torch.no_grad()
def broadcast_from_main(module: nn.Module) -> None:
    """Every process takes the main process's parameters and buffers. DDP does this when it wraps; FSDP
    shards each process's own copy, so the copies must agree first (a fresh router drawn per process
    would not)."""
    import torch.distributed as dist
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def checkpoint_activations(model: nn.Module, objective: Objective) -> list[nn.Module]:
    """Activation checkpointing on the objective's modules (default: the decoder layers), with torch's
    composable `checkpoint` (hooks; parameter names do not change, FSDP2 composes with it)."""
    from torch.distributed._composable import checkpoint
    modules = objective.checkpointed(model) if hasattr(objective, "checkpointed") else list(decoder_layers(model))
    for m in modules:
        checkpoint(m)
    return modules


def shard_for_fsdp(wrapper: ObjectiveModule, objective: Objective, plugin) -> int:
    """FSDP2 in place: the objective's decoder-layer units (each a list of modules gathered together), the
    base's other units, then the root (what is left: routing tokens, vision embeddings, ...). Returns the
    number of units. Trainable parameters a process did not use (an expert no token reached) take part
    in the reduce-scatter with zero gradients, so every process reduces the same tensors."""
    from torch.distributed.fsdp import fully_shard
    model = wrapper.model
    broadcast_from_main(wrapper)
    # No MixedPrecisionPolicy: FSDP gathers and reduces the fp32 weights, autocast computes in bf16 (as in
    # one process). A bf16 gather would fix each unit's gradient dtypes at FSDP's first forward from the
    # parameters trainable then, and stage 2's backbone is not (its bf16 gradients then fail to land)
    kw = dict(offload_policy=plugin.cpu_offload)
    layers = (objective.fsdp_units(model) if hasattr(objective, "fsdp_units")
              else [[layer] for layer in decoder_layers(model)])
    base = getattr(model, "base", model)
    units = [u for u in layers + base_units(base) if u]
    tail = units[-1]
    for unit in units:
        fully_shard(unit if len(unit) > 1 else unit[0], **kw,
                    # the tail runs last in forward and first in backward: gathering it again would wait
                    reshard_after_forward=plugin.reshard_after_forward and unit is not tail)
    fully_shard(wrapper, **kw)
    wrapper.set_reduce_scatter_unused_params(True)
    return len(units) + 1


# --- checkpoints ---------------------------------------------------------------------------------------

def save_optimizer(optimizer, named: dict[str, torch.nn.Parameter], path: Path) -> None:
    """AdamW moments as safetensors (keyed by parameter name), step counts in its metadata."""
    names = {id(p): n for n, p in named.items()}
    tensors, steps = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                n = names[id(p)]
                tensors[f"{n}.exp_avg"] = st["exp_avg"].contiguous().cpu()
                tensors[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous().cpu()
                steps[n] = float(st["step"])
    save_file(tensors, str(path), metadata={"steps": json.dumps(steps)})


def as_param_like(t: Tensor, p: Tensor) -> Tensor:
    """A full tensor laid out like parameter p: p's shard of it under FSDP (every process holds t)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(p, DTensor):
        return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return t.to(p.device)


def step_tensor(optimizer, step, p: Tensor) -> Tensor:
    """AdamW's step count as it keeps it: on the CPU, or on the parameter's device (fused / capturable)."""
    t = torch.as_tensor(step, dtype=torch.float32)
    return t.to(p.device) if optimizer.defaults.get("fused") or optimizer.defaults.get("capturable") else t


def load_optimizer(optimizer, named: dict[str, torch.nn.Parameter], path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        for n, s in json.loads(f.metadata()["steps"]).items():
            p = named[n]
            optimizer.state[p] = {"step": step_tensor(optimizer, s, p),
                                  "exp_avg": as_param_like(f.get_tensor(f"{n}.exp_avg"), p),
                                  "exp_avg_sq": as_param_like(f.get_tensor(f"{n}.exp_avg_sq"), p)}


def save_optimizer_sharded(optimizer, named: dict[str, torch.nn.Parameter], folder: Path) -> None:
    """AdamW moments with torch.distributed.checkpoint: each process writes its own shards (every process
    calls this). Keys: <param>.exp_avg, <param>.exp_avg_sq, <param>.step."""
    import torch.distributed.checkpoint as dcp
    names = {id(p): n for n, p in named.items()}
    state = {}
    for p, st in optimizer.state.items():
        n = names[id(p)]
        state.update({f"{n}.exp_avg": st["exp_avg"], f"{n}.exp_avg_sq": st["exp_avg_sq"], f"{n}.step": st["step"]})
    dcp.save(state, checkpoint_id=str(folder))


def load_optimizer_sharded(optimizer, named: dict[str, torch.nn.Parameter], folder: Path) -> None:
    """save_optimizer_sharded's folder into the optimizer, on any number of processes (one included:
    DCP reshards), sharded like the parameters."""
    import torch.distributed.checkpoint as dcp
    keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    params = {k.rsplit(".", 1)[0] for k in keys}
    target = {}
    for n in params:
        p = named[n]
        target.update({f"{n}.exp_avg": torch.zeros_like(p), f"{n}.exp_avg_sq": torch.zeros_like(p),
                       f"{n}.step": torch.zeros((), dtype=torch.float32)})
    with warnings.catch_warnings():      # one process: "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(target, checkpoint_id=str(folder))
    for n in params:
        p = named[n]
        optimizer.state[p] = {"step": step_tensor(optimizer, target[f"{n}.step"], p),
                              "exp_avg": target[f"{n}.exp_avg"], "exp_avg_sq": target[f"{n}.exp_avg_sq"]}


@contextmanager
def state_view(model: nn.Module, state: dict[str, Tensor]):
    """model.state_dict() returns `state` (gathered full tensors) inside: an objective's save_parts, which
    reads the model's state dict, then writes them rather than the process's shards."""
    model.state_dict = lambda *args, **kwargs: dict(state)
    try:
        yield
    finally:
        del model.state_dict


@torch.no_grad()
def gather_state(model: nn.Module, names: list[str], keep: bool) -> dict[str, Tensor]:
    """Full CPU copies of these state-dict entries (kept where `keep`: the main process). Under FSDP every
    process must call it: each entry is all-gathered in turn, so only one full tensor is in flight."""
    from torch.distributed.tensor import DTensor
    state = model.state_dict()
    out = {}
    for n in names:
        t = state[n]
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[n] = t.detach().cpu().clone()
    return out


OPTIMIZER_FILE, OPTIMIZER_SHARDS = "optimizer.safetensors", "optimizer"


def save_checkpoint(out: Path, model: nn.Module, objective: Objective, optimizer, step: int, config: dict,
                    log_tail: dict, sharded: bool, main: bool) -> None:
    """The system's parts, the trained base tensors (backbone.safetensors), AdamW moments, the step.
    Every process calls it; under FSDP (`sharded`) all take part in gathering and in writing the AdamW
    shards, and the main process writes the rest."""
    base_names = objective.base_tensors(model)
    if sharded:
        import torch.distributed as dist
        parts = objective.part_names(model) if hasattr(objective, "part_names") else list(model.state_dict())
        full = gather_state(model, list(dict.fromkeys(list(parts) + list(base_names))), keep=main)
        if main:
            with state_view(model, full):
                objective.save_parts(model, out)
            if base_names:
                save_file({n: full[n].contiguous() for n in base_names}, str(out / "backbone.safetensors"))
            (out / OPTIMIZER_FILE).unlink(missing_ok=True)
            shutil.rmtree(out / OPTIMIZER_SHARDS, ignore_errors=True)   # files of another process count
        dist.barrier()
        save_optimizer_sharded(optimizer, dict(model.named_parameters()), out / OPTIMIZER_SHARDS)
    elif main:
        objective.save_parts(model, out)
        named = dict(model.named_parameters())
        if base_names:
            save_file({n: named[n].detach().contiguous().cpu() for n in base_names}, str(out / "backbone.safetensors"))
        save_optimizer(optimizer, named, out / OPTIMIZER_FILE)
        shutil.rmtree(out / OPTIMIZER_SHARDS, ignore_errors=True)
    if main:
        state = {"step": step, "config": config, "last": log_tail,
                 "optimizer": OPTIMIZER_SHARDS + "/" if sharded else OPTIMIZER_FILE}
        (out / "trainer_state.json").write_text(json.dumps(state, indent=1))


def load_parameters(out: Path, model: nn.Module, objective: Objective) -> int:
    """The checkpoint's parts and trained base tensors into the (not yet sharded) model; returns its step."""
    state = json.loads((out / "trainer_state.json").read_text())
    objective.load_parts(model, out)
    if (out / "backbone.safetensors").is_file():
        model.load_state_dict(load_file(str(out / "backbone.safetensors")), strict=False)
    return int(state["step"])


def load_optimizer_state(out: Path, model: nn.Module, optimizer) -> None:
    """The checkpoint's AdamW moments, whichever way they were saved, laid out like the model's parameters."""
    named = dict(model.named_parameters())
    saved = json.loads((out / "trainer_state.json").read_text()).get("optimizer", OPTIMIZER_FILE)
    if saved.rstrip("/") == OPTIMIZER_SHARDS:
        load_optimizer_sharded(optimizer, named, out / OPTIMIZER_SHARDS)
    else:
        load_optimizer(optimizer, named, out / OPTIMIZER_FILE)


# --- the loop ------------------------------------------------------------------------------------------

def prepare_model(accelerator, model: nn.Module, objective: Objective, cfg: LoopConfig, sharded: bool
                  ) -> tuple[nn.Module, torch.optim.Optimizer, list[nn.Module]]:
    """The module the loss runs through and its AdamW: `ObjectiveModule(model, objective)` prepared by
    accelerate (one process, DDP) or sharded by `shard_for_fsdp`. Returns (that module, the optimizer,
    the modules whose activations are recomputed)."""
    # DDP registers the parameters that require a gradient when it wraps: every one any stage trains,
    # and no other (the objective's set_trainable then picks each step's)
    model.requires_grad_(False)
    for g in objective.param_groups(model):
        for p in g["params"]:
            p.requires_grad_(True)
    wrapper = ObjectiveModule(model, objective)
    recomputed = checkpoint_activations(model, objective) if cfg.activation_checkpointing else []
    if sharded:
        plugin = fsdp_settings(accelerator)
        plugin.activation_checkpointing = False     # the loop's own (cfg.activation_checkpointing), by module
        shard_for_fsdp(wrapper, objective, plugin)
    groups = [g for g in objective.param_groups(model) if g["params"]]
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for g in groups for p in g["params"]):
        raise TypeError(f"{type(objective).__name__}.param_groups returned parameters that are not the model's "
                        "(under FSDP they are replaced by sharded ones: look them up on the model by name)")
    from torch.distributed.tensor import DTensor
    params = [p for g in groups for p in g["params"]]
    # plain CUDA tensors: the fused kernel (torch's default there, foreach, keeps temporaries the size of all
    # trained parameters: 27 GB more for a 7B backbone on one GPU)
    fused = bool(params) and all(p.is_cuda and not isinstance(p, DTensor) for p in params)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=fused or None)
    for g in optimizer.param_groups:
        g["lr0"] = g["lr"]
    if sharded:
        # sharded above, the same way on GPUs and CPUs (accelerate's own FSDP2 wrapping knows decoder
        # layers, not the modules a system calls at a layer, and runs on accelerators only): accelerate
        # prepares the data alone; the optimizer stays torch's (bf16 needs no gradient scaler)
        return wrapper, optimizer, recomputed
    wrapped, optimizer = accelerator.prepare(wrapper, optimizer)
    return wrapped, optimizer, recomputed


def train_step(accelerator, wrapped: nn.Module, model: nn.Module, objective: Objective, optimizer, batch, step: int,
               max_grad_norm: float = 0.0) -> tuple[dict[str, Tensor], float]:
    """One optimizer step of `objective` on `batch`: the stage's trainable parameters, the learning rate,
    the loss through `wrapped` (the module accelerate prepared or the loop sharded: DDP / FSDP hooks run
    in it and in backward), clipping, AdamW. Returns (the loss dict, the LR factor)."""
    objective.set_trainable(model, step)
    f = objective.lr_factor(step)
    for g in optimizer.param_groups:
        g["lr"] = g["lr0"] * f
    with accelerator.autocast():
        stats = wrapped(batch, step)
    accelerator.backward(stats["loss"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        if p.grad is None:
            # no token reached it (an MoE expert, in every process): a zero gradient, so AdamW steps it as
            # FSDP (which reduce-scatters zeros for it) and DeepSpeed do, in every mode
            p.grad = torch.zeros_like(p)
    if max_grad_norm:
        accelerator.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(objective, "after_step"):
        objective.after_step(model, step)
    return stats, f


def fit(model: nn.Module, objective: Objective, encoder: ConversationEncoder, dataset: Dataset, cfg: LoopConfig,
        out: str | Path, resume: bool = False, progress: bool = True) -> list[dict]:
    """Trains `model` in place with `objective`; returns the learning curve (a dict every log_every
    steps). cfg (a LoopConfig or a system's extension of it) is stored in trainer_state.json. Under FSDP
    the model stays sharded afterwards: the trained weights are in `out`'s checkpoint."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # find_unused_parameters: an MoE expert that no token of this process reached, a frozen stage's parts
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise NotImplementedError("DeepSpeed is not run by this loop (configs/deepspeed_zero3.yaml is untested "
                                  "reference; docs/distributed.md): use FSDP (configs/fsdp8.yaml)")
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    sharded = fsdp_requested(accelerator)
    resuming = resume and (out / "trainer_state.json").is_file()
    start = load_parameters(out, model, objective) if resuming else 0

    wrapped, optimizer, recomputed = prepare_model(accelerator, model, objective, cfg, sharded)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=make_collate(encoder),
                        generator=torch.Generator().manual_seed(cfg.seed), drop_last=len(dataset) > cfg.batch_size)
    loader = accelerator.prepare(loader)
    adamw = getattr(optimizer, "optimizer", optimizer)
    if resuming:
        load_optimizer_state(out, model, adamw)
    wrapped.train()
    epoch_len = len(loader)
    log, history_path = [], out / "train_log.jsonl"
    if start == 0 and main:
        history_path.unlink(missing_ok=True)      # a fresh run starts a fresh learning curve
    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and main), desc=objective.desc,
               dynamic_ncols=True)
    config = {"type": type(cfg).__name__, **asdict(cfg)}
    step, t_last = start, time.perf_counter()
    while step < cfg.steps:
        epoch, skip = divmod(step, epoch_len)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            if step >= cfg.steps:
                break
            stats, f = train_step(accelerator, wrapped, model, objective, optimizer, batch, step, cfg.max_grad_norm)
            step += 1
            bar.update(1)
            # logged: the mean over processes (one process: its own values)
            row = {k: float(accelerator.reduce(v.detach().float(), "mean")) if accelerator.num_processes > 1
                   else float(v.detach()) for k, v in stats.items()}
            row.update(step=step, lr_factor=f, **objective.row(step - 1))
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items()
                             if k != "step" and isinstance(v, (int, float))}, refresh=False)   # not eval dicts
            if step % cfg.log_every == 0 or step == cfg.steps:
                row["s_per_step"] = (time.perf_counter() - t_last) / cfg.log_every
                t_last = time.perf_counter()
                log.append(row)
                if main:
                    with history_path.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
            if step % cfg.save_every == 0 or step == cfg.steps:
                save_checkpoint(out, model, objective, adamw, step, config, row, sharded, main)
    bar.close()
    accelerator.wait_for_everyone()
    wrapped.eval()
    if recomputed:
        from torch.distributed._composable import checkpoint
        for m in recomputed:                  # inference after training runs the modules plainly
            checkpoint.state(m).enable_hook = False
    return log
