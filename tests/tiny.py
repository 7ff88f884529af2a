"""Tiny random SAISA configurations and models for tests (seconds on a CPU)."""

from __future__ import annotations

import torch

from modeling_saisa import SaisaConfig, SaisaForConditionalGeneration

VOCAB = 99
IMAGE_TOKEN_ID = 98
PAD_TOKEN_ID = 0

TEXT_CONFIGS = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=8),
}
VISION_CONFIGS = {
    "clip": dict(model_type="clip_vision_model"),
    "siglip": dict(model_type="siglip_vision_model"),
}


def tiny_config(text: str = "llama", vision: str = "clip", **overrides) -> SaisaConfig:
    """A SAISA config with a 2-layer GQA decoder (hidden 32, 4 heads, 2 KV heads) and a 2-layer 8-px tower.

    CLIP: 8 px / patch 2 = 16 patches (+CLS, dropped by "default"); SigLIP: 16 patches, "full" strategy.
    """
    text_config = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
        **TEXT_CONFIGS[text],
    )
    vision_config = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=8,
        patch_size=2,
        num_channels=3,
        **VISION_CONFIGS[vision],
    )
    kwargs = dict(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=16,
        vision_feature_select_strategy="default" if vision == "clip" else "full",
        vision_feature_layer=-2,
    )
    kwargs.update(overrides)
    return SaisaConfig(**kwargs)


def tiny_model(text: str = "llama", vision: str = "clip", seed: int = 0, attn: str = "eager", **overrides):
    torch.manual_seed(seed)
    config = tiny_config(text, vision, **overrides)
    model = SaisaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.eval()
