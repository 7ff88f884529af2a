"""Compose a new SAISA model from pretrained parts: a vision encoder and a causal LM (the start of stage 1).

`compose_from_pretrained(vision, text)` loads both with transformers, adds `<image>` to the LM's tokenizer (growing
its embeddings with mean-initialised rows), and builds a `SaisaForConditionalGeneration` whose vision tower and
language model *are* the loaded weights (adopted tensor by tensor, no copy) and whose projectors are freshly
initialised. The processor is composed alongside: the tokenizer, an image processor sized for the tower and a
SAISA chat template.

`init_projectors_from_shared(model, source)` is the stage-2 step: every per-layer projector starts as a copy of the
stage-1 shared projector (from a state dict, a `shared_projector.safetensors` written by the converter, or a stage-1
SAISA checkpoint with `shared_projector=True`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeling_saisa.backbones import SUPPORTED_TEXT_MODEL_TYPES, VISION_HAS_CLS
from modeling_saisa.checkpoint_io import resolve_repo
from modeling_saisa.convert import (
    SHARED_PROJECTOR_FILE,
    ConversionError,
    grow_rows,
    load_tokenizer,
    load_vision_config,
    prepare_tokenizer,
    resolve_dtype,
    visual_token_count,
)

__all__ = ["compose_from_pretrained", "init_projectors_from_shared"]

logger = logging.getLogger(__name__)

_PROJECTOR_KEYS = ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")


def _adopt(target: nn.Module, source: nn.Module, where: str) -> None:
    """Make `target` use `source`'s parameters and buffers (same objects: no copy, ties preserved).

    Why not swap the submodules: the SAISA model may configure its submodules at construction (e.g. flags on the
    decoder layers); adopting tensors keeps every module object it built. Both sides come from the same config, so
    their structures match; any difference is an error, not a silent partial model.
    """
    target_modules = dict(target.named_modules())
    for name, module in source.named_modules():
        if name not in target_modules:
            raise ConversionError(f"{where}: the loaded model has a module {name!r} that the SAISA model lacks.")
        dest = target_modules[name]
        for key, param in module._parameters.items():
            if key not in dest._parameters:
                raise ConversionError(f"{where}: parameter {name}.{key} has no place in the SAISA model.")
            dest._parameters[key] = param
        for key, buffer in module._buffers.items():
            if key not in dest._buffers:
                raise ConversionError(f"{where}: buffer {name}.{key} has no place in the SAISA model.")
            dest._buffers[key] = buffer


# Tensors of a full CLIP / SigLIP checkpoint outside its vision tower.
FULL_CHECKPOINT_NON_VISION = r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$|logit_bias$)"


@contextlib.contextmanager
def _quiet_about_the_other_half(vision_cls: type, vision_dir: Path) -> Iterator[None]:
    """While loading a full CLIP / SigLIP checkpoint's vision half, declare its text half ignorable.

    transformers would list every text tensor as UNEXPECTED (a table of dozens of rows for a real CLIP), though
    loading the vision half of a full checkpoint is what is wanted. Declaring them ignorable (on the class, for this
    load only: `from_pretrained` reads the class attribute) keeps the report for anything else that is wrong; the
    log gets one line instead.
    """
    try:
        model_type = json.loads((vision_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type not in ("clip", "siglip", "siglip2"):
        yield
        return
    logger.info("%s is a full %s checkpoint: loading its vision half only.", vision_dir, model_type)
    had = "_keys_to_ignore_on_load_unexpected" in vision_cls.__dict__
    previous = vision_cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    vision_cls._keys_to_ignore_on_load_unexpected = [*(previous or []), FULL_CHECKPOINT_NON_VISION]
    try:
        yield
    finally:
        if had:
            vision_cls._keys_to_ignore_on_load_unexpected = previous
        else:
            del vision_cls._keys_to_ignore_on_load_unexpected


def _text_model_parts(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder, lm_head) of a `*ForCausalLM`."""
    decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.model
    return decoder, lm.get_output_embeddings()


def compose_from_pretrained(
    vision: str | os.PathLike,
    text: str | os.PathLike,
    *,
    chat_template: str = "vicuna_v1",
    dtype: str | torch.dtype | None = None,
    pad_to_square: bool = True,
    model_class: type | None = None,
    **config_overrides: Any,
):
    """Build `(model, processor)` from a vision encoder and a causal LM, both directories or hub ids.

    Args:
        vision: a CLIP or SigLIP checkpoint (vision model, or a full CLIP/SigLIP: its text half is ignored).
        text: a causal LM of a supported family (Llama/Vicuna, Llama-3, Mistral, Qwen2, Qwen3) with its tokenizer.
        chat_template: `"vicuna_v1"`, `"llama_3"`, or a Jinja template string.
        dtype: `"float32"`, `"float16"`, `"bfloat16"`; None keeps the LM's stored dtype (the tower is cast to it).
        pad_to_square: LLaVA-1.5 / SAISA image preprocessing (pad before the resize).
        model_class: the class to build (a subclass of `SaisaForConditionalGeneration`, e.g. `cls` in a classmethod).
        **config_overrides: any `SaisaConfig` field. Defaults: `vision_feature_layer=-2`, the select strategy that
            drops CLIP's CLS token (`"default"`; `"full"` for SigLIP), and `shared_projector=True` -- one projector
            feeding every layer, the paper's stage-1 "shared MLP" (pass `shared_projector=False` for per-layer ones).

    Returns:
        `(SaisaForConditionalGeneration, SaisaProcessor)`; the tokenizer holds `<image>`, the embeddings have a
        mean-initialised row for it, the projectors are randomly initialised (std = the LM's `initializer_range`).
    """
    from transformers import AutoModel, AutoModelForCausalLM

    from modeling_saisa.configuration import SaisaConfig
    from modeling_saisa.modeling_saisa import SaisaForConditionalGeneration
    from modeling_saisa.processing import SaisaProcessor

    torch_dtype = resolve_dtype(dtype)
    vision_dir = resolve_repo(vision, what="vision", option="vision")
    text_dir = resolve_repo(text, what="text", option="text")

    vision_config = load_vision_config(vision_dir)
    with torch.device("meta"):
        vision_cls = type(AutoModel.from_config(vision_config))
    lm = AutoModelForCausalLM.from_pretrained(text_dir, dtype=torch_dtype or "auto")
    if lm.config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ConversionError(
            f"The text model at {text_dir} is {lm.config.model_type!r}; SAISA supports "
            f"{sorted(SUPPORTED_TEXT_MODEL_TYPES)}."
        )
    torch_dtype = torch_dtype or lm.dtype
    with _quiet_about_the_other_half(vision_cls, vision_dir):
        vision_model = vision_cls.from_pretrained(vision_dir, config=vision_config, dtype=torch_dtype)

    tokenizer = load_tokenizer(text_dir, "text model")
    image_token_id, n_tokens = prepare_tokenizer(tokenizer)
    decoder, lm_head = _text_model_parts(lm)
    old_vocab = decoder.get_input_embeddings().weight.shape[0]
    new_vocab = max(old_vocab, n_tokens, image_token_id + 1)
    tied = bool(lm.config.tie_word_embeddings)
    if new_vocab > old_vocab:
        embed = decoder.get_input_embeddings()
        embed.weight = nn.Parameter(grow_rows(embed.weight.data, new_vocab), requires_grad=embed.weight.requires_grad)
        embed.num_embeddings = new_vocab
        if tied:
            lm_head.weight = embed.weight
        else:
            lm_head.weight = nn.Parameter(grow_rows(lm_head.weight.data, new_vocab))
        lm_head.out_features = new_vocab
        logger.info("Grew the vocabulary from %d to %d; new rows are the mean of the old rows.", old_vocab, new_vocab)
    text_config = lm.config.to_dict()
    text_config["vocab_size"] = new_vocab

    strategy = "default" if VISION_HAS_CLS.get(vision_config.model_type, False) else "full"  # drop CLS, if any
    settings: dict[str, Any] = dict(
        vision_config=vision_config.to_dict(),
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        shared_projector=True,
        tie_word_embeddings=tied,
    )
    settings.update(config_overrides)
    if "image_seq_length" not in config_overrides:
        settings["image_seq_length"] = visual_token_count(vision_config, settings["vision_feature_select_strategy"])
    config = SaisaConfig(**settings)
    config.dtype = torch_dtype

    with torch.device("meta"):
        model = (model_class or SaisaForConditionalGeneration)(config)
    _adopt(model.model.vision_tower, vision_model, "vision")
    _adopt(model.model.language_model, decoder, "text")
    model.lm_head.weight = lm_head.weight
    for projector in model.model.multi_modal_projector:
        projector.to_empty(device=model.lm_head.weight.device)
        model._init_weights(projector)
        projector.to(torch_dtype)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise ConversionError(f"Composition left tensors without values: {leftovers}.")
    if tied:
        model.tie_weights()
    model.eval()

    processor = SaisaProcessor.from_model_config(
        config, tokenizer, chat_template=chat_template, do_pad_to_square=pad_to_square
    )
    return model, processor


def init_projectors_from_shared(model: nn.Module, source: str | os.PathLike | dict[str, torch.Tensor]) -> None:
    """Stage 2's start: copy one shared projector into every per-layer projector of `model` (in place).

    `source` is a state dict with `linear_{1,2}.{weight,bias}`, a `shared_projector.safetensors` file (or a directory
    holding one, as written by `saisa convert --keep-shared-projector`), or a stage-1 SAISA checkpoint directory
    (`shared_projector=True`: its `model.multi_modal_projector.0.*`).
    """
    state = _shared_projector_state(source)
    missing = [k for k in _PROJECTOR_KEYS if k not in state]
    if missing:
        raise ConversionError(f"The shared projector lacks {missing}.")
    projectors = model.model.multi_modal_projector
    with torch.no_grad():
        for projector in projectors:
            for key in _PROJECTOR_KEYS:
                target = projector.get_parameter(key)
                value = state[key]
                if tuple(value.shape) != tuple(target.shape):
                    raise ConversionError(
                        f"Shared projector {key} has shape {list(value.shape)}, the model's {list(target.shape)}."
                    )
                target.copy_(value)
    logger.info("Initialised %d projector(s) from the shared projector.", len(projectors))


def _shared_projector_state(source: str | os.PathLike | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_dir() and (path / SHARED_PROJECTOR_FILE).is_file():
        path = path / SHARED_PROJECTOR_FILE
    if path.is_file():
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    if path.is_dir() and (path / "config.json").is_file():
        from modeling_saisa.checkpoint_io import CheckpointReader, find_weight_files

        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not config.get("shared_projector", False):
            # Copying layer 0's projector into every layer would silently throw the other layers' training away.
            raise ConversionError(
                f"{source} holds per-layer projectors (shared_projector is false: a stage-2 checkpoint), but "
                "--init-projectors-from copies one shared (stage-1) projector into every layer; pass a stage-1 "
                f"checkpoint or a {SHARED_PROJECTOR_FILE}, or continue from this checkpoint with --model."
            )
        prefix = "model.multi_modal_projector.0."
        with CheckpointReader(find_weight_files(path, allow_pickle=False)) as reader:
            return {k.removeprefix(prefix): reader.read(k) for k in reader.refs if k.startswith(prefix)}
    raise FileNotFoundError(
        f"{source}: expected a state dict, a {SHARED_PROJECTOR_FILE} (or a directory holding one), or a stage-1 SAISA "
        "checkpoint directory."
    )
