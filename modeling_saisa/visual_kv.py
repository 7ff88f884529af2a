"""Visual keys/values per decoder layer, and the cache proxy that hands them to the backbone's attention.

The backbone (an unmodified transformers decoder) runs on text rows only. Its attention calls
`past_key_values.update(k_text, v_text, layer_idx)`; `VisualKVCache` is what it gets as `past_key_values`. At that
call it asks the visual policy for *that* layer's visual K/V, merges text and visual K/V into sequence order, hands
the merged K/V to the real cache (so the cache holds LLaVA's layout) and returns them. With no real cache (training,
`use_cache=False`) it only merges. The caller always gets the real cache back, never the proxy.

A visual policy says where a layer's visual K/V come from. SAISA's (`InjectedVisualKV`) is "`P_l(f)` seen through
layer l's own pre-attention norm, k/v projections, optional k_norm and RoPE at the visual positions". Other systems
of the same family (NAAViT, ShortV's frozen layers, EE-MLLM's composite attention) are other policies with the
same `key_values(layer_idx)` method; nothing else changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from transformers.cache_utils import Cache

from modeling_saisa.backbones import backbone_spec, rotate_keys
from modeling_saisa.layout import TokenLayout, VarlenPlan

if TYPE_CHECKING:
    from modeling_saisa.modeling_saisa import SaisaModel

__all__ = ["VisualPolicy", "InjectedVisualKV", "VisualKVCache", "unrotated_key_values"]


def unrotated_key_values(
    model: SaisaModel, projected: torch.Tensor, layer_idx: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer `layer_idx`'s visual keys *before RoPE* and values, `[n_images, n_v, n_kv_heads, head_dim]` each.

    `projected` is `P_l(f)`. Everything here depends on the image alone (no position, no text), which is what lets
    `ImageKVStore` keep these and reuse them at any position.
    """
    layer = model.language_model.layers[layer_idx]
    norm, k_proj, v_proj, k_norm = backbone_spec(model.config.text_config.model_type).kv_parts(layer)
    head_dim = layer.self_attn.head_dim
    hidden = norm(projected)
    keys = k_proj(hidden).unflatten(-1, (-1, head_dim))
    values = v_proj(hidden).unflatten(-1, (-1, head_dim))
    del hidden  # the normed rows are the biggest temporary here: free them before RoPE
    if k_norm is not None:
        keys = k_norm(keys)
    return keys, values


class VisualPolicy(Protocol):
    def key_values(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s visual keys (rotated) and values, `[n_visual, n_kv_heads, head_dim]` each."""


class InjectedVisualKV:
    """SAISA: layer l's visual rows are `P_l(f)`; visual tokens get no query, no attention output and no FFN.

    `precompute=True` builds every layer's K/V up front, outside the decoder layers: under activation
    checkpointing the layers are recomputed in backward, and the visual work must not be recomputed with them.
    Otherwise each layer's K/V are built when its attention asks, so at most one layer's are alive beside the cache.
    """

    def __init__(self, model: SaisaModel, features: torch.Tensor, layout: TokenLayout, precompute: bool = False):
        self.model = model
        self.features = features  # [n_images, n_v, d_vision]
        self.layers = model.language_model.layers
        # RoPE tables at the visual positions: the backbone's own rotary embedding, shared by all layers.
        self.cos, self.sin = model.language_model.rotary_emb(features, position_ids=layout.visual_positions)
        # A shared projector (stage 1) feeds every layer the same rows: project once per forward.
        self._shared = model.project(features, 0) if model.config.shared_projector else None
        self._precomputed = [self._compute(i) for i in range(len(self.layers))] if precompute else None

    def key_values(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._precomputed is not None:
            return self._precomputed[layer_idx]
        keys_values = self._compute(layer_idx)
        if layer_idx == len(self.layers) - 1:
            # The last layer has its K/V: let go of f now, before the cache copies them (the prefill's peak).
            self.features = self._shared = None
        return keys_values

    def _compute(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # E_l = P_l(f) through the layer's own norm (no name kept for E_l: it dies as soon as it is normed).
        projected = self._shared if self._shared is not None else self.model.project(self.features, layer_idx)
        keys, values = unrotated_key_values(self.model, projected, layer_idx)
        del projected
        keys = rotate_keys(keys, self.cos.to(keys.dtype), self.sin.to(keys.dtype))
        return keys.flatten(0, 1), values.flatten(0, 1)


class VisualKVCache(Cache):
    """The `past_key_values` the backbone sees during a chunk with visual tokens (a thin proxy, one per forward)."""

    def __init__(
        self, cache: Cache | None, layout: TokenLayout, policy: VisualPolicy, varlen: VarlenPlan | None = None
    ):
        # Share the real cache's layer list, so its length/mask-size/sliding queries answer for the real cache.
        super().__init__(layers=cache.layers if cache is not None else [])
        self.cache = cache
        self.layout = layout
        self.policy = policy
        self.varlen = varlen  # varlen backends (flash-attention): packed text rows in, packed per-run keys out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        visual_keys, visual_values = self.policy.key_values(layer_idx)
        packed = self.varlen is not None
        keys = self.layout.merge(key_states, visual_keys, packed=packed)
        values = self.layout.merge(value_states, visual_values, packed=packed)
        del visual_keys, visual_values  # the cache copies the merged K/V next: keep only one visual copy alive
        if self.cache is not None:
            keys, values = self.cache.update(keys, values, layer_idx, *args, **kwargs)
        if packed:
            keys, values = self.varlen.pack_keys(keys), self.varlen.pack_keys(values)
        return keys, values
