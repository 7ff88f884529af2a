"""What a SAISA model directory must hold, checked before anything is loaded, with one line that says what to do.

Why a module of its own: the commands (`generate`, `chat`, `train`) and `SaisaConfig.from_pretrained` meet the same
wrong directories — an unconverted original checkpoint, a llava-hf checkpoint, a LoRA adapter folder, a folder
without processor files, a path that does not exist — and transformers' own messages for them point elsewhere
("upgrade transformers", "couldn't connect to huggingface.co", "Repo id must be in the form", a 7B default config
that is then killed for memory). No heavy imports here: the configuration module imports this one.
"""

from __future__ import annotations

import json
import os

__all__ = [
    "PROCESSOR_FILES",
    "TOKENIZER_FILES",
    "check_model_dir",
    "looks_like_local_path",
    "unconverted_checkpoint_message",
]

# Written by SaisaProcessor.save_pretrained (processor_config.json holds the image processor too); older layouts
# keep the image processor in preprocessor_config.json.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# model_type of checkpoints that must be converted first -> the command that converts them.
_CONVERSIONS = {
    "llava_llama": ("an original SAISA/LLaVA checkpoint", "saisa convert {src} OUT"),
    "llava": ("a transformers Llava checkpoint", "saisa convert --from-llava {src} OUT"),
}


def looks_like_local_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (absolute, ./, ~, deeper nesting) can only be a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def unconverted_checkpoint_message(model_type: str | None, src: str) -> str | None:
    """The one-line refusal for a checkpoint SAISA cannot load before conversion (None if `model_type` is fine).

    Loading such a directory directly would build SAISA's default 7B-sized sub-configs and run out of memory.
    """
    if model_type not in _CONVERSIONS:
        return None
    what, command = _CONVERSIONS[model_type]
    return (
        f"{src!r} is {what} (model_type {model_type!r}), not a SAISA model; convert it once with "
        f"`{command.format(src=src)}` and load OUT."
    )


def check_model_dir(
    path: str | os.PathLike, *, option: str = "--model", processor: bool = True, allow_llava: bool = False
) -> str:
    """Check that `path` is a SAISA model directory (or could be a hub repo id) and return it as a string.

    Raises `FileNotFoundError` / `ValueError` with one line naming what is missing and what to run instead.
    A string that could be a hub id (`owner/name`) and is not a local path passes unchecked: transformers fetches it.
    `allow_llava`: a llava-hf directory is accepted too (the commands that run it through `from_llava`).
    """
    text = os.fspath(path)
    local = os.path.expanduser(text)
    if not os.path.isdir(local):
        if os.path.exists(local):
            raise ValueError(f"{option} {text!r} is a file; expected a SAISA model directory (config.json, weights).")
        if looks_like_local_path(text):
            raise FileNotFoundError(f"Model directory {text!r} does not exist ({option} expects a directory).")
        return text
    names = set(os.listdir(local))
    if "config.json" not in names:
        if "adapter_config.json" in names:
            raise ValueError(
                f"{option} {text!r} is a LoRA adapter (adapter_config.json), not a model; pass the merged model "
                f"directory that `saisa train --lora` wrote (the adapter's parent folder)."
            )
        raise FileNotFoundError(
            f"{option} {text!r} has no config.json; expected a SAISA model directory (written by save_pretrained, "
            f"saisa convert or saisa train)."
        )
    try:
        with open(os.path.join(local, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{option} {text!r}: config.json is not a JSON object ({err}).") from err
    llava_hf = allow_llava and model_type == "llava"  # run training-free through `from_llava` (generate, chat)
    refusal = None if llava_hf else unconverted_checkpoint_message(model_type, text)
    if refusal is not None:
        raise ValueError(refusal)
    if model_type != "saisa" and not llava_hf:
        raise ValueError(f"{option} {text!r} has model_type {model_type!r}; expected a SAISA model ('saisa').")
    if processor:
        missing = []
        if not names & set(PROCESSOR_FILES):
            missing.append(" or ".join(PROCESSOR_FILES))
        if not names & set(TOKENIZER_FILES):
            missing.append("tokenizer files (" + " / ".join(TOKENIZER_FILES) + ")")
        if missing:
            raise FileNotFoundError(
                f"{option} {text!r} has no processor files: missing {' and '.join(missing)}; save the processor "
                f"into it with processor.save_pretrained({text!r}) (saisa convert and saisa train write it)."
            )
    return text
