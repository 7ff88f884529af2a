"""Analytic FLOPs of LLaVA, SAISA and ShortV prefill (and a training step), in the papers' convention.

Why analytic: the SAISA paper's headline (-66 % prefill FLOPs against LLaVA-1.5) is a closed-form count, and a
user deciding between the two wants that figure for *their* shapes without running anything. The benchmark
(`modeling_saisa.benchmark`) also needs it, to put an "expected" ratio beside each measured time ratio.

Convention (docs/benchmarks.md, spec §5): FLOPs = 2 x multiply-accumulates of the matrix products only (linear
layers, the two attention products QK^T and AV); norms, activations, RoPE, softmax, embeddings and gathers are
not counted; attention is counted in full (no causal halving). With `t` text tokens, `v` visual tokens, hidden
`h`, FFN width `m`:

- dense (LLaVA) layer:  ``2(t+v)(4h+3m)h + 4(t+v)^2 h``
- KV-only visual layer (SAISA, ShortV's frozen layers): ``2t(4h+3m)h + 4vh^2 + 4t(t+v)h``
- SAISA projectors: ``L * 2v(d_vision*h + h^2)``

Per-layer visual policies (spec policies.md) add to the KV-only layer what the visual rows still compute:
``naavit`` their FFN ``6vhm``, ``composite`` their o_proj ``2v*q_dim*h`` (the value is the K/V pass's own
``v_proj``; self-only attention over one key is softmax = 1, no product) plus the FFN, ``composite_noffn`` the
o_proj only, ``injected`` the layer's projector; ``frozen`` is the KV-only layer itself, ``dense`` a LLaVA layer.

For GQA and for backbones whose ``n_heads * head_dim != h`` (Qwen3), the ``4h`` of q/k/v/o becomes
``2*q_dim + 2*kv_dim`` with ``q_dim = n_heads*head_dim`` and ``kv_dim = n_kv_heads*head_dim``, the visual k/v term
``4vh^2`` becomes ``4v*h*kv_dim`` (= ``4vh^2 * n_kv/n_heads`` when ``q_dim = h``) and the attention terms use
``q_dim`` instead of ``h``. For multi-head attention with ``q_dim = h`` every formula reduces to the papers'.

The papers' figures count the LLM (and SAISA's projectors) only; the vision tower, LLaVA's single projector and
`lm_head` are reported separately so those figures stay reproducible.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = [
    "POLICY_LAYER_FLOPS",
    "PRESETS",
    "FlopsBreakdown",
    "ModelShape",
    "TextShape",
    "VisionShape",
    "dense_layer_flops",
    "flops_report",
    "kv_only_layer_flops",
    "lm_head_flops",
    "llava_prefill_flops",
    "llava_train_flops",
    "model_shape",
    "policy_layer_flops",
    "policy_prefill_flops",
    "projector_flops",
    "saisa_prefill_flops",
    "saisa_train_flops",
    "shortv_prefill_flops",
    "vision_tower_flops",
]


@dataclass(frozen=True)
class TextShape:
    """The decoder dimensions that enter the FLOPs count."""

    hidden: int
    intermediate: int
    layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int = 32000

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


@dataclass(frozen=True)
class VisionShape:
    """A ViT (CLIP / SigLIP vision model) as LLaVA runs it: every encoder layer runs, whichever one is read."""

    hidden: int = 1024
    intermediate: int = 4096
    layers: int = 24
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    has_cls: bool = True
    # SigLIP's attention-pooling head (`vision_use_head`): runs in the tower although LLaVA-style models ignore it.
    pooling_head: bool = False

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + int(self.has_cls)


@dataclass(frozen=True)
class ModelShape:
    """Everything the count needs: the decoder, the vision tower, and the default token counts of this model."""

    text: TextShape
    vision: VisionShape = field(default_factory=VisionShape)
    visual_tokens: int = 576  # per prompt, after the processor's expansion (LLaVA-NeXT: 5 crops x 576 = 2880)
    images: int = 1  # tower forward passes per prompt (LLaVA-NeXT: 5 crops of 336 px)
    text_tokens: int = 64
    projector_bias: bool = True  # biases are additions: not counted, kept for documentation only

    @property
    def d_vision(self) -> int:
        return self.vision.hidden


_CLIP_L_336 = VisionShape()
_VICUNA_7B = TextShape(hidden=4096, intermediate=11008, layers=32, n_heads=32, n_kv_heads=32, head_dim=128)
_VICUNA_13B = TextShape(hidden=5120, intermediate=13824, layers=40, n_heads=40, n_kv_heads=40, head_dim=128)

PRESETS: dict[str, ModelShape] = {
    "llava-1.5-7b": ModelShape(_VICUNA_7B, _CLIP_L_336),
    "llava-1.5-13b": ModelShape(_VICUNA_13B, _CLIP_L_336),
    # The papers count LLaVA-NeXT at its maximum: AnyRes with a 2x2 grid plus the base image = 5 x 576 tokens.
    "llava-next-7b": ModelShape(_VICUNA_7B, _CLIP_L_336, visual_tokens=2880, images=5),
    "llava-next-13b": ModelShape(_VICUNA_13B, _CLIP_L_336, visual_tokens=2880, images=5),
}


# --------------------------------------------------------------------------------------------------------------
# Per-component formulas (forward FLOPs of one prompt, batch 1)
# --------------------------------------------------------------------------------------------------------------
def _text_row_linear_flops(s: TextShape, rows: int) -> int:
    """q, k, v, o projections and the gated FFN (gate, up, down) on `rows` query rows."""
    h = s.hidden
    return 2 * rows * (h * (s.q_dim + 2 * s.kv_dim) + s.q_dim * h + 3 * h * s.intermediate)


def dense_layer_flops(s: TextShape, t: int, v: int) -> int:
    """One LLaVA decoder layer on `t + v` rows: ``2(t+v)(4h+3m)h + 4(t+v)^2 h`` for MHA."""
    n = t + v
    return _text_row_linear_flops(s, n) + 4 * n * n * s.q_dim


def kv_only_layer_flops(s: TextShape, t: int, v: int) -> int:
    """A layer whose visual tokens are keys/values only: ``2t(4h+3m)h + 4vh^2 + 4t(t+v)h`` for MHA.

    The visual rows pay only their k and v projections (``4v*h*kv_dim``, i.e. ``4vh^2`` scaled by n_kv/n_heads);
    only the `t` text rows have queries, o_proj and an FFN.
    """
    return _text_row_linear_flops(s, t) + 4 * v * s.hidden * s.kv_dim + 4 * t * (t + v) * s.q_dim


def _visual_ffn_flops(s: TextShape, v: int) -> int:
    return 2 * v * 3 * s.hidden * s.intermediate


def _visual_o_proj_flops(s: TextShape, v: int) -> int:
    return 2 * v * s.q_dim * s.hidden


# Decoder-layer FLOPs (projectors excluded: `policy_prefill_flops` adds them) of each per-layer visual policy.
POLICY_LAYER_FLOPS: dict[str, Any] = {
    "dense": dense_layer_flops,
    "frozen": kv_only_layer_flops,
    "injected": kv_only_layer_flops,
    "naavit": lambda s, t, v: kv_only_layer_flops(s, t, v) + _visual_ffn_flops(s, v),
    "composite": lambda s, t, v: kv_only_layer_flops(s, t, v) + _visual_o_proj_flops(s, v) + _visual_ffn_flops(s, v),
    "composite_noffn": lambda s, t, v: kv_only_layer_flops(s, t, v) + _visual_o_proj_flops(s, v),
}


def policy_layer_flops(s: TextShape, policy: str, t: int, v: int) -> int:
    """One decoder layer under a visual policy (`dense`, `frozen`, `naavit`, `composite`, `composite_noffn`,
    `injected`; the latter's projector is counted by `policy_prefill_flops`)."""
    try:
        formula = POLICY_LAYER_FLOPS[policy]
    except KeyError:
        raise ValueError(f"unknown visual policy {policy!r}; expected one of {', '.join(POLICY_LAYER_FLOPS)}") from None
    return formula(s, t, v)


def projector_flops(d_vision: int, h: int, v: int) -> int:
    """One LLaVA-style MLP projector (Linear(d_vision, h) -> GELU -> Linear(h, h)) on `v` visual tokens."""
    return 2 * v * (d_vision * h + h * h)


def lm_head_flops(s: TextShape, rows: int) -> int:
    return 2 * rows * s.hidden * s.vocab


def vision_tower_flops(vs: VisionShape, images: int = 1) -> int:
    """A ViT forward: patch-embedding convolution + every encoder layer (+ SigLIP's pooling head if present).

    LLaVA reads hidden state -2 but transformers (like the original code) runs the whole encoder.
    """
    d, n = vs.hidden, vs.tokens
    patch = 2 * vs.patches * d * vs.num_channels * vs.patch_size**2
    layer = 2 * n * (4 * d * d + 2 * d * vs.intermediate) + 4 * n * n * d
    head = 0
    if vs.pooling_head:  # one probe query: q/o on 1 row, k/v on n rows, attention 1 x n, MLP on 1 row
        head = 2 * (2 * d * d) + 2 * n * 2 * d * d + 4 * n * d + 2 * 2 * d * vs.intermediate
    return images * (patch + vs.layers * layer + head)


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs of one prompt's prefill (or training step), split by component."""

    llm: int  # decoder layers
    projector: int  # LLaVA's one projector, or SAISA's L per-layer projectors
    vision: int  # vision tower
    lm_head: int

    @property
    def llm_and_projector(self) -> int:
        """The papers' count for SAISA (LLM + projectors); for LLaVA it adds the (tiny) single projector."""
        return self.llm + self.projector

    @property
    def total(self) -> int:
        return self.llm + self.projector + self.vision + self.lm_head

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "llm_and_projector": self.llm_and_projector, "total": self.total}


def _tokens(shape: ModelShape, t: int | None, v: int | None) -> tuple[int, int]:
    return (shape.text_tokens if t is None else t), (shape.visual_tokens if v is None else v)


def _layer_policy_flops(shape: ModelShape, t: int, v: int, kv_only_layers: int) -> int:
    s = shape.text
    if not 0 <= kv_only_layers <= s.layers:
        raise ValueError(f"the number of KV-only layers must be within 0..{s.layers}, got {kv_only_layers}")
    return (s.layers - kv_only_layers) * dense_layer_flops(s, t, v) + kv_only_layers * kv_only_layer_flops(s, t, v)


def llava_prefill_flops(
    shape: ModelShape, t: int | None = None, v: int | None = None, lm_head_rows: int = 1
) -> FlopsBreakdown:
    """LLaVA prefill. `lm_head_rows`: 1 as in `generate` (only the last position's logits are computed)."""
    t, v = _tokens(shape, t, v)
    return FlopsBreakdown(
        llm=_layer_policy_flops(shape, t, v, 0),
        projector=projector_flops(shape.d_vision, shape.text.hidden, v) if v else 0,
        vision=vision_tower_flops(shape.vision, shape.images) if v else 0,
        lm_head=lm_head_flops(shape.text, lm_head_rows),
    )


def shortv_prefill_flops(
    shape: ModelShape, n_frozen: int, t: int | None = None, v: int | None = None, lm_head_rows: int = 1
) -> FlopsBreakdown:
    """ShortV: LLaVA with `n_frozen` layers whose visual tokens are frozen (KV-only, no projector change)."""
    t, v = _tokens(shape, t, v)
    dense = llava_prefill_flops(shape, t, v, lm_head_rows)
    return replace(dense, llm=_layer_policy_flops(shape, t, v, n_frozen))


def saisa_prefill_flops(
    shape: ModelShape, t: int | None = None, v: int | None = None, lm_head_rows: int = 1
) -> FlopsBreakdown:
    """SAISA prefill: every layer KV-only, one projector per layer on the `v` visual tokens."""
    t, v = _tokens(shape, t, v)
    return FlopsBreakdown(
        llm=_layer_policy_flops(shape, t, v, shape.text.layers),
        projector=shape.text.layers * projector_flops(shape.d_vision, shape.text.hidden, v) if v else 0,
        vision=vision_tower_flops(shape.vision, shape.images) if v else 0,
        lm_head=lm_head_flops(shape.text, lm_head_rows),
    )


def policy_prefill_flops(
    shape: ModelShape,
    policies: list[str],
    t: int | None = None,
    v: int | None = None,
    lm_head_rows: int = 1,
    skip_last_visual_update: bool = True,
) -> FlopsBreakdown:
    """Prefill under a per-layer visual policy list (one entry per decoder layer).

    Projectors: one per `injected` layer, plus LLaVA's single projector when layer 0 is not `injected` (its output
    is layer 0's carried visual state). `skip_last_visual_update`: the model does not compute the last layer's
    visual update (it feeds nothing), so that layer costs a KV-only layer whatever its policy; False gives the
    papers' convention, in which all-`dense` is LLaVA exactly. All-`injected` is SAISA either way.
    """
    t, v = _tokens(shape, t, v)
    s = shape.text
    policies = list(policies)
    if len(policies) != s.layers:
        raise ValueError(f"the visual policy needs one entry per decoder layer ({s.layers}), got {len(policies)}")
    llm = sum(policy_layer_flops(s, p, t, v) for p in policies)
    if skip_last_visual_update:
        llm += kv_only_layer_flops(s, t, v) - policy_layer_flops(s, policies[-1], t, v)
    n_projectors = policies.count("injected") + int(policies[0] != "injected")
    return FlopsBreakdown(
        llm=llm,
        projector=n_projectors * projector_flops(shape.d_vision, s.hidden, v) if v else 0,
        vision=vision_tower_flops(shape.vision, shape.images) if v else 0,
        lm_head=lm_head_flops(s, lm_head_rows),
    )


# Training: backward ~ 2x forward for every matrix product whose input needs a gradient (grad-input + grad-weight),
# 1x for a trained layer whose input is a frozen tensor (the projectors' first linear reads frozen vision features:
# weight gradient only), 0 for the frozen vision tower (forward only). `lm_head` runs on the rows that get logits.
def _train(forward: FlopsBreakdown, projector_first_linear: int) -> FlopsBreakdown:
    return FlopsBreakdown(
        llm=3 * forward.llm,
        projector=3 * forward.projector - projector_first_linear,
        vision=forward.vision,
        lm_head=3 * forward.lm_head,
    )


def llava_train_flops(shape: ModelShape, t: int | None = None, v: int | None = None) -> FlopsBreakdown:
    """One LLaVA training step (forward + backward, vision frozen; logits and loss over all `t + v` positions)."""
    t, v = _tokens(shape, t, v)
    fwd = llava_prefill_flops(shape, t, v, lm_head_rows=t + v)
    return _train(fwd, 2 * v * shape.d_vision * shape.text.hidden)


def saisa_train_flops(shape: ModelShape, t: int | None = None, v: int | None = None) -> FlopsBreakdown:
    """One SAISA training step (forward + backward, vision frozen; logits only at the `t` text positions)."""
    t, v = _tokens(shape, t, v)
    fwd = saisa_prefill_flops(shape, t, v, lm_head_rows=t)
    return _train(fwd, shape.text.layers * 2 * v * shape.d_vision * shape.text.hidden)


# --------------------------------------------------------------------------------------------------------------
# Shapes from configs, files and presets
# --------------------------------------------------------------------------------------------------------------
def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _text_shape(cfg: Any) -> TextShape:
    h = int(_get(cfg, "hidden_size"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv = _get(cfg, "num_key_value_heads") or heads
    head_dim = _get(cfg, "head_dim") or h // heads
    return TextShape(
        hidden=h,
        intermediate=int(_get(cfg, "intermediate_size")),
        layers=int(_get(cfg, "num_hidden_layers")),
        n_heads=heads,
        n_kv_heads=int(kv),
        head_dim=int(head_dim),
        vocab=int(_get(cfg, "vocab_size") or 32000),
    )


def _vision_shape(cfg: Any) -> VisionShape:
    model_type = _get(cfg, "model_type", "clip_vision_model")
    siglip = "siglip" in str(model_type)
    return VisionShape(
        hidden=int(_get(cfg, "hidden_size", 1024)),
        intermediate=int(_get(cfg, "intermediate_size", 4096)),
        layers=int(_get(cfg, "num_hidden_layers", 24)),
        image_size=int(_get(cfg, "image_size", 336)),
        patch_size=int(_get(cfg, "patch_size", 14)),
        num_channels=int(_get(cfg, "num_channels", 3)),
        has_cls=not siglip,
        pooling_head=siglip and bool(_get(cfg, "vision_use_head", True)),
    )


def _vision_from_tower_name(name: str, d_vision: int | None) -> VisionShape:
    """Original `llava_llama` checkpoints name their tower (`openai/clip-vit-large-patch14-336`) instead of
    configuring it: read patch and image size from the name, ViT-L otherwise."""
    patch = re.search(r"patch(\d+)", name)
    size = re.search(r"-(\d{3})(?:$|[^\d])", name)
    return replace(
        _CLIP_L_336,
        hidden=d_vision or 1024,
        patch_size=int(patch.group(1)) if patch else 14,
        image_size=int(size.group(1)) if size else 224,
        has_cls="siglip" not in name.lower(),
    )


def _original_tower_shape(tower: str, d_vision: int | None) -> VisionShape:
    """The tower of an original config: read its config when `mm_vision_tower` is a local directory (a fine-tuned
    or smaller tower has other sizes than its name suggests), else guess from the hub name."""
    local = os.path.expanduser(tower)
    if tower and (os.path.isdir(local) or local.endswith(".json")) and os.path.exists(local):
        config = _load_config_source(local)
        vision = _get(config, "vision_config")  # a full CLIP / SigLIP config holds the tower as a sub-config
        return _vision_shape(vision if vision is not None else config)
    return _vision_from_tower_name(tower, d_vision)


def _load_config_source(path: str) -> Any:
    """A directory with config.json, or a config json file. Registered model types go through AutoConfig so
    that fields left at their defaults in the file (common in hub LLaVA configs) get the right values."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json at {path!r}")
    with open(file, encoding="utf-8") as handle:
        raw = json.load(handle)
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**raw) if "model_type" in raw else raw
    except (ValueError, KeyError, TypeError):
        return raw  # e.g. the original SAISA `llava_llama`: unregistered, read field by field below


def model_shape(source: Any) -> ModelShape:
    """A `ModelShape` from a preset name, a config json path / directory, a SaisaConfig / LlavaConfig, a bare
    text config (vision defaults to CLIP ViT-L/14-336), a dict of either, or a `ModelShape`."""
    if isinstance(source, ModelShape):
        return source
    if isinstance(source, str | os.PathLike):
        key = str(source).lower()
        if key in PRESETS:
            return PRESETS[key]
        if not os.path.exists(source):
            text = str(source)
            if os.sep in text or text.endswith(".json") or text.startswith(("~", ".")):
                raise FileNotFoundError(f"{text!r}: no such model directory or config.json")
            raise ValueError(f"unknown preset {text!r} (known: {', '.join(PRESETS)}) and no such file")
        source = _load_config_source(os.fspath(source))
    text_cfg = _get(source, "text_config")
    if text_cfg is not None:  # multimodal config (saisa / llava)
        if isinstance(text_cfg, Mapping) and "hidden_size" not in text_cfg:
            from transformers import AutoConfig

            text_cfg = AutoConfig.for_model(**{"model_type": "llama", **text_cfg})
        vision_cfg = _get(source, "vision_config") or {}
        vision = _vision_shape(vision_cfg)
        default_v = vision.patches + (
            int(vision.has_cls) if _get(source, "vision_feature_select_strategy", "default") == "full" else 0
        )
        v = _get(source, "image_seq_length") or default_v
        return ModelShape(text=_text_shape(text_cfg), vision=vision, visual_tokens=int(v))
    if _get(source, "mm_hidden_size") is not None:  # original LLaVA / SAISA checkpoint (model_type llava_llama)
        vision = _original_tower_shape(str(_get(source, "mm_vision_tower", "")), int(_get(source, "mm_hidden_size")))
        return ModelShape(text=_text_shape(source), vision=vision, visual_tokens=vision.patches)
    if _get(source, "hidden_size") is not None:  # a bare decoder config: LLaVA-1.5's tower and 576 tokens
        return ModelShape(text=_text_shape(source))
    raise ValueError(f"cannot read model dimensions from {type(source).__name__}")


# --------------------------------------------------------------------------------------------------------------
# The report behind `saisa flops`
# --------------------------------------------------------------------------------------------------------------
def flops_report(
    source: Any = "llava-1.5-7b",
    text_tokens: int | None = None,
    visual_tokens: int | None = None,
    shortv_layers: int | None = None,
    visual_policy: list[str] | None = None,
) -> dict[str, Any]:
    """Prefill FLOPs of one prompt for LLaVA (`dense`), SAISA (`saisa`, `saisa_llm_only`) and optionally ShortV.

    `dense`, `saisa`, `saisa_llm_only` and `shortv` follow the papers (decoder layers, plus SAISA's projectors for
    `saisa`; no vision tower, no lm_head); `components` has every part, `train_step` the training estimate.
    """
    shape = model_shape(source)
    t, v = _tokens(shape, text_tokens, visual_tokens)
    if t < 1 or v < 0:
        raise ValueError(f"need at least one text token and a non-negative number of visual tokens (t={t}, v={v})")
    if v != shape.visual_tokens and shape.visual_tokens:
        # Keep the number of tower passes proportional to the visual tokens (NeXT's crops); at least one.
        shape = replace(shape, images=max(1, round(shape.images * v / shape.visual_tokens)))
    dense = llava_prefill_flops(shape, t, v)
    saisa = saisa_prefill_flops(shape, t, v)
    report: dict[str, Any] = {
        "dense": dense.llm,
        "saisa": saisa.llm_and_projector,
        "saisa_llm_only": saisa.llm,
        "saisa_reduction": 1.0 - saisa.llm_and_projector / dense.llm,
        "saisa_ratio": saisa.llm_and_projector / dense.llm,
        "vision_tower": dense.vision,
        "dense_with_vision": dense.total,
        "saisa_with_vision": saisa.total,
        "per_layer": {"dense": dense_layer_flops(shape.text, t, v), "kv_only": kv_only_layer_flops(shape.text, t, v)},
        "components": {"dense": dense.as_dict(), "saisa": saisa.as_dict()},
        "train_step": {
            "dense": llava_train_flops(shape, t, v).total,
            "saisa": saisa_train_flops(shape, t, v).total,
        },
        "text_tokens": t,
        "visual_tokens": v,
        "shape": {"text": asdict(shape.text), "vision": asdict(shape.vision), "images": shape.images},
        "convention": "FLOPs = 2*MACs of matrix products; attention counted in full (no causal halving); "
        "dense/saisa/shortv exclude the vision tower and lm_head",
    }
    report["train_step"]["ratio"] = report["train_step"]["saisa"] / report["train_step"]["dense"]
    if shortv_layers is not None:
        shortv = shortv_prefill_flops(shape, shortv_layers, t, v)
        report["shortv"] = shortv.llm
        report["shortv_layers"] = shortv_layers
        report["shortv_reduction"] = 1.0 - shortv.llm / dense.llm
    if visual_policy is not None:
        # The papers' count for a policy list: decoder layers plus the `injected` layers' projectors (LLaVA's single
        # projector is excluded from `dense` too, so it is left out here for a like-for-like ratio).
        pol = policy_prefill_flops(shape, visual_policy, t, v, skip_last_visual_update=False)
        per_projector = projector_flops(shape.d_vision, shape.text.hidden, v) if v else 0
        report["policy"] = pol.llm + list(visual_policy).count("injected") * per_projector
        report["policy_ratio"] = report["policy"] / dense.llm
        report["policy_components"] = pol.as_dict()
        report["visual_policy"] = list(visual_policy)
        report["per_layer"]["policy"] = [policy_layer_flops(shape.text, p, t, v) for p in visual_policy]
    return report
