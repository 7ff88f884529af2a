"""The SAISA family as per-layer visual policies (spec: policies.md).

Text rows are the same in every member: the unmodified decoder layer on text rows only, with keys/values for
every row. Visual rows carry a state `x_V` from layer to layer (layer 0: the shared projector's output `P(f)`); each
layer builds its visual K/V from `input_layernorm_l(x_V)` and then updates `x_V` as its policy says:

| policy | visual input of layer l | visual update inside layer l |
|---|---|---|
| `injected` (SAISA) | overwritten by `P_l(f)` | none (the next layer overwrites it anyway) |
| `dense` (LLaVA) | carried | queries over earlier keys, o_proj, residual, FFN |
| `frozen` (ShortV) | carried | none |
| `naavit` | carried | FFN only: `x + mlp(post_attention_layernorm(x))` |
| `composite` (EE-MLLM, assumed) | carried | `x + o_proj(v_proj(input_layernorm(x)))` (GQA-expanded), then FFN |
| `composite_noffn` | carried | the same without the FFN |

Each entry below is one short function `update(layer, x, values, attend) -> x`: it holds what it needs (the
layer's own modules) and never calls back into the model. `attend` is only used by `dense`: it runs the layer's
attention for the visual rows over the layer's merged K/V (see `visual_kv.VisualState`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "POLICY_NAMES",
    "VISUAL_POLICY_PRESETS",
    "VISUAL_UPDATES",
    "carries_state",
    "check_visual_policy",
    "needs_queries",
    "resolve_visual_policy",
    "text_independent",
]


def _ffn(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _self_only(layer: nn.Module, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Self-only attention: each query head reads its kv head's own value (softmax over one key is 1)."""
    attn = layer.self_attn
    heads = values.repeat_interleave(attn.num_key_value_groups, dim=-2)  # [..., n_kv, D] -> [..., n_heads, D]
    return x + attn.o_proj(heads.flatten(-2))


def frozen(layer, x, values, attend):
    return x


def naavit(layer, x, values, attend):
    return _ffn(layer, x)


def composite(layer, x, values, attend):
    return _ffn(layer, _self_only(layer, x, values))


def composite_noffn(layer, x, values, attend):
    return _self_only(layer, x, values)


def dense(layer, x, values, attend):
    return _ffn(layer, x + layer.self_attn.o_proj(attend().flatten(-2)))


# `injected` updates nothing: its next layer is either injected (overwritten) or reads the state it left, `P_l(f)`.
VISUAL_UPDATES: dict[str, Callable] = {
    "injected": frozen,
    "dense": dense,
    "frozen": frozen,
    "naavit": naavit,
    "composite": composite,
    "composite_noffn": composite_noffn,
}
POLICY_NAMES: tuple[str, ...] = tuple(VISUAL_UPDATES)

# ShortV's published lists (ascending Layer Contribution; these layers are `frozen`, the rest `dense`).
_SHORTV = {
    "shortv-llava-1.5-7b": (32, [31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19]),
    "shortv-llava-1.5-13b": (
        40,
        [39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35, 22, 24, 21, 20, 17],
    ),
}
VISUAL_POLICY_PRESETS: dict[str, list[str]] = {
    name: ["frozen" if i in set(replaced) else "dense" for i in range(n_layers)]
    for name, (n_layers, replaced) in _SHORTV.items()
}


def carries_state(policy: str) -> bool:
    """Whether layer l's visual input is the state left by layer l-1 (every policy but `injected`)."""
    return policy != "injected"


def needs_queries(policy: str) -> bool:
    """Whether visual rows get queries (and attention rows) in this layer: `dense` only."""
    return policy == "dense"


def text_independent(policy_list: Sequence[str]) -> bool:
    """True when no layer's visual K/V depend on text: no `dense` layer (then visual K/V can be reused per image)."""
    return "dense" not in policy_list


def resolve_visual_policy(spec, num_layers: int) -> list[str]:
    """A per-layer list from a list, one policy name (every layer), a preset name or a preset JSON file.

    A preset file is `{"visual_policy": [...], ...}` (what `saisa lc` writes). None means SAISA (`injected`).
    """
    if spec is None:
        return ["injected"] * num_layers
    if isinstance(spec, (str, os.PathLike)):
        name = str(spec)
        if name in VISUAL_UPDATES:
            return [name] * num_layers
        if name in VISUAL_POLICY_PRESETS:
            return check_visual_policy(VISUAL_POLICY_PRESETS[name], num_layers, source=f"preset {name!r}")
        if os.path.isfile(name):
            with open(name) as handle:
                data = json.load(handle)
            if not isinstance(data, dict) or "visual_policy" not in data:
                raise ValueError(f"{name}: a preset file must be a JSON object with a 'visual_policy' list.")
            return check_visual_policy(data["visual_policy"], num_layers, source=name)
        raise ValueError(
            f"Unknown visual policy {name!r}: expected one of {list(POLICY_NAMES)}, a preset "
            f"({sorted(VISUAL_POLICY_PRESETS)}), a preset JSON file, or a list with one entry per layer."
        )
    return check_visual_policy(spec, num_layers)


def check_visual_policy(policy_list, num_layers: int, source: str = "visual_policy") -> list[str]:
    """`policy_list` as a list, after checking its length and names (a clear error otherwise)."""
    if isinstance(policy_list, str) or not isinstance(policy_list, Sequence):
        raise ValueError(f"{source} must be a list of policy names, one per layer; got {policy_list!r}.")
    policy_list = list(policy_list)
    if len(policy_list) != num_layers:
        raise ValueError(f"{source} has {len(policy_list)} entries; the model has {num_layers} decoder layers.")
    unknown = sorted({p for p in policy_list if p not in VISUAL_UPDATES}, key=str)
    if unknown:
        raise ValueError(f"{source}: unknown policies {unknown}; expected each entry in {list(POLICY_NAMES)}.")
    return policy_list
