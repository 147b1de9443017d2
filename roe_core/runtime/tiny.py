"""Tiny random LLaVA models for tests and smoke runs (the shape of transformers' own llava tests).

Nothing here is trained: a tiny model exercises every code path of the real one (vision tower,
projector, Llama decoder, chat template, tokenizer with offsets) in milliseconds.
"""
from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

# One token per printable ASCII character (minus the backtick, plus newline) and 4 specials:
# exactly the 99-token vocab of the transformers llava test config.
SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
CHARS = [c for c in string.printable[:95] if c != "`"] + ["\n"]
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()   # characters join back without spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<image>"],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_llava_config(num_layers: int = 6, hidden: int = 32, image_size: int = 8) -> LlavaConfig:
    text = LlamaConfig(
        vocab_size=99, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        image_size=image_size, patch_size=2, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, projection_dim=32,
    )
    return LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=3, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_seq_length=(image_size // 2) ** 2,
    )


def tiny_llava(num_layers: int = 6, seed: int = 0, attn_implementation: str = "sdpa"):
    """(model, tokenizer, image_processor) of a random tiny LLaVA; eval mode, fp32."""
    torch.manual_seed(seed)
    config = tiny_llava_config(num_layers)
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config).eval()
    size = config.vision_config.image_size
    proc = LlavaImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return model, tiny_tokenizer(), proc


def _load_tiny(device: torch.device, dtype: torch.dtype, seed: int):
    from .sources import LoadedBase
    base, tokenizer, image_processor = tiny_llava(seed=seed)
    return LoadedBase(base.to(device=device, dtype=dtype), tokenizer, image_processor,
                      {"trained_on": "nothing: random weights (tests and smoke runs)"})


def _register() -> None:
    from .sources import ModelSource, register_source
    register_source(ModelSource("tiny", _load_tiny, description="a tiny random LLaVA (tests and smoke runs)"))


_register()
