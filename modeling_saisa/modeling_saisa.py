"""SAISA models: a vision tower, one projector per decoder layer, and an unmodified transformers LLM.

Layout and conventions follow transformers' Llava (`model.vision_tower`, `model.multi_modal_projector`,
`model.language_model`, `lm_head`). What differs is where the image goes: instead of embedding visual tokens into the
input sequence, each decoder layer l receives `P_l(f)` as the input of its self-attention at the visual positions,
and visual tokens are keys/values only. See docs/architecture.md for the data path and `layout.py` /
`visual_kv.py` for the two pieces that make it happen without touching the backbone's code.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_masks_for_generate, flash_attention_mask
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    MultimodalBaseModelOutputWithPast,
    MultimodalCausalLMOutputWithPast,
)
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from modeling_saisa.backbones import backbone_spec
from modeling_saisa.configuration import SaisaConfig
from modeling_saisa.image_kv import ImageKVStore
from modeling_saisa.layout import TokenLayout
from modeling_saisa.policies import resolve_visual_policy
from modeling_saisa.visual_kv import VisualKVCache, VisualState

logger = logging.get_logger(__name__)

__all__ = [
    "SaisaCausalLMOutputWithPast",
    "SaisaForConditionalGeneration",
    "SaisaModel",
    "SaisaModelOutputWithPast",
    "SaisaMultiModalProjector",
    "SaisaPreTrainedModel",
]


@dataclass
class SaisaModelOutputWithPast(MultimodalBaseModelOutputWithPast):
    r"""
    As Llava's model output (transformers >= 5.24: `cache`, `image_outputs`), in *sequence layout*:
    `last_hidden_state`, every `hidden_states` entry and every `attentions` entry have one row per input token.
    SAISA computes nothing at visual and padding rows, so those rows are zeros (for `attentions`: the rows of
    visual queries; their keys are real). `image_outputs.pooler_output` holds the vision features `f`
    `[n_images, image_seq_length, d_vision]` (before the per-layer projectors).
    """


@dataclass
class SaisaCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    r"""
    As Llava's causal-LM output. `logits` are in sequence layout: zeros at visual and padding rows (SAISA has no
    output there), unless `logits_to_keep` selects the last positions.
    """


class TextRows(NamedTuple):
    """The final hidden states of a chunk's text rows, per query slot `[B, T, h]`, and where they sit."""

    layout: TokenLayout
    hidden: torch.Tensor


class SaisaMultiModalProjector(nn.Module):
    """`Linear(d_vision, h) -> act -> Linear(h, h)`: LLaVA-1.5's MLP, one per decoder layer in SAISA."""

    def __init__(self, config: SaisaConfig):
        super().__init__()
        hidden, bias = config.text_config.hidden_size, config.multimodal_projector_bias
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, hidden, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class SaisaPreTrainedModel(PreTrainedModel):
    config: SaisaConfig
    config_class = SaisaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # Masks are built through transformers' mask interface by backend name; custom kernels are not vetted.
    _supports_attention_backend = False
    _can_compile_fullgraph = False  # the token layout is data dependent (one host sync per prefill)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SaisaMultiModalProjector):
            std = self.config.text_config.initializer_range
            for linear in (module.linear_1, module.linear_2):
                nn.init.normal_(linear.weight, mean=0.0, std=std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)


class SaisaModel(SaisaPreTrainedModel):
    """Vision tower + per-layer projectors + the backbone decoder (no LM head)."""

    # Tensor parallelism (`tp_plan="auto"`): the backbone brings its own plan (merged in under `language_model.`);
    # each projector is Megatron-style, column- then row-parallel, so `P_l(f)` comes out whole (replicated) and the
    # layer's colwise k/v projections then give each rank its own heads of the visual K/V, as for text rows.
    _tp_plan = {
        "multi_modal_projector.*.linear_1": "colwise",
        "multi_modal_projector.*.linear_2": "rowwise",
    }

    def __init__(self, config: SaisaConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        n_projectors = 1 if config.shared_projector else config.text_config.num_hidden_layers
        self.multi_modal_projector = nn.ModuleList(SaisaMultiModalProjector(config) for _ in range(n_projectors))
        self.language_model = AutoModel.from_config(config.text_config)
        self._backbone = backbone_spec(config.text_config.model_type)
        for layer in self.language_model.layers:
            # The proxy cache only reads visual K/V and, in training, wraps no storing cache: keeping it under
            # activation checkpointing is safe (instance attribute: plain backbones elsewhere are untouched).
            layer._can_checkpoint_with_cache = True
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def project(self, image_features: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """`P_l(f)`: the visual rows of decoder layer `layer_idx`'s input."""
        projector = self.multi_modal_projector[0 if self.config.shared_projector else layer_idx]
        return projector(image_features.to(projector.linear_1.weight.dtype))

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        """The vision tower's output, with the features `f` `[n_images, image_seq_length, d_vision]` as `pooler_output`.

        As Llava's (transformers >= 5.24), except that `f` is *not* projected: SAISA projects it once per decoder
        layer. `output_hidden_states` / `output_attentions` are the tower's; without them only the selected hidden
        state is kept (transformers' output capturing), as Llava does.
        """
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        self.check_pixel_values(pixel_values)
        dtype = next(self.vision_tower.parameters()).dtype
        asked_hidden_states = bool(kwargs.get("output_hidden_states", self.vision_tower.config.output_hidden_states))
        if not asked_hidden_states:
            kwargs["output_hidden_states"] = [layer]
        outputs = self.vision_tower(pixel_values.to(dtype), return_dict=True, **kwargs)
        features = outputs.hidden_states[layer]
        if strategy == "default":
            features = features[:, 1:]
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=features,
            hidden_states=outputs.hidden_states if asked_hidden_states else None,
            attentions=outputs.attentions,
        )

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        vision = self.config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must have shape (n_images, {', '.join(map(str, expected))}); got "
                f"{tuple(pixel_values.shape)}."
            )

    def placeholder_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        past_length: int,
    ) -> torch.Tensor | None:
        """Which rows of this chunk are visual (`[B, S]` bool), or None for a text-only chunk.

        After a prompt, image-token ids in a continuation without `pixel_values` (generated or proposed by prompt
        lookup) are text: only a chunk that brings images, or a fresh prompt, has placeholders.
        """
        if pixel_values is None and past_length > 0:
            return None
        if pixel_values is not None:
            self.check_pixel_values(pixel_values)
        if input_ids is not None:
            mask = input_ids == self.config.image_token_id
        else:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        n_placeholders = int(mask.sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        expected = n_images * self.config.image_seq_length
        if n_placeholders != expected:
            if pixel_values is None:
                raise ValueError(
                    f"input_ids hold {n_placeholders} image placeholder tokens (id {self.config.image_token_id}) but "
                    "no pixel_values were given: pass the images, or remove the placeholders."
                )
            raise ValueError(
                f"Image placeholders and images do not match: input_ids hold {n_placeholders} placeholder tokens "
                f"(id {self.config.image_token_id}), but {n_images} images x image_seq_length "
                f"{self.config.image_seq_length} = {expected}."
            )
        if n_placeholders == 0:
            return None
        per_row = mask.sum(1) % self.config.image_seq_length
        if bool(per_row.any()):
            row = int(per_row.nonzero()[0])
            raise ValueError(
                f"Row {row} holds {int(mask[row].sum())} image placeholders, not a multiple of image_seq_length "
                f"{self.config.image_seq_length}: every image must sit whole in one row."
            )
        return mask

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        image_kv: ImageKVStore | None = None,
        **kwargs,
    ) -> tuple | SaisaModelOutputWithPast:
        """As Llava's model forward; every output is in sequence layout (see `SaisaModelOutputWithPast`).

        `image_kv`: an `ImageKVStore`; images it holds skip the vision tower and projectors, the others are added.
        """
        outputs, _ = self.forward_text_rows(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            image_kv=image_kv,
            **kwargs,
        )
        return outputs

    def forward_text_rows(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        image_kv: ImageKVStore | None = None,
        **kwargs,
    ) -> tuple[SaisaModelOutputWithPast, TextRows | None]:
        """`forward`, plus the text rows in the compact per-query layout the backbone ran on.

        The LM head needs only those rows (and the layout to place them), so `SaisaForConditionalGeneration` calls
        this instead of `forward`. The second item is None for a text-only chunk (the output is then all text).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        batch, seq = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        text_config = self.config.text_config
        use_cache = text_config.use_cache if use_cache is None else use_cache
        checkpointing = self.training and self.language_model.is_activation_checkpointing
        if checkpointing and use_cache:
            logger.warning_once("use_cache=True is incompatible with activation checkpointing: using use_cache=False.")
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=text_config)
        past_length = cache.get_seq_length() if cache is not None else 0

        # A 2-D padding mask over past + chunk (a prepared 4-D mask from generate is only used on decode steps).
        mask_2d = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        if mask_2d is None:
            mask_2d = torch.ones(batch, past_length + seq, dtype=torch.long, device=device)
        elif mask_2d.shape[1] == seq and past_length > 0:
            mask_2d = torch.cat([mask_2d.new_ones(batch, past_length), mask_2d], dim=1)
        if position_ids is None:
            # Absolute positions that skip padding: LLaVA-1.5's layout (and generate's own rule).
            position_ids = (mask_2d.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        # A scaled RoPE (linear, dynamic, yarn, ...) is made to run past the trained length: only plain RoPE is capped,
        # at the longest length its config declares (`original_max_position_embeddings` where given).
        rope = getattr(text_config, "rope_parameters", None) or {}
        max_positions = max(text_config.max_position_embeddings, rope.get("original_max_position_embeddings") or 0)
        if rope.get("rope_type", "default") == "default" and seq and int(position_ids.max()) >= max_positions:
            raise ValueError(
                f"Sequence too long: position {int(position_ids.max())} reached, but the backbone has "
                f"max_position_embeddings={max_positions}."
            )

        is_visual = self.placeholder_mask(input_ids, inputs_embeds, pixel_values, past_length)
        embed = self.get_input_embeddings()
        if is_visual is None:
            # Text-only chunk (a decode step, a continuation, a text-only batch): the backbone, untouched.
            outputs = self.language_model(
                inputs_embeds=embed(input_ids) if inputs_embeds is None else inputs_embeds,
                attention_mask=attention_mask if attention_mask is not None else mask_2d,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            return SaisaModelOutputWithPast(
                last_hidden_state=outputs.last_hidden_state,
                cache=cache if use_cache else None,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
            ), None

        layout = TokenLayout.build(is_visual, mask_2d, position_ids, past_length, self.config.image_seq_length)
        if image_kv is not None:
            # Stored images skip the tower and projectors; the misses' activations die inside the store's call.
            image_outputs = None
            policy = image_kv.policy(self, pixel_values, layout)
        else:
            image_outputs = self.get_image_features(pixel_values, return_dict=True)
            policy_list = resolve_visual_policy(self.config.visual_policy, text_config.num_hidden_layers)
            sharded = checkpointing and any(isinstance(layer, FSDPModule) for layer in self.language_model.layers)
            policy = VisualState(
                self,
                image_outputs.pooler_output,
                layout,
                policy_list,
                checkpointing=checkpointing,
                sharded_layers=sharded,
            )
        kv_length, kv_offset = (past_length + seq, 0)
        if cache is not None:
            kv_length, kv_offset = cache.get_mask_sizes(seq, 0)
        if kv_offset:
            raise NotImplementedError(
                "A chunk with images on top of a sliding-window cache that already dropped tokens is not supported."
            )
        implementation = text_config._attn_implementation or "eager"
        # Only text rows are embedded (or kept, for `inputs_embeds`): placeholders never enter the backbone.
        if ALL_MASK_ATTENTION_FUNCTIONS.get(implementation) in (None, flash_attention_mask):
            # Varlen backends (flash-attention) take no 4-D mask: pack the text rows, one query run per sequence.
            varlen = layout.varlen_plan(kv_length)
            outputs = self.language_model(
                inputs_embeds=embed(layout.pack(input_ids)) if inputs_embeds is None else layout.pack(inputs_embeds),
                attention_mask=None,
                position_ids=layout.pack(position_ids),
                cache=VisualKVCache(cache, layout, policy, varlen),
                use_cache=use_cache,
                **varlen.kwargs,
                **kwargs,
            )
            hidden_states = outputs.hidden_states
            if hidden_states is not None:
                # `output_hidden_states=[i, ...]` captures only those layers: the others stay None.
                hidden_states = tuple(None if states is None else layout.unpack(states) for states in hidden_states)
            query_hidden = layout.unpack(outputs.last_hidden_state)
        else:
            if inputs_embeds is None:
                query_embeds = embed(input_ids.gather(1, layout.query_index))
            else:
                index = layout.query_index[..., None].expand(-1, -1, inputs_embeds.shape[-1])
                query_embeds = inputs_embeds.gather(1, index)
            outputs = self.language_model(
                inputs_embeds=query_embeds,
                attention_mask=self._query_masks(layout, implementation, kv_length, query_embeds.dtype),
                position_ids=layout.query_positions,
                cache=VisualKVCache(cache, layout, policy),
                use_cache=use_cache,
                **kwargs,
            )
            hidden_states = outputs.hidden_states
            query_hidden = outputs.last_hidden_state
        attentions = outputs.attentions
        result = SaisaModelOutputWithPast(
            last_hidden_state=layout.to_sequence(query_hidden),
            cache=cache if use_cache else None,
            hidden_states=None
            if hidden_states is None
            else tuple(None if states is None else layout.to_sequence(states) for states in hidden_states),
            # [B, heads, T, keys] -> [B, heads, S, keys]: attention rows move to their query's sequence row.
            attentions=None
            if attentions is None
            else tuple(layout.to_sequence(a.transpose(1, 2)).transpose(1, 2) for a in attentions),
            image_outputs=image_outputs,
        )
        return result, TextRows(layout, query_hidden)

    def _query_masks(self, layout: TokenLayout, implementation: str, kv_length: int, dtype: torch.dtype):
        """The prepared attention mask(s) for the query slots, for the backbone's attention backend."""
        text_config = self.config.text_config
        spec = self._backbone
        if not spec.mask_by_layer_type:
            return layout.attention_mask(implementation, kv_length, dtype, spec.sliding_window(text_config))
        return {
            layer_type: layout.attention_mask(
                implementation, kv_length, dtype, spec.sliding_window(text_config, layer_type)
            )
            for layer_type in set(text_config.layer_types)
        }


class SaisaForConditionalGeneration(SaisaPreTrainedModel, GenerationMixin):
    """SAISA with a language-modeling head: `forward`, `generate`, Trainer, PEFT, like LlavaForConditionalGeneration."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: SaisaConfig):
        super().__init__(config)
        self.model = SaisaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision: str,
        text: str,
        *,
        chat_template: str = "vicuna_v1",
        dtype: torch.dtype | str | None = None,
        pad_to_square: bool = True,
        **config_overrides,
    ):
        """Compose a new SAISA from a pretrained vision encoder and a causal LM (the start of stage-1 training).

        `vision`: a CLIP / SigLIP directory or hub id; `text`: a Llama / Mistral / Qwen2 / Qwen3 causal LM. The
        projectors are new (one shared projector unless `shared_projector=False`). Returns `(model, processor)`:
        the processor is composed too (the LM's tokenizer + `<image>`, the encoder's image processor, the template).
        """
        from modeling_saisa.compose import compose_from_pretrained

        return compose_from_pretrained(
            vision,
            text,
            chat_template=chat_template,
            dtype=dtype,
            pad_to_square=pad_to_square,
            model_class=cls,
            **config_overrides,
        )

    @classmethod
    def from_llava(cls, llava, visual_policy="dense", **from_pretrained_kwargs) -> SaisaForConditionalGeneration:
        """A SAISA-family model over a transformers LLaVA, sharing its weights (no copy, no training).

        `llava`: a loaded `LlavaForConditionalGeneration`, or a llava-hf directory / hub id (loaded with
        `LlavaForConditionalGeneration.from_pretrained(llava, **from_pretrained_kwargs)`). `visual_policy`: a list
        with one entry per layer, one policy name, a preset (`shortv-llava-1.5-7b`, ...) or a preset JSON file; see
        `modeling_saisa.policies`. Layer 0's visual input is the LLaVA projector's output; `injected` layers need a
        projector per layer, which a LLaVA does not have. The returned model's modules *are* the Llava's.
        """
        from transformers import LlavaForConditionalGeneration

        if not isinstance(llava, LlavaForConditionalGeneration):
            if not isinstance(llava, (str, os.PathLike)):
                raise TypeError(
                    f"from_llava expects a LlavaForConditionalGeneration or a checkpoint path / hub id; got "
                    f"{type(llava).__name__}."
                )
            llava = LlavaForConditionalGeneration.from_pretrained(llava, **from_pretrained_kwargs)
        source = llava.config
        policy_list = resolve_visual_policy(visual_policy, source.text_config.num_hidden_layers)
        injected = [i for i, policy in enumerate(policy_list) if policy == "injected"]
        if injected:
            raise ValueError(
                f"visual_policy makes layers {injected} `injected`, which needs one projector per layer; a LLaVA "
                "has a single projector. Use `dense`, `frozen`, `naavit`, `composite` or `composite_noffn`."
            )
        if not isinstance(source.vision_feature_layer, int):
            raise ValueError(
                f"vision_feature_layer={source.vision_feature_layer!r}: SAISA reads one vision layer (an int)."
            )
        config = SaisaConfig(
            vision_config=source.vision_config,
            text_config=source.text_config,
            image_token_index=source.image_token_id,
            image_seq_length=source.image_seq_length,
            projector_hidden_act=source.projector_hidden_act,
            vision_feature_select_strategy=source.vision_feature_select_strategy,
            vision_feature_layer=source.vision_feature_layer,
            multimodal_projector_bias=source.multimodal_projector_bias,
            shared_projector=True,
            visual_policy=policy_list,
            tie_word_embeddings=source.tie_word_embeddings,
        )
        with torch.device("meta"):  # a shell: every module is replaced by the Llava's own below
            model = cls(config)
        inner = model.model
        inner.vision_tower = llava.model.vision_tower
        inner.multi_modal_projector = nn.ModuleList([llava.model.multi_modal_projector])
        inner.language_model = llava.model.language_model
        model.lm_head = llava.lm_head
        # The sub-configs are the Llava's own objects (shared, like the modules): one attention backend.
        model.config.text_config = inner.language_model.config
        model.config.vision_config = inner.vision_tower.config
        model.config._attn_implementation_internal = source._attn_implementation
        for layer in inner.language_model.layers:
            layer._can_checkpoint_with_cache = True
        model.generation_config = copy.deepcopy(llava.generation_config)
        return model.train(llava.training)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> tuple | BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_kv: ImageKVStore | None = None,
        **kwargs,
    ) -> tuple | SaisaCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Unshifted next-token labels, -100 to ignore (as for any transformers causal LM). A label whose preceding
            row is visual or padding is never predicted: SAISA has outputs at text rows only.
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            As in transformers' causal LMs: keep only the last `logits_to_keep` positions (0 = all).
        image_kv (`ImageKVStore`, *optional*):
            Reusable per-image visual K/V: stored images skip the vision tower and every projector (`generate`
            passes it through, so `generate(..., image_kv=store)` works too).
        """
        outputs, text_rows = self.model.forward_text_rows(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            image_kv=image_kv,
            **kwargs,
        )
        vocab_size = self.config.text_config.vocab_size
        loss = None
        if text_rows is None:  # text-only chunk: exactly a causal LM
            hidden = outputs.last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        elif isinstance(logits_to_keep, int) and logits_to_keep > 0 and labels is None:
            # generate(): the last position must be a text row, else there is nothing to predict from.
            if bool(text_rows.layout.ends_with_image.any()):
                raise ValueError(
                    "The prompt ends in image placeholders: SAISA has no output at visual rows, so there is nothing "
                    "to predict the next token from. End the prompt with text (e.g. the chat template's "
                    "assistant prefix)."
                )
            logits = self.lm_head(outputs.last_hidden_state[:, -logits_to_keep:, :])
        else:
            # The LM head runs on text rows only; logits come back in sequence layout (zeros at visual rows).
            query_logits = self.lm_head(text_rows.hidden)
            if labels is not None:
                loss = self.loss_function(
                    logits=query_logits,
                    labels=None,
                    shift_labels=text_rows.layout.shift_labels(labels),
                    vocab_size=vocab_size,
                    **kwargs,
                )
            logits = text_rows.layout.to_sequence(query_logits)
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
                logits = logits[:, keep, :]
        return SaisaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
        )

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache, **kwargs):
        """Compilable caches get a prepared mask from generate; the prefill with images needs the 2-D one.

        (The hook's signature is transformers >= 5.24's: the cache comes as `cache`.)
        """
        if kwargs.get("is_first_iteration"):
            return attention_mask
        return create_masks_for_generate(
            config.get_text_config(decoder=True), inputs_embeds, attention_mask, cache, **kwargs
        )

    def _expand_inputs_for_generation(
        self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **kw
    ):
        """Beam search / num_return_sequences: repeat each row's *own* images with it (not each image in place)."""
        pixel_values = kw.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1:
            # Placeholders are found by id, or by embedding for an `inputs_embeds` prompt (input_ids is then empty).
            ids = input_ids if input_ids is not None and input_ids.shape[1] else None
            is_visual = self.model.placeholder_mask(ids, kw.get("inputs_embeds"), pixel_values, past_length=0)
            per_row = (is_visual.sum(1) // self.config.image_seq_length).tolist()
            starts = [sum(per_row[:row]) for row in range(len(per_row))]
            index = [
                start + image
                for start, count in zip(starts, per_row)
                for _ in range(expand_size)
                for image in range(count)
            ]
            pixel_values = pixel_values[torch.tensor(index, dtype=torch.long, device=pixel_values.device)]
        input_ids, kw = super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **kw)
        if pixel_values is not None:
            kw["pixel_values"] = pixel_values
        return input_ids, kw
