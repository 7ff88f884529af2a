"""Tiny random SAISA configurations and models for tests (seconds on a CPU)."""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

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


def tiny_llava(
    layers: int = 4,
    attn: str = "eager",
    seed: int = 0,
    text_type: str = "llama",
    vision_overrides: dict | None = None,
    **text_overrides,
) -> LlavaForConditionalGeneration:
    """transformers' own Llava with `tiny_config`'s towers and `layers` decoder layers (eval, `attn` backend).

    `vision_overrides` / `text_overrides` change the sub-configs (e.g. a vision width other than the text width, so
    that FLOPs formulas cannot confuse the two; a sliding window).
    """
    saisa = tiny_config(text_type)
    text = saisa.text_config.to_dict()
    text["num_hidden_layers"] = layers
    text.pop("layer_types", None)  # recomputed for `layers` (Qwen2) from the overrides
    text.update(text_overrides)
    config = LlavaConfig(
        vision_config={**saisa.vision_config.to_dict(), **(vision_overrides or {})},
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.eval()


def make_batch(rows: list[list], padding_side: str = "left", image_seq_length: int = 16, image_size: int = 8, seed=0):
    """Build `input_ids`, `attention_mask`, `pixel_values` from row recipes.

    A recipe is a list of segments: an int n = n random text tokens, the string "img" = one image's placeholders.
    Rows are padded with PAD_TOKEN_ID on `padding_side`. pixel_values are ordered row-major, as the processor does.
    """
    gen = torch.Generator().manual_seed(seed)
    sequences, n_images = [], 0
    for recipe in rows:
        ids = [1]  # BOS
        for segment in recipe:
            if segment == "img":
                ids += [IMAGE_TOKEN_ID] * image_seq_length
                n_images += 1
            else:
                ids += torch.randint(3, IMAGE_TOKEN_ID, (segment,), generator=gen).tolist()
        sequences.append(ids)
    width = max(map(len, sequences))
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
    pixel_values = torch.randn(n_images, 3, image_size, image_size, generator=gen) if n_images else None
    return input_ids, attention_mask, pixel_values
