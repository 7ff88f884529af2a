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
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

from modeling_saisa.backbones import attention_function, backbone_spec, rotate_keys
from modeling_saisa.layout import TokenLayout, VarlenPlan
from modeling_saisa.policies import VISUAL_UPDATES, carries_state, needs_queries, text_independent

if TYPE_CHECKING:
    from modeling_saisa.modeling_saisa import SaisaModel

__all__ = ["VisualPolicy", "VisualState", "VisualKVCache", "attend_visual"]


class VisualPolicy(Protocol):
    def key_values(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer_idx`'s visual keys (rotated) and values, `[n_visual, n_kv_heads, head_dim]` each."""

    def after_merge(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Called with the layer's merged K/V `[B, H_kv, L, D]` (this chunk's and the cache's)."""


class VisualState:
    """Visual rows under a per-layer policy list (see `policies.py`): the state `x_V`, and each layer's K/V from it.

    Layer l's K/V come from `input_layernorm_l(x_V)` (k_proj, optional k_norm, RoPE at the visual positions), where
    `x_V` is `P_l(f)` for an `injected` layer and the state left by layer l-1 otherwise (layer 0: `P(f)`, the first
    projector). After the layer's merged K/V exist (`after_merge`), `x_V` is updated by the layer's policy; only a
    `dense` layer gives visual rows queries, attending over those merged K/V.

    Under activation checkpointing (`checkpointing=True`) the layers are recomputed in backward. A text-independent
    list (no `dense` layer) builds every layer's K/V up front, outside the decoder layers, so the visual work is not
    redone with them; a list with `dense` layers keeps the state entering every layer, so that recomputing layer l
    starts from the same `x_V` and redoes exactly its own visual work (as a dense LLaVA layer would). So does any
    list when the decoder layers are FSDP-sharded (`sharded_layers`): their weights exist only inside the layer.
    """

    def __init__(
        self,
        model: SaisaModel,
        features: torch.Tensor,
        layout: TokenLayout,
        policy_list: list[str],
        checkpointing: bool = False,
        sharded_layers: bool = False,
    ):
        self.model = model
        self.features = features  # [n_images, n_v, d_vision]
        self.layout = layout
        self.policy_list = policy_list
        self.spec = backbone_spec(model.config.text_config.model_type)
        self.layers = model.language_model.layers
        # RoPE tables at the visual positions: the backbone's own rotary embedding, shared by all layers.
        self.cos, self.sin = model.language_model.rotary_emb(features, position_ids=layout.visual_positions)
        # A shared projector (stage 1, from_llava) feeds every injected layer the same rows: project once.
        self._shared = model.project(features, 0) if model.config.shared_projector else None
        self.keep_inputs = checkpointing
        self.inputs: dict[int, torch.Tensor] = {}  # x_V entering layer l (set by layer l-1's update)
        self._pending: dict[int, tuple] = {}  # layer -> (x_V, visual values, visual queries) until after_merge
        self._precomputed = None
        # FSDP2 gathers a layer's weights only inside that layer's forward: with sharded layers the K/V are built
        # inside each layer (and recomputed with it), from the kept inputs and features (torch 2.13's FSDPModule).
        if checkpointing and text_independent(policy_list) and not sharded_layers:
            precomputed = []
            for i in range(len(self.layers)):
                precomputed.append(self._compute(i))
                self.after_merge(i, None, None)
            self._precomputed = precomputed

    def _projected(self, layer_idx: int) -> torch.Tensor:
        return self._shared if self._shared is not None else self.model.project(self.features, layer_idx)

    def key_values(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._precomputed is not None:
            return self._precomputed[layer_idx]
        return self._compute(layer_idx)

    def _compute(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        policy = self.policy_list[layer_idx]
        if not carries_state(policy):
            state = self._projected(layer_idx)
        elif layer_idx in self.inputs:
            state = self.inputs[layer_idx] if self.keep_inputs else self.inputs.pop(layer_idx)
        else:  # the first layer: the (shared) projector's output P(f)
            state = self._projected(0)
        layer = self.layers[layer_idx]
        norm, k_proj, v_proj, k_norm = self.spec.kv_parts(layer)
        normed = norm(state)
        head_dim = self.cos.shape[-1]
        keys = k_proj(normed).unflatten(-1, (-1, head_dim))
        values = v_proj(normed).unflatten(-1, (-1, head_dim))
        if k_norm is not None:
            keys = k_norm(keys)
        cos, sin = self.cos.to(keys.dtype), self.sin.to(keys.dtype)
        keys = rotate_keys(keys, cos, sin)
        queries = None
        if needs_queries(policy) and layer_idx < len(self.layers) - 1:  # the last layer's update feeds nothing
            q_proj, q_norm = self.spec.q_parts(layer)
            queries = q_proj(normed).unflatten(-1, (-1, head_dim))
            if q_norm is not None:
                queries = q_norm(queries)
            queries = rotate_keys(queries, cos, sin)
        self._pending[layer_idx] = (state, values, queries)
        return keys.flatten(0, 1), values.flatten(0, 1)

    def after_merge(self, layer_idx: int, keys: torch.Tensor | None, values: torch.Tensor | None) -> None:
        """Update `x_V` by layer `layer_idx`'s policy; `keys`/`values`: the layer's merged K/V `[B, H_kv, L, D]`."""
        if self._precomputed is not None and keys is not None:
            return  # done up front, outside the (recomputed) layers
        state, visual_values, queries = self._pending.pop(layer_idx)
        layer = self.layers[layer_idx]
        update = VISUAL_UPDATES[self.policy_list[layer_idx]]

        def attend() -> torch.Tensor:
            text_config = self.model.config.text_config
            window = self.spec.sliding_window(text_config, self.spec.layer_type(text_config, layer_idx))
            return attend_visual(layer, self.layout, queries, keys, values, text_config, sliding_window=window)

        last = layer_idx == len(self.layers) - 1
        if not last:  # the last layer's update feeds nothing
            self.inputs[layer_idx + 1] = update(layer, state, visual_values, attend)
        elif not self.keep_inputs:
            self.features = self._shared = None  # the prefill's peak is next: let go of f


def attend_visual(
    layer: nn.Module,
    layout: TokenLayout,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    text_config,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """A `dense` layer's attention for the visual rows: `[n_images, n_v, H, D]` over the merged K/V of their row.

    Key j is visible to the visual row i iff j <= i and j is not padding (LLaVA's causal rule) and, in a
    sliding-window layer, i - j < `sliding_window` (transformers' sliding overlay, as the text rows get it), built by
    transformers' mask interface for the active backend. Varlen backends (flash-attention) take no 4-D mask, and
    flex-attention's CPU kernel fails to compile for these few-query shapes (torch 2.13): their visual rows go
    through SDPA, the same rule.
    """
    n_images, n_v = queries.shape[:2]
    seq = layout.seq_length
    image_row = layout.visual_target.view(n_images, n_v)[:, 0] // seq
    own_key = layout.visual_target.view(n_images, n_v) % seq + layout.past_length  # [n_images, n_v]
    kv_length = keys.shape[2]
    key_valid = nn.functional.pad(layout.key_valid, (0, max(0, kv_length - layout.key_valid.shape[1])))[image_row]

    def visual_mask(batch_idx, head_idx, q_idx, kv_idx):
        own = own_key[batch_idx, q_idx]
        allowed = (kv_idx <= own) & key_valid[batch_idx, kv_idx]
        if sliding_window is not None:
            allowed = allowed & (kv_idx > own - sliding_window)
        return allowed

    implementation = text_config._attn_implementation or "eager"
    if implementation == "flex_attention" or ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) in (
        None,
        flash_attention_mask,
    ):
        implementation = "sdpa"
    mask = ALL_MASK_ATTENTION_FUNCTIONS[implementation](
        batch_size=n_images,
        q_length=n_v,
        kv_length=kv_length,
        mask_function=visual_mask,
        attention_mask=None,
        allow_is_causal_skip=False,
        dtype=queries.dtype,
        device=queries.device,
    )
    attention = attention_function(layer, implementation)
    output, _ = attention(
        layer.self_attn,
        queries.transpose(1, 2),
        keys[image_row],
        values[image_row],
        mask,
        dropout=0.0,
        scaling=layer.self_attn.scaling,
    )
    return output  # [n_images, n_v, H, D]


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
        self.policy.after_merge(layer_idx, keys, values)
        if packed:
            keys, values = self.varlen.pack_keys(keys), self.varlen.pack_keys(values)
        return keys, values
