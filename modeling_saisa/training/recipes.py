"""SAISA's two-stage training recipe on transformers' Trainer (spec §2: the best available reading of the paper).

- Stage 1 (alignment pre-training): the model has ONE shared projector (`config.shared_projector=True`) whose
  output feeds every decoder layer's visual keys/values. Only that projector trains; the vision tower and the LLM
  (embeddings, decoder, LM head) are frozen.
- Stage 2 (instruction tuning): every decoder layer gets its own projector, initialised as a copy of the stage-1
  shared one (`stage2_from_stage1`). The projectors and the LLM train, the vision tower stays frozen — either fully,
  or with LoRA adapters on the LLM's linear layers while the projectors train in full (`LoraSettings`).

Why freezing goes through `requires_grad` only: Trainer builds its optimizer from the parameters that require
grads, checkpoints save every parameter, and the model detaches frozen vision features itself, so no frozen work is
differentiated or recomputed under activation checkpointing. `train_stage` wires data, collator, recipe, precision,
resume and saving together; the `saisa train` command is a thin parser on top of it.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "LORA_TARGET_MODULES",
    "LoraSettings",
    "apply_lora",
    "auto_precision",
    "freeze_for_stage",
    "load_for_stage",
    "merge_lora_checkpoint",
    "parameter_groups",
    "projector_module_names",
    "set_sharding_units",
    "stage2_from_stage1",
    "train_stage",
    "trainable_summary",
    "training_dtype",
]

logger = logging.getLogger(__name__)

# LoRA goes on the LLM's attention and MLP projections only (never on the vision tower, whose CLIP layers also have
# q/k/v_proj, nor on the projectors, which train in full). A regex string is matched by PEFT against full module
# names such as `model.language_model.layers.3.self_attn.q_proj`.
LORA_TARGET_MODULES = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class LoraSettings:
    """LoRA for stage 2: adapters on `target_modules`, the projectors trained in full (`modules_to_save`).

    Defaults follow LLaVA-1.5's LoRA recipe (r 128, alpha 256, dropout 0.05).
    """

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: str | list[str] = LORA_TARGET_MODULES
    extra_modules_to_save: list[str] = field(default_factory=list)


def projector_module_names(model: nn.Module) -> list[str]:
    """`multi_modal_projector.<i>` for every projector: what PEFT must train in full (`modules_to_save`).

    Each projector is named on its own because PEFT wraps the modules it saves, and a wrapped `ModuleList` could no
    longer be indexed by layer.
    """
    return [f"multi_modal_projector.{i}" for i in range(len(_saisa(model).model.multi_modal_projector))]


def _saisa(model: nn.Module) -> nn.Module:
    """The `SaisaForConditionalGeneration` inside a possible PEFT wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def stage2_from_stage1(model: nn.Module) -> nn.Module:
    """A stage-2 model (one projector per decoder layer, each a copy of the shared one) built from a stage-1 model.

    Works on the config and the state dict, so the result is exactly what `from_pretrained` would build from a
    stage-2 checkpoint holding these weights: a fresh model is created on the meta device (no second copy of the
    weights is allocated), the stage-1 tensors are assigned into it, and every per-layer projector gets its own clone
    of the shared projector. Non-persistent buffers (rotary tables, position ids) are carried over as they are.
    The stage-1 model should not be used afterwards: the two share every tensor but the projectors.
    """
    model = _saisa(model)
    config = copy.deepcopy(model.config)
    if not config.shared_projector:
        raise ValueError("stage2_from_stage1 needs a stage-1 model (config.shared_projector=True).")
    config.shared_projector = False
    n_layers = config.text_config.num_hidden_layers
    shared_prefix = "model.multi_modal_projector.0."
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(shared_prefix)}
    for key, value in model.state_dict().items():
        if key.startswith(shared_prefix):
            suffix = key[len(shared_prefix) :]
            for layer in range(n_layers):
                state[f"model.multi_modal_projector.{layer}.{suffix}"] = nn.Parameter(
                    value.detach().clone(), requires_grad=value.requires_grad
                )
    with torch.device("meta"):
        stage2 = type(model)(config)
    stage2.load_state_dict(state, strict=True, assign=True)
    for name, buffer in model.named_buffers():
        owner, _, key = name.rpartition(".")
        target = stage2.get_submodule(owner)
        if target._buffers.get(key) is not None and target._buffers[key].is_meta:
            target._buffers[key] = buffer
    leftovers = [n for n, t in [*stage2.named_parameters(), *stage2.named_buffers()] if t.is_meta]
    if leftovers:
        raise RuntimeError(f"stage2_from_stage1 left tensors uninitialised: {leftovers[:5]}")
    stage2.generation_config = copy.deepcopy(model.generation_config)
    stage2.train(model.training)
    return stage2


def set_sharding_units(model: nn.Module) -> list[str]:
    """Name the module classes FSDP wraps one by one: decoder layers, vision layers and every per-layer projector.

    accelerate's `TRANSFORMER_BASED_WRAP` (and Trainer's `--fsdp auto_wrap`) wrap the classes in the model's
    `_no_split_modules`, and fail if one of them is absent. transformers collects that list from the sub-models'
    classes, so a CLIP vision tower brings `CLIPTextEmbeddings` (listed on all CLIP models, present only in the text
    model): the plain list stops FSDP before it starts. This keeps the classes the model really contains and adds
    the projector class, so each projector is its own unit (sharded, gathered only for its own layer) instead of
    sitting in the root unit, which FSDP keeps gathered through the whole step (32 projectors of a 7B SAISA are
    0.67 B parameters). Sets the list on the model (in place) and returns it; DDP and DeepSpeed ignore it.
    """
    saisa = _saisa(model)
    present = {type(module).__name__ for module in saisa.modules()}
    declared = set(getattr(saisa, "_no_split_modules", None) or [])
    units = sorted((declared & present) | {type(saisa.model.multi_modal_projector[0]).__name__})
    saisa._no_split_modules = units
    return units


def freeze_for_stage(model: nn.Module, stage: int, train_vision: bool = False) -> nn.Module:
    """Set `requires_grad` for `stage` (1: the shared projector only; 2: projectors + LLM), in place.

    `train_vision=True` also unfreezes the vision tower (not part of the paper's recipe; useful when training a
    tower from scratch, as the demo does).
    """
    saisa = _saisa(model)
    if stage == 1 and not saisa.config.shared_projector:
        raise ValueError(
            "Stage 1 trains one shared projector, but this model has per-layer projectors "
            "(config.shared_projector=False). Start stage 1 from a model composed with shared_projector=True "
            "(SaisaForConditionalGeneration.from_vision_text_pretrained), or run stage 2."
        )
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}.")
    for param in saisa.parameters():
        param.requires_grad_(False)
    trainable = [saisa.model.multi_modal_projector]
    if stage == 2:
        trainable += [saisa.model.language_model, saisa.lm_head]
    if train_vision:
        trainable.append(saisa.model.vision_tower)
    for module in trainable:
        for param in module.parameters():
            param.requires_grad_(True)
    return model


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap a stage-2 model with PEFT LoRA adapters on the LLM; projectors train in full and are saved with them."""
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=projector_module_names(model) + list(settings.extra_modules_to_save),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def parameter_groups(model: nn.Module) -> dict[str, tuple[int, int]]:
    """`{group: (trainable, total)}` parameter counts for vision tower, projectors, LLM and LoRA adapters.

    PEFT's `modules_to_save` keeps a frozen `original_module` beside the trained copy of each projector; it is a
    backup for disabling the adapter, not part of the model being trained, so it is not counted (else projectors
    that train in full would read as half trainable).
    """
    groups: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        if "lora_" in name:
            group = "lora"
        elif "vision_tower" in name:
            group = "vision_tower"
        elif "multi_modal_projector" in name:
            group = "projectors"
        else:
            group = "llm"
        counts = groups.setdefault(group, [0, 0])
        counts[0] += param.numel() if param.requires_grad else 0
        counts[1] += param.numel()
    return {group: (trainable, total) for group, (trainable, total) in groups.items()}


def trainable_summary(model: nn.Module) -> str:
    """One line per parameter group, e.g. `projectors: 1.2M / 1.2M trainable` — printed before training starts."""

    def fmt(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"

    return "\n".join(f"{group}: {fmt(t)} / {fmt(n)} trainable" for group, (t, n) in parameter_groups(model).items())


def auto_precision() -> dict[str, bool]:
    """Mixed precision the device supports: bf16 on GPUs that have it, else fp16 on CUDA, else full fp32 (CPU)."""
    if torch.cuda.is_available():
        return {"bf16": True} if torch.cuda.is_bf16_supported() else {"fp16": True}
    return {}


def load_for_stage(
    model_dir: str | os.PathLike,
    stage: int,
    *,
    lora: LoraSettings | None = None,
    train_vision: bool = False,
    init_projectors_from: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a SAISA checkpoint and prepare it for `stage` (convert to per-layer projectors, freeze, LoRA).

    Stage 2 accepts a stage-1 model (its shared projector is copied into every layer), a stage-2 model (training
    continues), or any model plus `init_projectors_from` (a `shared_projector.safetensors` or stage-1 checkpoint
    whose shared projector overwrites every per-layer one).
    """
    from modeling_saisa import SaisaForConditionalGeneration

    kwargs: dict[str, Any] = {"dtype": training_dtype(model_dir, dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = SaisaForConditionalGeneration.from_pretrained(model_dir, **kwargs)
    if lora is not None and stage != 2:
        raise ValueError("LoRA is a stage-2 option: stage 1 trains only the shared projector.")
    if stage == 2:
        if model.config.shared_projector:
            logger.info("Stage 2: copying the shared projector into %d per-layer projectors.", _n_layers(model))
            model = stage2_from_stage1(model)
        if init_projectors_from is not None:
            from modeling_saisa.compose import init_projectors_from_shared

            init_projectors_from_shared(model, init_projectors_from)
    elif init_projectors_from is not None:
        raise ValueError("--init-projectors-from is a stage-2 option.")
    freeze_for_stage(model, stage, train_vision=train_vision)
    set_sharding_units(model)
    if lora is not None:
        model = apply_lora(model, lora)
    return model


LOW_PRECISION = (torch.float16, torch.bfloat16)


def training_dtype(model_dir: str | os.PathLike, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype to train the weights in: float32 unless the caller asks for another one explicitly.

    Why: a checkpoint stored in bf16/fp16 (a converted or composed model usually is) trained in that dtype loses most
    small updates to rounding (after a few stage-2 steps most of `up_proj`'s updates round away). With float32
    master weights, Trainer's `bf16`/`fp16` flags still compute in low precision (autocast), which is the usual
    mixed-precision recipe. An explicit `dtype` (`saisa train --dtype bfloat16`) is honoured, with a warning.
    """
    from modeling_saisa import SaisaConfig

    stored = getattr(SaisaConfig.from_pretrained(model_dir), "dtype", None)
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    if dtype is None:
        if stored in LOW_PRECISION:
            logger.info(
                "The checkpoint is stored in %s; training keeps float32 master weights (Trainer's --bf16/--fp16 "
                "compute in low precision). Pass --dtype %s to train the low-precision weights themselves.",
                str(stored).removeprefix("torch."),
                str(stored).removeprefix("torch."),
            )
        return torch.float32
    if dtype == "auto":  # explicitly "as stored"
        chosen = stored if isinstance(stored, torch.dtype) else torch.float32
    else:
        chosen = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(chosen, torch.dtype):
        raise ValueError(f"--dtype must be a torch dtype name such as float32 or bfloat16; got {dtype!r}.")
    if chosen in LOW_PRECISION:
        logger.warning(
            "Training the weights in %s as asked (--dtype): without float32 master weights, small updates round "
            "away. Leave --dtype out for float32 master weights with mixed precision.",
            str(chosen).removeprefix("torch."),
        )
    return chosen


def _n_layers(model: nn.Module) -> int:
    return _saisa(model).config.text_config.num_hidden_layers


def merge_lora_checkpoint(
    model_dir: str | os.PathLike, adapter_dir: str | os.PathLike, *, train_vision: bool = False
) -> nn.Module:
    """Rebuild the stage-2 base from `model_dir`, load the LoRA adapter and return the merged plain model.

    Why reload instead of merging the live model: under DeepSpeed ZeRO-3 or FSDP the live weights are sharded across
    ranks; the adapter saved by Trainer is whole, and merging it into a freshly loaded base works the same on one
    CPU and on a cluster.
    """
    from peft import PeftModel

    base = load_for_stage(model_dir, 2, train_vision=train_vision)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def train_stage(
    *,
    stage: int,
    model_dir: str | os.PathLike,
    data: str | os.PathLike | Any,
    training_args: Any,
    image_folder: str | os.PathLike | None = None,
    lora: LoraSettings | None = None,
    max_length: int | None = None,
    on_bad: str = "skip",
    train_vision: bool = False,
    init_projectors_from: str | os.PathLike | None = None,
    dtype: str | None = None,
    attn_implementation: str | None = None,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Run one stage end to end and save the result in our format under `training_args.output_dir`.

    `data` is a LLaVA JSON / JSONL path, a `datasets.Dataset` (messages + image columns) or a directory saved with
    `Dataset.save_to_disk`. The final directory holds a plain `SaisaForConditionalGeneration` (LoRA merged; the
    adapter itself is kept under `adapter/`) and the processor, loadable with `from_pretrained`. `callbacks` go to
    Trainer as they are (e.g. to look at the live, possibly sharded model when training ends). Returns Trainer's
    train metrics plus `output_dir`.
    """
    from transformers import AutoProcessor, Trainer

    from modeling_saisa.training.collator import SaisaDataCollator
    from modeling_saisa.training.data import SaisaSupervisedDataset, examples_from_hf, load_llava_json

    processor = AutoProcessor.from_pretrained(model_dir)
    if isinstance(data, (str, os.PathLike)) and os.path.isdir(data):
        import datasets

        data = datasets.load_from_disk(os.fspath(data))
    if isinstance(data, (str, os.PathLike)):
        examples = load_llava_json(data, on_bad=on_bad)
    else:
        examples = examples_from_hf(data)
    dataset = SaisaSupervisedDataset(
        examples, processor, image_folder=image_folder, max_length=max_length, on_bad=on_bad
    )
    model = load_for_stage(
        model_dir,
        stage,
        lora=lora,
        train_vision=train_vision,
        init_projectors_from=init_projectors_from,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    if training_args.process_index == 0:
        logger.info(
            "Stage %d on %d rows (%d skipped).\n%s", stage, len(dataset), len(dataset.bad), trainable_summary(model)
        )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=SaisaDataCollator(processor, max_length=max_length),
        processing_class=processor,
        callbacks=[*(callbacks or []), plain_code_in_checkpoints()],
    )
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    output_dir = training_args.output_dir
    fsdp_plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None and "FULL_STATE_DICT" not in str(fsdp_plugin.state_dict_type):
        # Sharded checkpoints resume fast, but Trainer.save_model writes nothing at all for a sharded state dict:
        # gather the final model whole, so that the output is always one `from_pretrained` directory.
        fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    if lora is None:
        trainer.save_model(output_dir)
        if trainer.is_world_process_zero():
            _undo_fsdp_class_in_saved_code(trainer.model, output_dir)
    else:
        adapter_dir = os.path.join(output_dir, "adapter")
        trainer.save_model(adapter_dir)
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            merged = merge_lora_checkpoint(model_dir, adapter_dir, train_vision=train_vision)
            merged.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()
    return {**result.metrics, "output_dir": output_dir, "skipped_rows": len(dataset.bad)}


def plain_code_in_checkpoints() -> Any:
    """A Trainer callback giving every intermediate `checkpoint-N/` SAISA's code and `auto_map`, as the final save.

    Under FSDP2 Trainer saves checkpoints from the FSDP-swapped class (see `_undo_fsdp_class_in_saved_code`);
    `on_save` runs right after each checkpoint is written (transformers 5.x `Trainer._save_checkpoint`).
    """
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class PlainCodeInCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if state.is_world_process_zero and model is not None and os.path.isfile(f"{checkpoint}/config.json"):
                _undo_fsdp_class_in_saved_code(model, checkpoint)

    return PlainCodeInCheckpoints()


def _undo_fsdp_class_in_saved_code(model: nn.Module, output_dir: str | os.PathLike) -> None:
    """Point a saved model's `auto_map` back at SAISA's class after FSDP2 swapped the live model's class.

    FSDP2's `fully_shard` turns the model's class into `FSDP<Class>` (a subclass defined in torch), and
    `save_pretrained` writes the code of `type(model)`: torch's `_fsdp_*.py` files land in the output and
    `auto_map` names `_fsdp_init.FSDPSaisaForConditionalGeneration`, so `trust_remote_code` loading would break.
    This removes those files and writes SAISA's own code and `auto_map` entry, as an unsharded save would.
    """
    import inspect
    import json

    from transformers.dynamic_module_utils import custom_object_save

    live_class = type(model)
    if not live_class.__name__.startswith("FSDP") or len(live_class.__bases__) < 2:
        return
    plain_class = live_class.__bases__[-1]
    if getattr(plain_class, "_auto_class", None) is None:
        return
    stray = {name for name in os.listdir(os.path.dirname(inspect.getfile(live_class))) if name.endswith(".py")}
    for name in stray & set(os.listdir(output_dir)):
        os.remove(os.path.join(output_dir, name))
    config_file = os.path.join(output_dir, "config.json")
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    config.get("auto_map", {}).pop(plain_class._auto_class, None)
    # custom_object_save reads only the class of what it is given: an uninitialised instance is enough.
    custom_object_save(plain_class.__new__(plain_class), output_dir, config=config)
    staged = f"{config_file}.tmp"
    with open(staged, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(staged, config_file)
