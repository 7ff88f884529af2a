"""SAISA configuration: a vision encoder config, a decoder-only LLM config, and how the two are joined.

The fields mirror transformers' `LlavaConfig` on purpose (same names, same defaults, same alias
`image_token_index`), so that users, converters and the pipeline treat a SAISA checkpoint like a LLaVA one.
What differs is how the projected image features are used: SAISA owns one projector per decoder layer whose
output becomes that layer's visual keys/values (see docs/architecture.md), or a single shared projector
(`shared_projector=True`, the stage-1 pre-training layout).
"""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from modeling_saisa.backbones import SUPPORTED_TEXT_MODEL_TYPES, SUPPORTED_VISION_MODEL_TYPES, VISION_HAS_CLS
from modeling_saisa.policies import check_visual_policy

__all__ = ["SaisaConfig"]


@strict
class SaisaConfig(PreTrainedConfig):
    r"""
    Configuration of a [`SaisaForConditionalGeneration`].

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Vision encoder config (CLIP or SigLIP vision model). Defaults to CLIP ViT-L/14 at 336 px.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Decoder config of a Llama-family LLM (`llama`, `mistral`, `qwen2`, `qwen3`). Defaults to the
            Vicuna-7B / Llama-2-7B shape.
        image_token_index (`int`, *optional*, defaults to 32000):
            Id of the image placeholder token (alias `image_token_id`). Each image occupies `image_seq_length`
            consecutive placeholders in `input_ids`.
        image_seq_length (`int`, *optional*, defaults to 576):
            Number of visual tokens per image (24 x 24 patches for CLIP ViT-L/14-336 without CLS).
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation between the two linear layers of each projector (exact GELU, as in LLaVA-1.5).
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token of the vision features, `"full"` keeps every token.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden-state index of the vision tower whose output feeds the projectors.
        multimodal_projector_bias (`bool`, *optional*, defaults to `True`):
            Whether the projector linears have a bias.
        shared_projector (`bool`, *optional*, defaults to `False`):
            One projector shared by every decoder layer (stage-1 pre-training) instead of one per layer.
        visual_policy (`list[str]`, *optional*):
            One visual policy per decoder layer (`injected`, `dense`, `frozen`, `naavit`, `composite`,
            `composite_noffn`; see `modeling_saisa.policies`). None: every layer `injected` (SAISA).
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether `lm_head` shares the input embedding matrix.

    Example:

    ```python
    >>> from modeling_saisa import SaisaConfig, SaisaForConditionalGeneration
    >>> config = SaisaConfig()  # LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 + Vicuna-7B
    >>> model = SaisaForConditionalGeneration(config)  # doctest: +SKIP
    ```
    """

    model_type = "saisa"
    attribute_map = {"image_token_id": "image_token_index"}

    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "intermediate_size": 4096,
                "hidden_size": 1024,
                "patch_size": 14,
                "image_size": 336,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "vocab_size": 32000,
                "projection_dim": 768,
            },
        ),
        # Vicuna-7B plus the `<image>` token the converter adds (id 32000).
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs={"vocab_size": 32001}),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int = 32000
    image_seq_length: int = 576
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    vision_feature_layer: int = -2
    multimodal_projector_bias: bool = True
    shared_projector: bool = False
    visual_policy: list | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Like LlavaConfig: a tied text config means a tied model.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        self.validate_architecture()  # raise a plain ValueError at construction, not a wrapped validator error

    def validate_architecture(self):
        """Part of `@strict` validation: reject configs the model could not honour, saying what was expected."""
        text_type = self.text_config.model_type
        if text_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise ValueError(
                f"SAISA supports text backbones {sorted(SUPPORTED_TEXT_MODEL_TYPES)}; got text_config.model_type="
                f"{text_type!r}."
            )
        vision_type = self.vision_config.model_type
        if vision_type not in SUPPORTED_VISION_MODEL_TYPES:
            raise ValueError(
                f"SAISA supports vision towers {sorted(SUPPORTED_VISION_MODEL_TYPES)}; got vision_config.model_type="
                f"{vision_type!r}."
            )
        if self.image_seq_length < 1:
            raise ValueError(f"image_seq_length must be a positive int, got {self.image_seq_length}.")
        expected = self.expected_image_seq_length()
        if expected is not None and expected != self.image_seq_length:
            raise ValueError(
                f"image_seq_length={self.image_seq_length} does not match the vision tower: image_size "
                f"{self.vision_config.image_size} / patch_size {self.vision_config.patch_size} with select strategy "
                f"{self.vision_feature_select_strategy!r} gives {expected} visual tokens per image."
            )
        if self.visual_policy is not None:
            self.visual_policy = check_visual_policy(self.visual_policy, self.text_config.num_hidden_layers)
        n_layers = self.vision_config.num_hidden_layers
        if not -(n_layers + 1) <= self.vision_feature_layer <= n_layers:
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer} is outside the vision tower's hidden states "
                f"(valid: {-(n_layers + 1)}..{n_layers})."
            )
        vocab = self.text_config.vocab_size
        if not 0 <= self.image_token_index < vocab:
            raise ValueError(
                f"image_token_index={self.image_token_index} must be an id inside the text vocabulary (0..{vocab - 1})."
            )

    def expected_image_seq_length(self) -> int | None:
        """Visual tokens per image implied by the vision config (None if it does not say)."""
        size, patch = getattr(self.vision_config, "image_size", None), getattr(self.vision_config, "patch_size", None)
        if not size or not patch:
            return None
        # The tower emits one token per patch, plus CLS for CLIP; "default" drops the first token (as LLaVA does).
        n = (size // patch) ** 2 + int(VISION_HAS_CLS.get(self.vision_config.model_type, False))
        if self.vision_feature_select_strategy == "default":
            n -= 1
        return n
