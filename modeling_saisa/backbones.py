"""The one place where backbone specifics live.

SAISA reuses the decoder layers of a transformers LLM unchanged. To build a layer's *visual* keys and values it
needs four pieces of that layer: the pre-attention norm, `k_proj`, `v_proj` and (Qwen3) `k_norm`, plus the
backbone's rotary embedding. Every Llama-family decoder in transformers names these the same way, so a backbone
entry only records what differs (today: whether there is a `k_norm`). Adding a backbone = adding one line here
and running the oracle tests on it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = [
    "SUPPORTED_TEXT_MODEL_TYPES",
    "SUPPORTED_VISION_MODEL_TYPES",
    "BackboneSpec",
    "attention_function",
    "backbone_spec",
    "rotate_keys",
    "rotated_keys",
]


@dataclass(frozen=True)
class BackboneSpec:
    """How to reach the parts of decoder layer `layer` that turn hidden states into keys/values."""

    has_k_norm: bool = False
    # The backbone takes a dict of masks keyed by `config.layer_types` (full / sliding layers), not one mask.
    mask_by_layer_type: bool = False

    def kv_parts(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module | None]:
        attn = layer.self_attn
        return layer.input_layernorm, attn.k_proj, attn.v_proj, (attn.k_norm if self.has_k_norm else None)

    def q_parts(self, layer: nn.Module) -> tuple[nn.Module, nn.Module | None]:
        """`q_proj` and (Qwen3) `q_norm`: the visual queries of a `dense` layer."""
        attn = layer.self_attn
        return attn.q_proj, (attn.q_norm if self.has_k_norm else None)

    def layer_type(self, text_config, layer_idx: int) -> str | None:
        """`config.layer_types[layer_idx]` where the backbone keys its masks by layer type, else None (one mask)."""
        return text_config.layer_types[layer_idx] if self.mask_by_layer_type else None

    def sliding_window(self, text_config, layer_type: str | None = None) -> int | None:
        """The attention window of layers of `layer_type` (see `layer_type`), None for full attention.

        Mistral: `sliding_window` applies to every layer (None: full). Qwen2/Qwen3: only to `sliding_attention`
        layers (the transformers 5.x config fields these backbones read). Text and visual queries share this rule.
        """
        if self.mask_by_layer_type and layer_type != "sliding_attention":
            return None
        return getattr(text_config, "sliding_window", None)


_BACKBONES: dict[str, BackboneSpec] = {
    "llama": BackboneSpec(),  # Vicuna, Llama-2, Llama-3
    "mistral": BackboneSpec(),
    "qwen2": BackboneSpec(mask_by_layer_type=True),  # q/k/v biases live inside k_proj / v_proj
    "qwen3": BackboneSpec(has_k_norm=True, mask_by_layer_type=True),
}

SUPPORTED_TEXT_MODEL_TYPES = frozenset(_BACKBONES)
# Vision towers: transformers' own vision models; features are read from `hidden_states[vision_feature_layer]`.
# `has_cls`: whether the tower prepends a CLS token (the "default" select strategy drops the first token).
SUPPORTED_VISION_MODEL_TYPES = frozenset({"clip_vision_model", "siglip_vision_model"})
VISION_HAS_CLS = {"clip_vision_model": True, "siglip_vision_model": False}


def backbone_spec(model_type: str) -> BackboneSpec:
    try:
        return _BACKBONES[model_type]
    except KeyError:
        raise ValueError(f"Unsupported text backbone {model_type!r}; SAISA supports {sorted(_BACKBONES)}.") from None


def attention_function(layer: nn.Module, implementation: str) -> Callable:
    """The attention kernel the layer's own attention module uses for `implementation` (eager: its module's)."""
    if implementation == "eager":
        return importlib.import_module(type(layer.self_attn).__module__).eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int = 2) -> torch.Tensor:
    """RoPE on keys only, in place, in the half-rotation form all four backbones use.

    `keys` `[N, n_v, H, D]` (heads at `head_dim`), cos/sin `[N, n_v, D]` from the backbone's own `rotary_emb`. In
    place because these are the largest temporaries of a SAISA prefill (every layer's visual keys); autograd allows
    it (the projection that made `keys` does not need its output for backward).
    """
    half = keys.shape[-1] // 2
    rotated = keys.roll(half, dims=-1)  # [x2, x1]
    rotated[..., :half].neg_()  # [-x2, x1]
    rotated.mul_(sin.unsqueeze(head_dim))
    return keys.mul_(cos.unsqueeze(head_dim)).add_(rotated)


def rotated_keys(
    keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int = 1, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RoPE on stored keys, out of place: `rotate_keys`' result, bit for bit, without touching `keys`.

    For the keys an `ImageKVStore` keeps (`[n_v, H, D]`, cos/sin `[n_v, D]`), which must stay unrotated: the halves
    are combined directly, so there is no copy of `keys` and no `roll` temporary (`rotate_keys` needs both).
    Each half is `a*c - b*s` / `a*c + b*s` as separate multiplies and an add, the operations `rotate_keys` runs
    (`-(b*s)` added equals `b*s` subtracted exactly), so a stored image's keys equal freshly computed ones.
    `out`: where to write (a slice of a larger buffer, so several images need no concatenation afterwards).
    """
    half = keys.shape[-1] // 2
    cos, sin = cos.unsqueeze(head_dim), sin.unsqueeze(head_dim)
    x1, x2 = keys[..., :half], keys[..., half:]
    out = torch.empty_like(keys) if out is None else out
    torch.mul(x1, cos[..., :half], out=out[..., :half]).sub_(x2 * sin[..., :half])
    torch.mul(x2, cos[..., half:], out=out[..., half:]).add_(x1 * sin[..., half:])
    return out
