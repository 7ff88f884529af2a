"""The spec's "overwrite-then-dense" oracle (tests only — never the implementation).

Run the backbone's unmodified decoder on the *full* sequence, but before every layer l overwrite the hidden states at
the visual positions with `E_l = P_l(f)`. Its outputs at text positions equal SAISA's exactly; its cost is LLaVA's.
"""

from __future__ import annotations

import torch

from modeling_saisa import SaisaForConditionalGeneration


@torch.no_grad()
def oracle_logits(
    model: SaisaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits `[B, S, V]` of the oracle (meaningful at text positions only)."""
    saisa = model.model
    backbone = saisa.language_model
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    is_visual = input_ids == model.config.image_token_id
    embeds = backbone.embed_tokens(input_ids)
    handles = []
    if pixel_values is not None and bool(is_visual.any()):
        features = saisa.get_image_features(pixel_values).pooler_output
        for idx, layer in enumerate(backbone.layers):

            def overwrite(module, args, kwargs, idx=idx):
                hidden = args[0].clone()
                hidden[is_visual] = saisa.project(features, idx).flatten(0, 1).to(hidden.dtype)
                return (hidden, *args[1:]), kwargs

            handles.append(layer.register_forward_pre_hook(overwrite, with_kwargs=True))
    try:
        hidden = backbone(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return model.lm_head(hidden)


def text_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int) -> torch.Tensor:
    """Bool `[B, S]`: rows where SAISA has an output (not a placeholder, not padding)."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    return valid & (input_ids != image_token_id)
