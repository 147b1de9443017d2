"""MoE-LLaVA's MoE-tuning (arXiv 2401.15947) over any Hugging Face LLaVA with a Llama-style decoder.

The base `LlavaForConditionalGeneration` is wrapped, never edited: its decoder layers' pieces (input
norm, self-attention, post-attention norm, rotary embedding, final norm, LM head) are called from
here. In every MoE layer (default 0, 2, 4, ...) the layer's FFN is stood in for by a `MoEFFN`: E
upcycled copies of that FFN and a top-2 router; the other layers call their own `mlp`.

    top2_gating(logits, cf, training)   -> Top2Gating (experts, weights, kept, l_aux, probs)
    MoEFFN(x, token_ok)                 -> (output, Top2Gating)
    MoELlavaModel(input_ids, token_ok)  -> MoEOutput(logits, l_aux summed over MoE layers, gates)
    model.prefill / decode_one_token / generate   greedy decoding with a KV cache, per-example traces
    moe_lm_loss(model, batch)           -> {"loss", "ce", "l_aux"}: CE + coef * sum of l_aux

Checkpoints: moe_config.json + moe.safetensors (routers and experts only; with expert_delta_rank r > 0
the experts are stored as rank-r deltas over the base's own FFN and merged into full weights at load).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..runtime.conversation import Batch
from ..runtime.decoder import DecoderInputs, OverBase, RoutedKVCache, additive_mask, causal_layout, parts_config
from ..runtime.engine import DecodeEngine, LayerProgram, Prefilled
from ..runtime.generation import Timing, greedy
from ..runtime.weights import load_tensors, save_tensors, weights_exist
from .dispatch import GroupedExperts, dispatch, grouped_dispatch, set_sync_free  # noqa: F401  (re-exported)
from .pipeline import LoadedBase, ParamCounts, Pipeline, numel

CONFIG_NAME = "moe_config.json"
WEIGHTS_NAME = "moe.safetensors"


# What ships in assets/ (save_moe(ship=True)); everything else in bf16. Measured on 240 val questions
# (scripts/check_weights_precision.py, assets/embedded/README.md): these choices change no answer.
def ship_keep_fp32(name: str) -> bool:
    """Kept in fp32: MoE-LLaVA's linear routers `moe.<i>.router.weight` (0.14 MB: nothing to gain; the method
    keeps routers fp32). EvoMoE's DTRs (`.router.hyper.*`, `.router.phi.*`) ship in bf16."""
    return name.endswith(".router.weight")


def ship_fp8(name: str) -> bool:
    """Stored as fp8 with per-row bf16 scales: the rank-r delta factors of experts and dense FFNs (`*.delta.*`)."""
    return ".delta." in name


TOKEN_KINDS = ("other", "image", "question", "answer")   # trace kinds; "other": BOS, system prompt, template


@dataclass
class MoELlavaConfig:
    FILE: ClassVar[str] = CONFIG_NAME
    WEIGHTS: ClassVar[str] = WEIGHTS_NAME
    SYSTEM: ClassVar[str] = "MoE-LLaVA"

    base_model: str = ""                  # local folder or hub id of the LLaVA model these parts belong to
    num_layers: int = 0                   # decoder layers of the base model
    hidden_size: int = 0
    moe_layers: list[int] = field(default_factory=list)   # empty: every other layer, 0, 2, 4, ...
    num_experts: int = 4
    top_k: int = 2                        # MoE-LLaVA routes top-2; the only value implemented
    capacity_factor_train: float = 1.5
    capacity_factor_eval: float = 2.0     # E <= 4: C >= tokens, no drops
    aux_loss_coef: float = 0.01           # loss = CE + coef * sum over MoE layers of l_aux
    expert_delta_rank: int = 0            # 0: full expert weights stored; r > 0: rank-r deltas over the base FFN
    dense_delta_rank: int = 0             # r > 0: the non-MoE layers' FFNs are tuned (stage III) as rank-r deltas,
                                          # stored with the MoE parts; 0: they stay the base's own FFNs
    extra: dict = field(default_factory=dict)   # free-form provenance (training data, steps, ...)

    def __post_init__(self):
        if not self.moe_layers and self.num_layers:
            self.moe_layers = list(range(0, self.num_layers, 2))
        self.moe_layers = sorted(int(i) for i in self.moe_layers)

    def save(self, folder: str | Path) -> None:
        Path(folder, self.FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> "MoELlavaConfig":
        path = Path(folder, cls.FILE)
        if not path.is_file():
            raise FileNotFoundError(f"no {cls.FILE} in {folder!s}: not a {cls.SYSTEM} checkpoint folder")
        return cls(**json.loads(path.read_text()))


# --- gating ---------------------------------------------------------------------------------------------

@dataclass
class Top2Gating:
    """One MoE layer's routing of N tokens (padding included, never assigned)."""
    experts: Tensor     # (N, 2) long: [top-1, top-2] expert of each token
    weights: Tensor     # (N, 2) fp32: combine weights after drops, 0 where dropped (and for padding)
    kept: Tensor        # (N, 2) bool: the assignment fit in its expert's capacity (False for padding)
    l_aux: Tensor       # () fp32: E * sum_e mean_prob_e * frac_top1_e over real tokens (balanced = 1)
    probs: Tensor       # (N, E) fp32: softmax of the router logits
    capacity: int       # C, assignments each expert takes


def top2_gating(logits: Tensor, capacity_factor: float, training: bool, noise_generator: torch.Generator | None = None,
                token_mask: Tensor | None = None) -> Top2Gating:
    """MoE-LLaVA's top-2 gating (DeepSpeed's `top2gating`) on router logits (N, E).

    token_mask (N,) bool marks real tokens: padding is neither counted in the capacity nor in l_aux,
    and is never assigned. Capacity C = ceil(tokens / E * cf * 2); each expert's slots go to top-1
    assignments first, then top-2 ones, each in sequence order; an assignment past C is dropped.
    The combine weights renormalise the gate probabilities over the token's *kept* assignments (as
    the reference does): w_k = g_k / (g_1 + g_2) when both are kept; a token whose top-2 was dropped
    gets w_1 = 1; a token with both dropped gets 0 from the MoE (the residual carries it)."""
    N, E = logits.shape
    logits = logits.float()
    probs = logits.softmax(-1)                                           # (N, E)
    real = (torch.ones(N, dtype=torch.bool, device=logits.device) if token_mask is None
            else token_mask.reshape(N).bool())
    first = probs.argmax(-1)                                             # (N,)
    # Expert 2 = the best of the rest. The reference adds Gumbel noise to the logits for this choice
    # even at eval; here only in training, so that evaluation is deterministic.
    scores = logits
    if training:
        u = torch.rand(logits.shape, generator=noise_generator, device=logits.device)
        scores = logits - torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    second = scores.masked_fill(F.one_hot(first, E).bool(), float("-inf")).argmax(-1)
    experts = torch.stack([first, second], 1)                            # (N, 2)

    n_real = N if token_mask is None else int(real.sum())   # no mask: no host sync (CUDA graphs)
    capacity = math.ceil(n_real / E * capacity_factor * 2)
    m1 = F.one_hot(first, E) * real[:, None]                             # (N, E) 0/1
    m2 = F.one_hot(second, E) * real[:, None]
    slot1 = ((m1.cumsum(0) - 1) * m1).sum(-1)                            # (N,) position in the expert's queue
    slot2 = ((m2.cumsum(0) - 1 + m1.sum(0, keepdim=True)) * m2).sum(-1)  # top-2 queue after all top-1s
    kept = real[:, None] & (torch.stack([slot1, slot2], 1) < capacity)   # (N, 2)

    g = probs.gather(1, experts) * kept                                  # (N, 2)
    weights = g / g.sum(-1, keepdim=True).clamp(min=torch.finfo(g.dtype).eps)
    n = max(n_real, 1)
    mean_prob = (probs * real[:, None]).sum(0) / n                       # (E,)
    frac_top1 = m1.sum(0).float() / n                                    # (E,) before drops
    l_aux = E * (mean_prob * frac_top1).sum()
    return Top2Gating(experts, weights, kept, l_aux, probs, capacity)


# --- experts ---------------------------------------------------------------------------------------------

class LowRankDelta(nn.Module):
    """x -> B(A x), B (out, r) starting at zero: a projection's trained change, stored instead of it."""

    def __init__(self, d_in: int, d_out: int, r: int, device=None, dtype=None):
        super().__init__()
        self.a = nn.Parameter(torch.empty(r, d_in, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.a), self.b)

    def weight(self) -> Tensor:
        return self.b @ self.a                                           # (out, in)


class Expert(nn.Module):
    """One SwiGLU FFN, down(act(gate(x)) * up(x)), upcycled: an exact copy of a layer's mlp.

    With delta_rank r > 0 the copied weights are frozen and each projection trains a rank-r delta;
    `merge()` folds the deltas into the weights (done at load), after which they are not applied."""
    PROJ = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, mlp: nn.Module, delta_rank: int = 0):
        super().__init__()
        for name in self.PROJ:
            src: nn.Linear = getattr(mlp, name)
            lin = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None,
                            device=src.weight.device, dtype=src.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(src.weight)
                if src.bias is not None:
                    lin.bias.copy_(src.bias)
            lin.requires_grad_(delta_rank == 0)
            setattr(self, name, lin)
        self.act_fn = copy.deepcopy(mlp.act_fn)
        self.delta_rank = delta_rank
        self.merged = False
        if delta_rank:
            self.delta = nn.ModuleDict({
                name: LowRankDelta(getattr(self, name).in_features, getattr(self, name).out_features, delta_rank,
                                   getattr(self, name).weight.device, getattr(self, name).weight.dtype)
                for name in self.PROJ})

    def proj(self, name: str, x: Tensor) -> Tensor:
        y = getattr(self, name)(x)
        if self.delta_rank and not self.merged:
            y = y + self.delta[name](x)
        return y

    def forward(self, x: Tensor) -> Tensor:                                # (n, d) -> (n, d)
        return self.proj("down_proj", self.act_fn(self.proj("gate_proj", x)) * self.proj("up_proj", x))

    @torch.no_grad()
    def merge(self) -> None:
        if self.delta_rank and not self.merged:
            for name in self.PROJ:
                getattr(self, name).weight.add_(self.delta[name].weight().to(getattr(self, name).weight.dtype))
            self.merged = True


class MoEFFN(GroupedExperts, nn.Module):
    """E experts, each an exact copy of `mlp` at init, and a top-2 router Linear(d -> E) kept in fp32."""

    def __init__(self, mlp: nn.Module, num_experts: int = 4, delta_rank: int = 0,
                 capacity_factor_train: float = 1.5, capacity_factor_eval: float = 2.0):
        super().__init__()
        w = mlp.gate_proj.weight
        d = w.shape[1]
        self.router = nn.Linear(d, num_experts, bias=False, device=w.device, dtype=torch.float32)
        self.experts = nn.ModuleList(Expert(mlp, delta_rank) for _ in range(num_experts))
        self.capacity_factor_train = capacity_factor_train
        self.capacity_factor_eval = capacity_factor_eval
        self.noise_generator: torch.Generator | None = None   # Gumbel noise of training (None: global RNG)
        self.shuffle: torch.Generator | None = None   # set: router logits permuted per token (uniformity probe)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def gate(self, x: Tensor, token_ok: Tensor | None = None) -> Top2Gating:
        """Routing of x (..., d) flattened to N tokens; token_ok (...) bool marks real tokens."""
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat.float(), self.router.weight.float())             # (N, E) fp32 routing
        if self.shuffle is not None:
            logits = shuffle_scores(logits, self.shuffle)
        cf = self.capacity_factor_train if self.training else self.capacity_factor_eval
        mask = None if token_ok is None else token_ok.reshape(-1)
        return top2_gating(logits, cf, self.training, self.noise_generator, mask)

    def forward(self, x: Tensor, token_ok: Tensor | None = None, token_image: Tensor | None = None
                ) -> tuple[Tensor, Top2Gating]:
        """x (..., d) -> (y (..., d), gating over the flattened tokens). Each expert runs once, on the
        tokens assigned to it (gathered), and its weighted outputs are added back (index_add_); on CUDA
        in eval (or with sync_free) as grouped matmuls with no host sync (dispatch.grouped_dispatch).
        token_image is not used: MoE-LLaVA's router sees every token alike."""
        gating = self.gate(x, token_ok)
        return self.run_experts(x, gating), gating


def shuffle_scores(scores: Tensor, generator: torch.Generator) -> Tensor:
    """Each token's router scores in a random order: EvoMoE's "expert uniformity" probe (if the experts
    are alike, shuffling which one a token gets costs nothing)."""
    perm = torch.rand(scores.shape, generator=generator, device="cpu").argsort(-1).to(scores.device)
    return scores.gather(1, perm)


# --- the model -------------------------------------------------------------------------------------------

@dataclass
class MoEOutput:
    logits: Tensor                  # (B, S, V), or (n, V) at `logits_at`
    l_aux: Tensor                   # () sum over MoE layers (a balanced model: about the number of MoE layers)
    gates: list[Top2Gating]         # per MoE layer, over the B*S tokens (padding never assigned)


@dataclass
class ExpertTrace:
    """One example's routing: per MoE layer, per token the model read (prompt without padding, then
    the generated tokens fed back), the two chosen experts and their combine weights."""
    layers: list[int]               # MoE layer indices
    token_ids: Tensor               # (N,) long
    kinds: Tensor                   # (N,) long: index into TOKEN_KINDS
    experts: Tensor                 # (M, N, 2) long, M = len(layers): [top-1, top-2]
    weights: Tensor                 # (M, N, 2) fp32, 0 = dropped
    num_experts: int = 0
    top_k: int = 0
    num_layers: int = 0             # decoder layers (every one runs)
    timing: Timing | None = None    # the batch's generation time (generate only)
    new_tokens: int = 0
    active_params: int = 0
    views: tuple[str, ...] = field(default=("experts",), init=False, repr=False)

    @property
    def layers_executed(self) -> int:
        return self.num_layers

    def summary(self) -> str:
        return (f"all {self.num_layers} layers ran; top-{self.top_k} of {self.num_experts} experts in "
                f"{len(self.layers)} MoE layers")

    def top1_load(self, num_experts: int | None = None, kind: str | None = None, exclude: str | None = None
                  ) -> Tensor:
        """(M, E) top-1 assignment counts per MoE layer, over the tokens of `kind` (all when None), or over
        every token but those of `exclude` ("text" tokens: exclude="image")."""
        top1 = self.experts[..., 0]                                              # (M, N)
        if kind is not None:
            top1 = top1[:, self.kinds == TOKEN_KINDS.index(kind)]
        if exclude is not None:
            top1 = top1[:, self.kinds != TOKEN_KINDS.index(exclude)]
        return F.one_hot(top1, num_experts or self.num_experts).sum(1)           # (M, E)

    def kind_names(self) -> list[str]:
        """Each token's kind: "image", "question", "answer" or "other" (BOS, system prompt, template)."""
        return [TOKEN_KINDS[k] for k in self.kinds.tolist()]

    def to_dict(self) -> dict:
        d = {"layers": self.layers, "token_ids": self.token_ids.tolist(),
             "kinds": [TOKEN_KINDS[k] for k in self.kinds.tolist()],
             "experts": self.experts.tolist(), "weights": self.weights.tolist(), "new_tokens": self.new_tokens,
             "num_experts": self.num_experts, "top_k": self.top_k, "num_layers": self.num_layers,
             "layers_executed": self.num_layers, "active_params": self.active_params}
        if self.timing is not None:
            d["timing"] = self.timing.to_dict()
        return d


@dataclass
class MoEDecodeState:
    cache: RoutedKVCache
    key_ok: Tensor                  # (B, K) bool: keys new tokens may read
    next_pos: Tensor                # (B,) position id of the next token
    prompt_gates: list[Top2Gating]  # per MoE layer over the B*S prompt tokens
    step_gates: list[list[Top2Gating]] = field(default_factory=list)   # per decode step, per MoE layer (B tokens)


@dataclass
class StepGating:
    """One decode step's routing at one MoE layer, as the engine records it (B tokens)."""
    experts: Tensor
    weights: Tensor


@dataclass
class MoEGeneration:
    tokens: list[list[int]]         # generated ids per example (stop token excluded)
    traces: list[ExpertTrace]
    timing: Timing


def token_kinds(batch: Batch, image_token_id: int) -> Tensor:
    """(B, S) long kinds (TOKEN_KINDS) of a collated batch: image slots, question text (the spans in
    batch.question_keys), answer tokens (batch.answer_mask), everything else "other"."""
    kinds = torch.zeros_like(batch.input_ids)
    kinds[batch.input_ids == image_token_id] = TOKEN_KINDS.index("image")
    kinds[batch.question_keys.any(1)] = TOKEN_KINDS.index("question")
    kinds[batch.answer_mask] = TOKEN_KINDS.index("answer")
    return kinds


def moe_loss(ce: Tensor, l_aux_sum: Tensor, coef: float = 0.01) -> Tensor:
    """MoE-LLaVA's total loss: CE + coef * (sum over MoE layers of l_aux)."""
    return ce + coef * l_aux_sum


class MoELlavaModel(OverBase):
    """A LLaVA model whose MoE layers' FFN is a top-2 mixture of upcycled copies of it.

    Other MoE systems over the same machinery (EvoMoE) subclass it: `config_cls`, `check_config` and
    `make_moe_ffn` (an FFN module returning (output, gating) with gating.experts/weights (N, top_k))."""
    config_cls = MoELlavaConfig
    label = "MoE-LLaVA"

    def check_config(self, config) -> None:
        if config.top_k != 2:
            raise ValueError(f"only top-2 routing (MoE-LLaVA's) is implemented, not top_k={config.top_k}")
        if config.num_experts < 2:
            raise ValueError(f"top-2 routing needs at least 2 experts, not {config.num_experts}")

    def make_moe_ffn(self, mlp: nn.Module, config) -> nn.Module:
        return MoEFFN(mlp, config.num_experts, config.expert_delta_rank, config.capacity_factor_train,
                      config.capacity_factor_eval)

    def __init__(self, base: nn.Module, config: MoELlavaConfig | None = None, **overrides):
        super().__init__()
        text_cfg = base.config.text_config
        config = parts_config(base, self.config_cls, config, overrides, "MoE")
        self.check_config(config)
        bad = [i for i in config.moe_layers if not 0 <= i < config.num_layers]
        if bad or len(set(config.moe_layers)) != len(config.moe_layers):
            raise ValueError(f"moe_layers must be distinct indices in [0, {config.num_layers}), "
                             f"got {config.moe_layers}")
        layers = base.model.language_model.layers
        for i in config.moe_layers:
            layer = layers[i]
            parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
            if not all(hasattr(layer, p) for p in parts) or not all(
                    hasattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                raise TypeError(f"decoder layer {i} ({type(layer).__name__}) is not Llama-style: needs {parts} "
                                "and a SwiGLU mlp (gate_proj, up_proj, down_proj, act_fn)")
        impl = getattr(text_cfg, "_attn_implementation", None)
        if impl not in (None, "eager", "sdpa"):
            base.set_attn_implementation("sdpa")   # flash kernels take no arbitrary masks (left padding)
        self.base = base
        self.config = config
        self.moe = nn.ModuleDict({str(i): self.make_moe_ffn(layers[i].mlp, config) for i in config.moe_layers})
        # stage III also tunes the dense FFNs of the other layers; stored as deltas they stand in for
        # the base's FFN (a copy plus a rank-r delta), so the base itself is never edited
        self.dense_ffn = nn.ModuleDict({
            str(i): Expert(layers[i].mlp, config.dense_delta_rank)
            for i in range(config.num_layers) if i not in config.moe_layers and config.dense_delta_rank})

    @property
    def moe_layers(self) -> list[int]:
        return self.config.moe_layers

    # --- checkpoints: only the MoE parts ---
    def moe_state_dict(self) -> dict[str, Tensor]:
        """Routers and experts; with expert_delta_rank > 0 routers and the experts' deltas only (the
        upcycled weights are the base's own FFN)."""
        state = {k: v for k, v in self.state_dict().items() if k.startswith(("moe.", "dense_ffn."))}
        if self.config.expert_delta_rank:   # the experts' upcycled copies are the base's own FFN weights
            state = {k: v for k, v in state.items() if not k.startswith("moe.") or ".experts." not in k
                     or ".delta." in k}
        if self.config.dense_delta_rank:   # the copies are the base's own weights: only the deltas are stored
            state = {k: v for k, v in state.items() if not k.startswith("dense_ffn.") or ".delta." in k}
        return state

    def save_moe(self, folder: str | Path, ship: bool = False) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder)
        # ship=False (checkpoints): fp32, lossless; ship=True (assets/): the shipping precision (runtime.weights)
        save_tensors(self.moe_state_dict(), folder / self.config.WEIGHTS,
                     keep_fp32=ship_keep_fp32 if ship else (lambda name: True), fp8=ship_fp8 if ship else (lambda name: False))

    @classmethod
    def from_moe_folder(cls, base: nn.Module, folder: str | Path, expected_base: str | None = None,
                        materialise: bool = True) -> "MoELlavaModel":
        """Loads moe_config.json + moe.safetensors onto `base`. expected_base: the base_model name the
        parts must name. materialise: merge delta-stored experts into full weights (inference);
        False keeps the deltas separate and trainable."""
        config = cls.config_cls.load(folder)
        if expected_base is not None and config.base_model != expected_base:
            raise ValueError(f"{folder!s} holds MoE parts made for base model {config.base_model!r}, "
                             f"not {expected_base!r}")
        model = cls(base, config)
        weights = Path(folder, config.WEIGHTS)
        if not weights_exist(weights):
            raise FileNotFoundError(f"no {config.WEIGHTS} in {folder!s}")
        state = load_tensors(weights)
        expected = model.moe_state_dict()
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ValueError(f"{weights} does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"{weights}: {k} has shape {tuple(v.shape)}, the base model needs "
                                 f"{tuple(expected[k].shape)} (parts made for a different base?)")
        model.load_state_dict(state, strict=False)
        if materialise:
            model.merge_deltas()
        return model

    def shuffle_routers(self, seed: int | None) -> None:
        """seed: every MoE layer's router scores are permuted per token at random, reproducibly (None: off)."""
        for i, ffn in enumerate(self.moe.values()):
            ffn.shuffle = None if seed is None else torch.Generator().manual_seed(seed * 1000 + i)

    def merge_deltas(self) -> None:
        for ffn in self.moe.values():
            for expert in ffn.experts:
                expert.merge()
        for ffn in self.dense_ffn.values():
            ffn.merge()

    # --- what trains in stage III ---
    def ffn_parameters(self) -> list[nn.Parameter]:
        """Stage III (MoE-tuning): routers, experts and the dense FFNs of the non-MoE layers. With
        dense_delta_rank > 0 the latter are their deltas (in save_moe's folder); else the base's own
        FFN weights, which save_moe does not store (save them with the base)."""
        moe = []
        for ffn in self.moe.values():   # with deltas, the upcycled weights stay frozen
            moe += [ffn.router.weight] + [p for e in ffn.experts for p in (e.delta if e.delta_rank else e).parameters()]
        dense = []
        for i, layer in enumerate(self.layers):
            if str(i) in self.moe:
                continue
            dense += list(self.dense_ffn[str(i)].delta.parameters() if str(i) in self.dense_ffn
                          else layer.mlp.parameters())
        return moe + dense

    # --- parameter counts ---
    def parameter_counts(self) -> ParamCounts:
        """Parameters in total and active per token. A MoE layer counts its E (materialised) experts and
        router in total, top_k experts and the router as active; the base's own FFN at a MoE layer is
        not counted (the wrapper never runs it)."""
        dense = ParamCounts.of_dense(self.base)
        ffn = sum(numel(self.layers[i].mlp.parameters()) for i in self.moe_layers)
        E, k = self.config.num_experts, self.config.top_k
        routers = sum(numel(ffn.router.parameters()) for ffn in self.moe.values())
        total = dense.decoder_total - ffn + E * ffn + routers
        active = dense.decoder_total - ffn + k * ffn + routers
        return ParamCounts(dense.vision, dense.projector, total, active)

    # --- inputs ---
    def layout(self, input_ids: Tensor, token_ok: Tensor, pixel_values: Tensor | None = None,
               turn_ids: Tensor | None = None) -> DecoderInputs:
        """A left-padded batch (B, S) laid out for the decoder (runtime.decoder.causal_layout)."""
        return causal_layout(self.base, input_ids, token_ok, pixel_values, turn_ids)

    # --- one decoder layer, its FFN swapped where it is a MoE layer ---
    def layer(self, i: int, h: Tensor, mask: Tensor, pos_emb: tuple[Tensor, Tensor], cache: RoutedKVCache | None,
              token_ok: Tensor | None, token_image: Tensor | None = None) -> tuple[Tensor, Top2Gating | None]:
        """h (B, S, d) through decoder layer i: the base's attention, then its FFN or the MoE.
        token_ok (B, S) bool: real tokens (None: all); token_image (B, S) bool: image tokens, for MoE FFNs
        that route by modality."""
        layer = self.layers[i]
        a, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), position_embeddings=pos_emb,
                               attention_mask=mask, past_key_values=cache)
        h = h + a
        x = layer.post_attention_layernorm(h)
        ffn = self.moe[str(i)] if str(i) in self.moe else None
        if ffn is None:
            dense = self.dense_ffn[str(i)] if str(i) in self.dense_ffn else layer.mlp
            return h + dense(x), None
        y, gating = ffn(x, token_ok, token_image)
        return h + y, gating

    def decoder(self, x: DecoderInputs, cache: RoutedKVCache | None = None) -> tuple[Tensor, list[Top2Gating]]:
        """Every layer on the laid-out batch. Returns (last hidden states before the final norm (B, S, d),
        gating per MoE layer)."""
        h = x.embeds
        pos_emb = self.lm.rotary_emb(h, position_ids=x.position_ids)
        gates = []
        for i in range(self.num_layers):
            h, g = self.layer(i, h, x.mask, pos_emb, cache, x.token_ok, x.token_image)
            if g is not None:
                gates.append(g)
        return h, gates

    def final_logits(self, h: Tensor) -> Tensor:
        return self.base.lm_head(self.lm.norm(h))

    def forward(self, input_ids: Tensor, token_ok: Tensor, pixel_values: Tensor | None = None,
                logits_at: Tensor | None = None) -> MoEOutput:
        """Training / scoring forward of a left-padded batch (B, S). logits_at (B, S) bool: the LM head
        runs only there and logits are (n, V) in row-major order; else (B, S, V)."""
        h, gates = self.decoder(self.layout(input_ids, token_ok, pixel_values))
        if logits_at is not None:
            h = h[logits_at]
        l_aux = torch.stack([g.l_aux for g in gates]).sum() if gates else h.new_zeros((), dtype=torch.float32)
        return MoEOutput(self.final_logits(h), l_aux, gates)

    # --- inference: prefill, decode, generate ---
    def prefill(self, x: DecoderInputs, max_new_tokens: int = 0, cache=None) -> tuple[Tensor, MoEDecodeState]:
        """Runs the prompt, filling the KV cache. Returns (logits of the last token (B, V), state)."""
        if cache is None:
            cache = RoutedKVCache(self.num_layers, capacity=x.embeds.shape[1] + max_new_tokens)
        h, gates = self.decoder(x, cache)
        state = MoEDecodeState(cache, x.key_ok, x.position_ids[:, -1] + 1, gates)
        return self.final_logits(h[:, -1]), state

    def decode_one_token(self, token: Tensor, state: MoEDecodeState) -> Tensor:
        """One new token per example (B,) -> logits of the next one (B, V); records its routing."""
        h = self.base.model.get_input_embeddings()(token[:, None])              # (B, 1, d)
        state.key_ok = torch.cat([state.key_ok, torch.ones_like(state.key_ok[:, :1])], dim=1)
        mask = additive_mask(state.key_ok[:, None, :], h.dtype)                 # (B, 1, 1, K)
        pos_emb = self.lm.rotary_emb(h, position_ids=state.next_pos[:, None])
        no_image = torch.zeros_like(token, dtype=torch.bool)[:, None]
        gates = []
        for i in range(self.num_layers):   # token_ok None: every new token is real, and gating syncs on no count
            h, g = self.layer(i, h, mask, pos_emb, state.cache, None, no_image)
            if g is not None:
                gates.append(g)
        state.step_gates.append(gates)
        state.next_pos = state.next_pos + 1
        return self.final_logits(h[:, -1])

    @torch.inference_mode()
    def generate(self, batch: Batch, max_new_tokens: int = 32, stop_ids: set[int] | None = None,
                 callback=None, engine: DecodeEngine | None = None) -> MoEGeneration:
        """Greedy decoding of a collated batch (eval capacity, no Gumbel noise, whatever the module's
        mode). callback(step, tokens (B,)) streams each new token. engine: decode through the
        static-shape engine (runtime.engine); the same tokens and expert choices."""
        was_training = self.training
        self.eval()
        try:
            return self._generate(batch, max_new_tokens, stop_ids, callback, engine)
        finally:
            self.train(was_training)

    def layer_program(self) -> LayerProgram:
        """For the decode engine: every layer on every row; an MoE layer's block also returns its
        tokens' experts and weights, recorded per step (no host sync: the dispatch is grouped on CUDA)."""
        def block(i, h, mask, pos_emb, cache):
            h, g = self.layer(i, h, mask, pos_emb, cache, None, None)
            return h if g is None else (h, (g.experts, g.weights))
        return LayerProgram(self.num_layers, self.base.model.get_input_embeddings(),
                            lambda h, pos: self.lm.rotary_emb(h, position_ids=pos), block, lambda i: None,
                            self.final_logits, owner=self)

    def _generate(self, batch: Batch, max_new_tokens: int, stop_ids, callback, engine=None) -> MoEGeneration:
        p = next(self.parameters())
        b = batch.to(p.device)
        layout = lambda: self.layout(b.input_ids, b.token_ok, b.pixel_values, b.turn_ids)   # noqa: E731
        if engine is not None:
            def pre(cache_for):
                x = layout()
                logits, st = self.prefill(x, max_new_tokens, cache=cache_for(x.embeds.shape[1]))
                return Prefilled(logits, x.key_ok, x.position_ids[:, -1] + 1, None, st)
            tokens, timing, state, records = engine.generate(
                self.layer_program(), pre, b.input_ids.shape[0], self.base.dtype, p.device,
                self.base.config.text_config, max_new_tokens, stop_ids, callback)
            state.step_gates = [[StepGating(*rec[i]) for i in self.moe_layers] for rec in records]
        else:
            tokens, timing, state = greedy(lambda: self.prefill(layout(), max_new_tokens), self.decode_one_token,
                                           max_new_tokens, stop_ids, b.input_ids.device, callback)
        traces = self.traces(b, state.prompt_gates, state.step_gates, tokens)
        for t, ids in zip(traces, tokens):
            t.timing, t.new_tokens = timing, len(ids)
        return MoEGeneration(tokens, traces, timing)

    def traces(self, batch: Batch, prompt_gates: list[Top2Gating], step_gates: list[list[Top2Gating]] = (),
               tokens: list[list[int]] | None = None) -> list[ExpertTrace]:
        """Per-example traces from the gating of a prefill (over B*S) and of decode steps (over B each).
        The generated tokens fed back are those of `tokens` (stop token excluded), as far as decoding
        went (the last generated token is never fed back)."""
        B, S = batch.input_ids.shape
        kinds = token_kinds(batch, self.base.config.image_token_id)
        answer = TOKEN_KINDS.index("answer")
        traces = []
        for k in range(B):
            ok = batch.token_ok[k]
            n_fed = min(len(tokens[k]), len(step_gates)) if tokens is not None else 0
            ex, wt = [], []
            for m in range(len(self.moe_layers)):
                e = [prompt_gates[m].experts.view(B, S, -1)[k, ok]] + [s[m].experts[k:k + 1] for s in step_gates[:n_fed]]
                w = [prompt_gates[m].weights.view(B, S, -1)[k, ok]] + [s[m].weights[k:k + 1] for s in step_gates[:n_fed]]
                ex.append(torch.cat(e))
                wt.append(torch.cat(w))
            fed = torch.tensor(tokens[k][:n_fed] if n_fed else [], dtype=torch.long, device=ok.device)
            traces.append(ExpertTrace(
                layers=list(self.moe_layers),
                token_ids=torch.cat([batch.input_ids[k, ok], fed]).cpu(),
                kinds=torch.cat([kinds[k, ok], torch.full_like(fed, answer)]).cpu(),
                experts=torch.stack(ex).cpu(), weights=torch.stack(wt).float().cpu(),
                num_experts=self.config.num_experts, top_k=self.config.top_k, num_layers=self.config.num_layers))
        return traces

    @torch.inference_mode()
    def trace(self, batch: Batch) -> list[ExpertTrace]:
        """Routing of a whole collated batch (answers included, teacher-forced), in eval mode."""
        was_training = self.training
        self.eval()
        try:
            b = batch.to(next(self.parameters()).device)
            out = self(b.input_ids, b.token_ok, b.pixel_values, logits_at=torch.zeros_like(b.token_ok))
            return self.traces(b, out.gates)
        finally:
            self.train(was_training)


def moe_lm_loss(model: MoELlavaModel, batch: Batch, coef: float | None = None) -> dict[str, Tensor]:
    """Token-mean CE on answer tokens (token p+1 predicted at p) + coef * sum of l_aux (coef: the config's).
    The LM head runs only where an answer token is predicted."""
    coef = model.config.aux_loss_coef if coef is None else coef
    target = batch.answer_mask[:, 1:]                                            # (B, S-1)
    at = F.pad(target, (0, 1))                                                   # (B, S): predicting positions
    out = model(batch.input_ids, batch.token_ok, batch.pixel_values, logits_at=at)
    ce = F.cross_entropy(out.logits.float(), batch.input_ids[:, 1:][target])
    return {"loss": moe_loss(ce, out.l_aux, coef), "ce": ce.detach(), "l_aux": out.l_aux.detach()}


# --- the pipeline: MoE-LLaVA behind the one interface ---------------------------------------------------

class MoELlavaPipeline(Pipeline):
    system = "moe_llava"
    model_cls = MoELlavaModel

    @classmethod
    def from_base(cls, loaded: LoadedBase, parts: str | None = None, seed: int = 0) -> "MoELlavaPipeline":
        pipe = cls.with_parts(loaded, parts, seed, cls.model_cls.from_moe_folder, cls.model_cls,
                              "untrained (routers fresh, experts exact copies: answers equal the dense model's)")
        for ffn in pipe.model.moe.values():
            ffn.router.float()                      # routing in fp32 (the methods)
        return pipe

    def generate(self, batch, max_new_tokens: int, callback=None):
        gen = self.model.generate(batch, max_new_tokens, self.encoder.stop_ids, callback, self.engine)
        return gen.tokens, gen.traces, gen.timing

    def parameter_counts(self, layers_executed: float | None = None) -> ParamCounts:
        return self.model.parameter_counts()
