"""Convert checkpoints into the SAISA layout: the original SAISA release, and transformers' own Llava (llava-hf).

Both converters stream: every tensor is read, renamed, maybe cast or grown, and written before the next one is read
(see `checkpoint_io`), so a 7B conversion needs little more than the interpreter plus two tensors of RAM. Every
source key must be accounted for (used, or dropped for a stated reason) and every key of the SAISA model must be
produced with the right shape, else the conversion fails *before writing* with the lists. The output directory is
written atomically: a failure leaves nothing at OUT.

The original layout (spec §4): a `llava_llama` config with `mm_*` fields, Llama weights under `model.*`, one
projector per decoder layer at `model.layers.{i}.mm_projector.{0,2}`, a global stage-1 projector at
`model.mm_projector.{0,2}` (dead at inference), and optionally the CLIP tower at `model.vision_tower.vision_tower.*`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from modeling_saisa.backbones import SUPPORTED_TEXT_MODEL_TYPES, SUPPORTED_VISION_MODEL_TYPES, VISION_HAS_CLS
from modeling_saisa.checkpoint_io import (
    CheckpointReader,
    OutputTensor,
    atomic_output_dir,
    find_weight_files,
    resolve_repo,
    write_safetensors_file,
    write_safetensors_shards,
)

__all__ = [
    "KNOWN_VISION_TOWERS",
    "LOADING_ONLY_TOKENIZER_KEYS",
    "SHARED_PROJECTOR_FILE",
    "ConversionError",
    "convert_from_llava",
    "convert_original_checkpoint",
    "fill_mean_rows",
    "grow_rows",
    "hold_logs",
    "load_tokenizer",
    "load_vision_config",
    "prepare_tokenizer",
    "visual_token_count",
]

logger = logging.getLogger(__name__)

#: With `keep_shared_projector=True` the original global projector is written here, beside the model weights, as the
#: state dict of one `SaisaMultiModalProjector` (`linear_1.weight`, `linear_1.bias`, `linear_2.weight`,
#: `linear_2.bias`). It is not part of the model (inference never uses it); stage-2 initialisation loads it into
#: every per-layer projector (`modeling_saisa.compose.init_projectors_from_shared`).
SHARED_PROJECTOR_FILE = "shared_projector.safetensors"

#: Vision configs of the towers the original SAISA names, for checkpoints that carry the tower's weights but whose
#: `mm_vision_tower` cannot be fetched (offline). Values from the public `config.json` of those repos.
_CLIP_VIT_L14: dict[str, Any] = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_VIT_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_VIT_L14, "image_size": 224},
}

ORIGINAL_MODEL_TYPES = ("llava_llama",)
# Buffers that old transformers versions saved and current ones recompute: present in some checkpoints, never needed.
_RECOMPUTED_BUFFERS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|embeddings\.position_ids)$")
# Config fields of the original `llava_llama` config that describe the LLM (everything else is LLaVA/SAISA's).
_LLM_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "tie_word_embeddings",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
    "head_dim",
)
_SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConversionError(ValueError):
    """The source cannot be converted as asked; the message says what is wrong and what to pass instead."""


# ----------------------------------------------------------------------------------------------------------------
# Small pieces shared by the converters and `compose`


def fill_mean_rows(weight: torch.Tensor, old_rows: int, chunk: int = 1024) -> torch.Tensor:
    """Set rows `old_rows:` of `weight` (in place) to the mean of rows `:old_rows`, accumulated in float32 over chunks
    (so a half-precision 128k x 4096 embedding never needs a float32 copy of itself). Returns `weight`."""
    if old_rows < 1:
        raise ValueError("Cannot take the mean of zero rows.")
    total = torch.zeros(weight.shape[1:], dtype=torch.float32)
    for start in range(0, old_rows, chunk):
        total += weight[start : min(start + chunk, old_rows)].float().sum(dim=0)
    if weight.shape[0] > old_rows:
        weight[old_rows:] = (total / old_rows).to(weight.dtype)
    return weight


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` `[V, h]` with rows appended up to `rows`, each the mean of the old rows.

    Why the mean: a new token's embedding (and lm_head row) then sits in the middle of the learnt distribution, so
    it neither dominates nor vanishes from the logits. transformers' `resize_token_embeddings(mean_resizing=True)`
    does the same up to a sample from N(mean, 1e-9 * covariance); we take the mean itself so that a conversion is
    reproducible bit for bit. (The `<image>` row of the embedding is never read by SAISA: placeholders carry no
    embedding. Its lm_head row only decides how likely the model is to *predict* `<image>`.)
    """
    if rows < weight.shape[0]:
        raise ValueError(f"Cannot shrink {tuple(weight.shape)} to {rows} rows.")
    if rows == weight.shape[0]:
        return weight
    grown = torch.empty((rows, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    grown[: weight.shape[0]] = weight
    return fill_mean_rows(grown, weight.shape[0])


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).removeprefix("torch.")
    if key not in _DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(_DTYPES)}; got {dtype!r}.")
    return _DTYPES[key]


def load_vision_config(directory: Path):
    """The vision-encoder config in `directory`: a vision model's own, or the `vision_config` of a full CLIP/SigLIP."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    if config.model_type not in SUPPORTED_VISION_MODEL_TYPES and getattr(config, "vision_config", None) is not None:
        config = config.vision_config
    if config.model_type not in SUPPORTED_VISION_MODEL_TYPES:
        raise ConversionError(
            f"The vision tower at {directory} is a {config.model_type!r} model; SAISA supports "
            f"{sorted(SUPPORTED_VISION_MODEL_TYPES)} (or a full CLIP/SigLIP checkpoint that contains one)."
        )
    return config


def _vision_config_from_dict(values: dict[str, Any]):
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _vision_disk_prefix(vision_config) -> str:
    """The prefix transformers puts in front of the vision model's own keys on disk (`vision_model.` for CLIP and
    SigLIP): in memory it is stripped by a load-time renaming, and checkpoints written with it load and re-save
    unchanged. We write the on-disk form so that OUT looks like every CLIP / llava-hf checkpoint."""
    from transformers import AutoModel

    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # a transformers without load-time renamings keeps the prefix in memory
        return ""
    with torch.device("meta"):
        cls_name = type(AutoModel.from_config(vision_config)).__name__
    for transform in get_checkpoint_conversion_mapping(cls_name) or []:
        if isinstance(transform, PrefixChange) and transform.prefix_to_remove and not transform.model_prefix:
            return transform.prefix_to_remove + "."
    return ""


def _strip_vision_prefix(key: str) -> str:
    """A vision-model key in its in-memory form (no `vision_model.`), whichever way the source wrote it."""
    return key.removeprefix("vision_model.")


def _expected_state(config) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the SAISA model's state dict for `config` (built on the meta device: no memory)."""
    from modeling_saisa.modeling_saisa import SaisaForConditionalGeneration

    with torch.device("meta"):
        model = SaisaForConditionalGeneration(config)
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: saved once, as the input embedding
    return state


def _check_plan(
    planned: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    unused: list[str],
    source_name: Callable[[str], str] = lambda name: name,
) -> None:
    """Refuse a partial or inconsistent model: name every missing, unexpected, unused or mis-shaped tensor.

    Names are the source checkpoint's (`source_name` maps a SAISA name back), because the user looks for them in
    the source's files, not in a model that was never written.
    """
    missing = sorted(source_name(name) for name in set(expected) - set(planned))
    unexpected = sorted(source_name(name) for name in set(planned) - set(expected))
    shapes = sorted(
        f"{source_name(name)}: checkpoint {list(planned[name])} vs model {list(expected[name])}"
        for name in set(planned) & set(expected)
        if tuple(planned[name]) != tuple(expected[name])
    )
    problems = []
    if missing:
        problems.append(f"missing from the source ({len(missing)}): {missing}")
    if unexpected or unused:
        problems.append(f"unexpected in the source ({len(unexpected) + len(unused)}): {sorted(unused) + unexpected}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {shapes}")
    if problems:
        raise ConversionError(
            "The checkpoint does not match the SAISA model it describes (nothing was written); " + "; ".join(problems)
        )


class _HeldRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def hold_logs(held_logger: logging.Logger) -> Iterator[Callable[[], None]]:
    """Hold `held_logger`'s records until the caller releases them (the function yielded); drop them on error.

    Why: the planning steps log what they will do ("Growing embed_tokens...", "Vision tower weights: from SRC");
    shown before a consistency check that then fails, they read as work that was done.
    """
    handler = _HeldRecords()
    propagate = held_logger.propagate
    held_logger.addHandler(handler)
    held_logger.propagate = False
    holding = True

    def release() -> None:
        nonlocal holding
        if holding:
            held_logger.removeHandler(handler)
            held_logger.propagate = propagate
            holding = False
            for record in handler.records:
                held_logger.handle(record)

    try:
        yield release
    finally:
        if holding:  # an error before release: the planned steps never happened
            held_logger.removeHandler(handler)
            held_logger.propagate = propagate


def _cast_to(dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.dtype != dtype else t

    return cast


class _Planner:
    """Collects output tensors with their sources and transforms; validates and writes them in source order."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self.entries: list[tuple[tuple[int, int, int], OutputTensor]] = []
        # Vision-model keys are planned in their in-memory form and written with transformers' on-disk prefix.
        self.vision_disk_prefix = ""

    def add(
        self, name: str, reader: CheckpointReader, source: str, *, rank: int = 0, grow_to: int | None = None
    ) -> None:
        """Plan `name` from `source`; `grow_to`: append mean rows up to that many (embeddings, lm_head)."""
        ref = reader.refs[source]
        cast = _cast_to(self.dtype)
        out_dtype = self.dtype if self.dtype is not None and ref.dtype.is_floating_point else ref.dtype
        shape = ref.shape if grow_to is None else (max(grow_to, ref.shape[0]), *ref.shape[1:])

        def produce() -> torch.Tensor:
            value = reader.read(source, rows=grow_to)
            if grow_to is not None:
                fill_mean_rows(value, ref.shape[0])
            return cast(value)

        self.entries.append(((rank, *reader.order(source)), OutputTensor(name, shape, out_dtype, produce)))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape for _, t in self.entries}

    def ordered(self) -> list[OutputTensor]:
        """The planned tensors in reading order, under their on-disk names."""
        tensors = []
        for _, t in sorted(self.entries, key=lambda e: e[0]):
            if t.name.startswith("model.vision_tower."):
                name = "model.vision_tower." + self.vision_disk_prefix + t.name.removeprefix("model.vision_tower.")
                t = dataclasses.replace(t, name=name)
            tensors.append(t)
        return tensors


def _write_model(
    tmp: Path,
    tensors: list[OutputTensor],
    *,
    max_shard_size: int | str,
    desc: str,
) -> None:
    total = sum(t.nbytes for t in tensors)
    with tqdm(total=len(tensors), unit="tensor", desc=desc, disable=None) as bar:

        def tick(t: OutputTensor) -> None:
            bar.set_postfix_str(t.name[-48:], refresh=False)
            bar.update(1)

        files = write_safetensors_shards(tmp, tensors, max_shard_size=max_shard_size, on_tensor=tick)
    logger.info("Wrote %d tensors (%.1f MB) in %s.", len(tensors), total / 1e6, ", ".join(files))


#: `from_pretrained` arguments that tokenizers keep in `init_kwargs` and would write to tokenizer_config.json.
LOADING_ONLY_TOKENIZER_KEYS = ("is_local", "local_files_only", "_commit_hash")


def load_tokenizer(directory: Path, what: str, config=None):
    """`config` stands in for the directory's config.json where transformers cannot read that (`llava_llama`)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **({"config": config} if config is not None else {}))
    except Exception as err:  # the causes are many (missing files, sentencepiece not installed); say which
        raise ConversionError(
            f"Could not load the tokenizer of the {what} at {directory} ({type(err).__name__}: {err}). Tokenizers "
            "stored only as a SentencePiece tokenizer.model need `pip install sentencepiece protobuf`."
        ) from err
    # How it was loaded (a local folder, offline) is no property of the tokenizer: saved, these keys would make
    # the output's tokenizer_config.json differ from what save_pretrained writes for the same tokenizer.
    for key in LOADING_ONLY_TOKENIZER_KEYS:
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def prepare_tokenizer(tokenizer) -> tuple[int, int]:
    """Add `<image>` (and a pad token if there is none); return (image token id, tokenizer length)."""
    from modeling_saisa.tokenizers import add_image_token

    if tokenizer.pad_token is None:
        # Batched generation pads; reuse an existing token rather than growing the vocabulary a second time.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        logger.info("The tokenizer has no pad token: using %r for padding.", tokenizer.pad_token)
    before = len(tokenizer)
    image_token_id = add_image_token(tokenizer)
    if len(tokenizer) > before:
        logger.info("Added '<image>' to the tokenizer as id %d.", image_token_id)
    return image_token_id, len(tokenizer)


def _save_side_files(tmp: Path, config, processor, generation_source: Path | None) -> None:
    """config.json, generation_config.json and the processor files (tokenizer, image processor, chat template).

    The result has the shape `save_pretrained` gives a SAISA model: `architectures`, an `auto_map` for AutoConfig
    and AutoModelForImageTextToText, and both defining modules beside it, so that `trust_remote_code=True` loads a
    converted directory without `import modeling_saisa`, exactly as it loads a saved one.
    """
    from transformers import GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    from modeling_saisa.modeling_saisa import SaisaForConditionalGeneration

    with torch.device("meta"):  # only the class and its auto-class registration are needed: no memory
        model = SaisaForConditionalGeneration(config)
    config.architectures = [type(model).__name__]
    custom_object_save(model, tmp, config=config)
    config.save_pretrained(tmp)
    generation = None
    if generation_source is not None and (generation_source / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(generation_source)
    if generation is None:
        generation = GenerationConfig.from_model_config(config.text_config)
    if generation.pad_token_id is None and processor.tokenizer.pad_token_id is not None:
        generation.pad_token_id = processor.tokenizer.pad_token_id
    generation.save_pretrained(tmp)
    processor.save_pretrained(tmp)


def visual_token_count(vision_config, strategy: str) -> int:
    n = (vision_config.image_size // vision_config.patch_size) ** 2 + int(VISION_HAS_CLS.get(vision_config.model_type))
    return n - 1 if strategy == "default" else n


def _weight_patterns(weights: bool, allow_pickle: bool) -> list[str]:
    """What to download from the hub: configs and tokenizer always, weights only when they will be read."""
    patterns = ["*.json", "*.model", "*.txt", "*.jinja"]
    if weights:
        patterns.append("*.safetensors")
        if allow_pickle:
            patterns.append("*.bin")
    return patterns


# ----------------------------------------------------------------------------------------------------------------
# Original SAISA


_PER_LAYER_PROJECTOR = re.compile(r"model\.layers\.(\d+)\.mm_projector\.(0|2)\.(weight|bias)")
_GLOBAL_PROJECTOR = re.compile(r"model\.mm_projector\.(0|2)\.(weight|bias)")
_ORIGINAL_VISION = "model.vision_tower.vision_tower."


def _original_source_name(name: str, vision_in_src: bool) -> str:
    """The original checkpoint's key for a SAISA name (the inverse of `_original_name`), for error messages."""
    m = re.fullmatch(r"model\.multi_modal_projector\.(\d+)\.linear_(1|2)\.(weight|bias)", name)
    if m:
        layer, index, kind = m.groups()
        return f"model.layers.{layer}.mm_projector.{0 if index == '1' else 2}.{kind}"
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.startswith("model.vision_tower."):
        rest = name.removeprefix("model.vision_tower.")
        return _ORIGINAL_VISION + "vision_model." + rest if vision_in_src else f"{rest} (vision tower)"
    return name


def _original_name(key: str) -> str | None:
    """The SAISA (in-memory) name of an original LLM / per-layer projector key, or None if it is not one."""
    m = _PER_LAYER_PROJECTOR.fullmatch(key)
    if m:
        layer, index, kind = m.groups()
        return f"model.multi_modal_projector.{layer}.linear_{1 if index == '0' else 2}.{kind}"
    if key.startswith(("model.layers.", "model.embed_tokens.", "model.norm.")):
        return "model.language_model." + key.removeprefix("model.")
    if key == "lm_head.weight":
        return key
    return None


def convert_original_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    chat_template: str = "vicuna_v1",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    keep_shared_projector: bool = False,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Convert an original SAISA checkpoint (yuanqianhao/saisa-vicuna, yuanqianhao/saisa-llama3 layout) to OUT.

    Args:
        src: local directory or hub repo id of the original checkpoint (`model_type: "llava_llama"`).
        out: output directory; must not exist (or be empty). Written atomically.
        vision_tower: directory or hub id of the CLIP tower, used when SRC has no `model.vision_tower.vision_tower.*`
            weights (the usual case). Defaults to the original config's `mm_vision_tower`.
        chat_template: `"vicuna_v1"` (saisa-vicuna) or `"llama_3"` (saisa-llama3), or a Jinja template string.
        dtype: `"float32"`, `"float16"` or `"bfloat16"`; None keeps the dtype of the LLM weights in SRC (the vision
            tower is cast to it too, as the original runs it).
        allow_pickle: read `pytorch_model*.bin` files (pickles can run code: only for sources you trust).
        keep_shared_projector: also write the global stage-1 projector `model.mm_projector` to
            `OUT/shared_projector.safetensors` (see `SHARED_PROJECTOR_FILE`); by default it is dropped.
        max_shard_size: output shard size (bytes or a string such as `"5GB"`).

    Returns:
        The path of OUT, loadable with `SaisaForConditionalGeneration.from_pretrained` and `AutoProcessor`.
    """
    from transformers import LlamaConfig

    from modeling_saisa.configuration import SaisaConfig
    from modeling_saisa.processing import SaisaProcessor

    dtype = resolve_dtype(dtype)
    out = _check_out(out)
    src_dir = resolve_repo(src, what="SRC", option="SRC", allow_patterns=_weight_patterns(True, allow_pickle))
    original = _read_original_config(src_dir)
    strategy = _SELECT_FEATURE[original.get("mm_vision_select_feature", "patch")]

    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(
            CheckpointReader(find_weight_files(src_dir, allow_pickle=allow_pickle, what="SRC"))
        )
        release_logs = stack.enter_context(hold_logs(logging.getLogger("modeling_saisa")))
        keys = list(reader.refs)
        has_vision = any(k.startswith(_ORIGINAL_VISION) for k in keys)
        vision_config, vision_dir = _original_vision_source(original, vision_tower, has_vision, allow_pickle)

        # --- tokenizer and vocabulary: `<image>` is appended, the embeddings grow to match
        llm = {k: original[k] for k in _LLM_FIELDS if original.get(k) is not None}
        tokenizer = load_tokenizer(src_dir, "SRC", config=LlamaConfig.from_dict(llm))
        image_token_id, n_tokens = prepare_tokenizer(tokenizer)
        embed_key, head_key = "model.embed_tokens.weight", "lm_head.weight"
        if embed_key not in reader.refs:
            raise ConversionError(f"SRC has no {embed_key}; is it a LLaVA/SAISA checkpoint?")
        old_vocab = reader.refs[embed_key].shape[0]
        new_vocab = max(old_vocab, n_tokens, image_token_id + 1)
        if new_vocab > old_vocab:
            logger.info(
                "Growing embed_tokens and lm_head from %d to %d rows; new rows are the mean of the old rows.",
                old_vocab,
                new_vocab,
            )
        if dtype is None:
            dtype = reader.refs[embed_key].dtype

        # --- config and processor
        projector_in = reader.refs.get("model.layers.0.mm_projector.0.weight")
        if projector_in is not None and projector_in.shape[1] != vision_config.hidden_size:
            raise ConversionError(
                f"The projectors take {projector_in.shape[1]}-wide features (from the weights), but the vision tower "
                f"has hidden_size {vision_config.hidden_size}: --vision-tower / mm_vision_tower names the wrong tower."
            )
        config = SaisaConfig(
            vision_config=vision_config.to_dict(),
            text_config=LlamaConfig.from_dict({**llm, "vocab_size": new_vocab}).to_dict(),
            image_token_id=image_token_id,
            image_seq_length=visual_token_count(vision_config, strategy),
            vision_feature_layer=int(original.get("mm_vision_select_layer", -2)),
            vision_feature_select_strategy=strategy,
            projector_hidden_act="gelu",
            multimodal_projector_bias=True,
            shared_projector=False,
            tie_word_embeddings=bool(original.get("tie_word_embeddings", False)),
        )
        config.dtype = dtype
        processor = SaisaProcessor.from_model_config(
            config,
            tokenizer,
            chat_template=chat_template,
            do_pad_to_square=original.get("image_aspect_ratio", "pad") == "pad",
        )

        # --- plan every output tensor; account for every source key
        planner = _Planner(dtype)
        unused: list[str] = []
        shared: list[str] = []
        for key in keys:
            name = _original_name(key)
            if _RECOMPUTED_BUFFERS.search(key):
                continue
            if key == head_key and config.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if key in (embed_key, head_key):
                planner.add(name, reader, key, grow_to=new_vocab)
            elif name is not None:
                planner.add(name, reader, key)
            elif _GLOBAL_PROJECTOR.fullmatch(key):
                shared.append(key)
            elif key.startswith(_ORIGINAL_VISION):
                vision_name = _strip_vision_prefix(key.removeprefix(_ORIGINAL_VISION))
                planner.add("model.vision_tower." + vision_name, reader, key)
            else:
                unused.append(key)
        if has_vision:
            logger.info("Vision tower weights: from SRC (%s*).", _ORIGINAL_VISION)
        else:
            vision_files = find_weight_files(vision_dir, allow_pickle=allow_pickle, what="vision tower")
            _plan_vision(planner, stack.enter_context(CheckpointReader(vision_files)))
            logger.info("Vision tower weights: from %s.", vision_dir)
        if shared and len(shared) != 4:
            unused.extend(shared)  # a partial global projector is a broken checkpoint, not something to drop
        _check_plan(
            planner.shapes(),
            _expected_state(config),
            unused,
            source_name=lambda name: _original_source_name(name, has_vision),
        )
        release_logs()
        planner.vision_disk_prefix = _vision_disk_prefix(vision_config)

        if shared and not keep_shared_projector:
            logger.info(
                "Dropping the global projector model.mm_projector (the stage-1 shared projector; unused at "
                "inference, where every layer uses its own). Pass --keep-shared-projector to keep it."
            )
        elif keep_shared_projector and not shared:
            logger.warning("--keep-shared-projector: SRC has no global projector model.mm_projector to keep.")
        with atomic_output_dir(out) as tmp:
            _write_model(tmp, planner.ordered(), max_shard_size=max_shard_size, desc="converting")
            if shared and keep_shared_projector:
                _write_shared_projector(tmp, reader, dtype)
            _save_side_files(tmp, config, processor, src_dir)
    logger.info("Converted %s -> %s", src, out)
    return out


def _check_out(out: str | os.PathLike) -> Path:
    """Fail before any work if OUT is taken (`atomic_output_dir` checks again right before writing)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"Output {out} already exists and is not an empty directory; remove it or pick another.")
    return out


def _read_original_config(src_dir: Path) -> dict[str, Any]:
    """SRC's config.json, refused early (before any tensor is touched) if it describes something SAISA cannot be."""
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"SRC {src_dir} has no config.json; is it a SAISA checkpoint directory?")
    original = json.loads(config_path.read_text())
    model_type = original.get("model_type")
    if model_type not in ORIGINAL_MODEL_TYPES:
        hint = " It looks like a transformers Llava checkpoint: use --from-llava." if model_type == "llava" else ""
        raise ConversionError(
            f"SRC {src_dir} has model_type {model_type!r}; the original SAISA layout has {ORIGINAL_MODEL_TYPES}.{hint}"
        )
    projector_type = original.get("mm_projector_type", "mlp2x_gelu")
    if projector_type != "mlp2x_gelu":
        raise ConversionError(
            f"mm_projector_type={projector_type!r} is not supported: SAISA projectors are 'mlp2x_gelu' "
            "(Linear -> GELU -> Linear)."
        )
    if original.get("mm_use_im_start_end", False):
        raise ConversionError("mm_use_im_start_end=True (image start/end tokens) is not supported by SAISA.")
    aspect = original.get("image_aspect_ratio", "pad")
    if aspect not in ("pad", "square", "resize", None):
        raise ConversionError(f"image_aspect_ratio={aspect!r} is not supported (only 'pad' and plain resizing).")
    select_feature = original.get("mm_vision_select_feature", "patch")
    if select_feature not in _SELECT_FEATURE:
        raise ConversionError(f"mm_vision_select_feature={select_feature!r} is not supported ('patch' or 'cls_patch').")
    return original


def _original_vision_source(
    original: dict[str, Any], vision_tower: str | os.PathLike | None, has_vision: bool, allow_pickle: bool
):
    """(vision config, directory to read the tower's weights from or None when SRC holds them).

    Order: SRC's own `model.vision_tower.vision_tower.*` weights, else `--vision-tower`, else the config's
    `mm_vision_tower` (a path or hub id). The config comes from `--vision-tower` / `mm_vision_tower`; when SRC holds
    the weights and neither is reachable, from `KNOWN_VISION_TOWERS`. Only configs are downloaded when the weights
    are in SRC.
    """
    mm_name = original.get("mm_vision_tower") or original.get("vision_tower")
    patterns = _weight_patterns(not has_vision, allow_pickle)
    if vision_tower is not None:
        vision_dir = resolve_repo(vision_tower, what="--vision-tower", option="--vision-tower", allow_patterns=patterns)
        return load_vision_config(vision_dir), vision_dir
    if not mm_name:
        if not has_vision:
            raise FileNotFoundError(
                "SRC has no vision tower weights (model.vision_tower.vision_tower.*) and its config names no "
                "mm_vision_tower: pass --vision-tower DIR_OR_ID (e.g. openai/clip-vit-large-patch14-336)."
            )
        raise FileNotFoundError(
            "SRC holds the vision tower's weights but its config names no mm_vision_tower to take the tower's "
            "config from: pass --vision-tower DIR_OR_ID (a checkpoint of the same tower; only its config is read)."
        )
    try:
        vision_dir = resolve_repo(
            mm_name, what="mm_vision_tower (from SRC's config)", option="--vision-tower", allow_patterns=patterns
        )
    except (FileNotFoundError, NotADirectoryError) as err:
        if not (has_vision and mm_name in KNOWN_VISION_TOWERS):
            what = "its vision tower's config" if has_vision else "the vision tower"
            raise FileNotFoundError(
                f"SRC's mm_vision_tower {mm_name!r} is not available to provide {what}: {err} Pass --vision-tower "
                f"DIR_OR_ID (e.g. a local copy of {mm_name})."
            ) from err
        logger.info("Using the known config of %s for the vision tower weights stored in SRC.", mm_name)
        return _vision_config_from_dict(KNOWN_VISION_TOWERS[mm_name]), None
    return load_vision_config(vision_dir), (None if has_vision else vision_dir)


def _plan_vision(planner: _Planner, reader: CheckpointReader, *, rank: int = 1) -> None:
    """Add a vision model's tensors from its own checkpoint (a vision model, or a full CLIP/SigLIP: text parts
    skipped). `rank` puts them after the LLM in the output, i.e. in a file of their own when sharded."""
    skipped = 0
    for key in reader.refs:
        if _RECOMPUTED_BUFFERS.search(key):
            continue
        if key.startswith("vision_model.") or not key.startswith(
            ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "logit_bias")
        ):
            planner.add("model.vision_tower." + _strip_vision_prefix(key), reader, key, rank=rank)
        else:
            skipped += 1
    if skipped:
        logger.info("Skipped %d text-side tensors of the full vision-language checkpoint.", skipped)


def _write_shared_projector(tmp: Path, reader: CheckpointReader, dtype: torch.dtype | None) -> None:
    names = {
        "model.mm_projector.0.weight": "linear_1.weight",
        "model.mm_projector.0.bias": "linear_1.bias",
        "model.mm_projector.2.weight": "linear_2.weight",
        "model.mm_projector.2.bias": "linear_2.bias",
    }
    planner = _Planner(dtype)
    for key, name in names.items():
        planner.add(name, reader, key)
    write_safetensors_file(tmp / SHARED_PROJECTOR_FILE, planner.ordered())
    logger.info(
        "Kept the global projector model.mm_projector in %s (for stage-2 initialisation).", SHARED_PROJECTOR_FILE
    )


# ----------------------------------------------------------------------------------------------------------------
# transformers Llava (llava-hf)


def _llava_name(key: str) -> str | None:
    """In-memory SAISA-side name of a Llava key, in either the llava-hf hub layout or transformers 5's in-memory one.
    Projector keys come back as `model.multi_modal_projector.<rest>` (replicated by the caller)."""
    for old, new in (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("model.language_model.", "model.language_model."),
        ("lm_head.", "lm_head."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if key.startswith(old):
            return new + key.removeprefix(old)
    for prefix in ("vision_tower.", "model.vision_tower."):
        if key.startswith(prefix):
            return "model.vision_tower." + _strip_vision_prefix(key.removeprefix(prefix))
    return None


def convert_from_llava(
    src: str | os.PathLike,
    out: str | os.PathLike,
    chat_template: str = "vicuna_v1",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    shared_projector: bool = False,
    pad_to_square: bool = True,
    *,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Turn a transformers Llava checkpoint (e.g. llava-hf/llava-1.5-7b-hf) into a SAISA stage-2 starting point.

    The vision tower and the LLM are reused unchanged; every per-layer projector starts as a copy of llava's
    `multi_modal_projector` (so layer l's visual K/V come from the same features LLaVA fed its first layer). With
    `shared_projector=True` a single shared projector is written instead (the stage-1 layout).

    Args:
        chat_template: the SAISA prompt to bundle (`"vicuna_v1"` matches LLaVA-1.5's own prompt).
        pad_to_square: LLaVA-1.5's training recipe pads images to a square (llava-hf's processor does not); SAISA's
            recipe pads, so this defaults to True.
        Others: as in `convert_original_checkpoint`.
    """
    from transformers import AutoConfig

    from modeling_saisa.configuration import SaisaConfig
    from modeling_saisa.processing import SaisaProcessor

    dtype = resolve_dtype(dtype)
    out = _check_out(out)
    src_dir = resolve_repo(src, what="SRC", option="SRC", allow_patterns=_weight_patterns(True, allow_pickle))
    config_path = src_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"SRC {src_dir} has no config.json; is it a Llava checkpoint directory?")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "llava":
        hint = (
            " It looks like an original SAISA checkpoint: convert it without --from-llava."
            if model_type in (ORIGINAL_MODEL_TYPES)
            else ""
        )
        raise ConversionError(f"SRC {src_dir} has model_type {model_type!r}; --from-llava expects 'llava'.{hint}")
    llava = AutoConfig.from_pretrained(src_dir)
    text_config, vision_config = llava.text_config, llava.vision_config
    if text_config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ConversionError(
            f"The Llava's LLM is {text_config.model_type!r}; SAISA supports {sorted(SUPPORTED_TEXT_MODEL_TYPES)}."
        )
    if vision_config.model_type not in SUPPORTED_VISION_MODEL_TYPES:
        raise ConversionError(
            f"The Llava's vision tower is {vision_config.model_type!r}; SAISA supports "
            f"{sorted(SUPPORTED_VISION_MODEL_TYPES)}."
        )
    if not isinstance(llava.vision_feature_layer, int):
        raise ConversionError(
            f"vision_feature_layer={llava.vision_feature_layer!r}: SAISA reads a single vision layer."
        )

    tokenizer = load_tokenizer(src_dir, "SRC")
    image_token_id, n_tokens = prepare_tokenizer(tokenizer)
    if image_token_id != llava.image_token_id:
        raise ConversionError(
            f"The tokenizer's '<image>' is id {image_token_id} but the Llava config says image_token_id="
            f"{llava.image_token_id}."
        )

    with CheckpointReader(find_weight_files(src_dir, allow_pickle=allow_pickle, what="SRC")) as reader:
        named = {key: _llava_name(key) for key in reader.refs if not _RECOMPUTED_BUFFERS.search(key)}
        embed = next((k for k, n in named.items() if n == "model.language_model.embed_tokens.weight"), None)
        if embed is None:
            raise ConversionError("SRC has no language-model input embedding; is it a Llava checkpoint?")
        old_vocab, hidden = reader.refs[embed].shape
        new_vocab = max(old_vocab, n_tokens, image_token_id + 1)
        if dtype is None:
            dtype = reader.refs[embed].dtype
        text = text_config.to_dict()
        text["vocab_size"] = new_vocab
        config = SaisaConfig(
            vision_config=vision_config.to_dict(),
            text_config=text,
            image_token_id=image_token_id,
            image_seq_length=visual_token_count(vision_config, llava.vision_feature_select_strategy),
            vision_feature_layer=llava.vision_feature_layer,
            vision_feature_select_strategy=llava.vision_feature_select_strategy,
            projector_hidden_act=llava.projector_hidden_act,
            multimodal_projector_bias=llava.multimodal_projector_bias,
            shared_projector=shared_projector,
            tie_word_embeddings=llava.tie_word_embeddings,
        )
        config.dtype = dtype
        processor = SaisaProcessor.from_model_config(
            config, tokenizer, chat_template=chat_template, do_pad_to_square=pad_to_square
        )

        planner = _Planner(dtype)
        unused = []
        n_projectors = 1 if shared_projector else text_config.num_hidden_layers
        for key, name in named.items():
            if name is None:
                unused.append(key)
            elif name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
                planner.add(name, reader, key, grow_to=new_vocab)
            elif name.startswith("model.multi_modal_projector."):
                rest = name.removeprefix("model.multi_modal_projector.")
                for layer in range(n_projectors):
                    planner.add(f"model.multi_modal_projector.{layer}.{rest}", reader, key)
            else:
                planner.add(name, reader, key)
        if config.tie_word_embeddings:
            planner.entries = [e for e in planner.entries if e[1].name != "lm_head.weight"]
        _check_plan(planner.shapes(), _expected_state(config), unused)
        planner.vision_disk_prefix = _vision_disk_prefix(vision_config)
        logger.info(
            "Initialising %s from llava's multi_modal_projector.",
            "the shared projector" if shared_projector else f"all {n_projectors} per-layer projectors",
        )
        with atomic_output_dir(out) as tmp:
            _write_model(tmp, planner.ordered(), max_shard_size=max_shard_size, desc="converting")
            _save_side_files(tmp, config, processor, src_dir)
    logger.info("Converted %s -> %s", src, out)
    return out
