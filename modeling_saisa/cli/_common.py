"""Options and loading shared by `saisa generate` and `saisa chat` (the leading underscore hides it from the dispatcher).

Heavy imports (torch, transformers) happen inside the functions: the dispatcher imports every subcommand module to
build `saisa --help`, which must stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

__all__ = [
    "add_generation_arguments",
    "add_model_arguments",
    "check_image_file",
    "generation_kwargs",
    "load_model_and_processor",
    "make_streamer",
    "model_inputs",
    "require_train_extra",
]

TRAIN_EXTRA_HINT = 'pip install "modeling-saisa[train]" (from a checkout: pip install -e ".[train]")'


def require_train_extra(command: str) -> None:
    """Exit with the extra to install when `saisa train` / `saisa demo` lacks its packages.

    Without this, a missing accelerate surfaces as transformers' bare `accelerate>=1.1.0` ImportError, which does not
    say that our `[train]` extra provides it.
    """
    import importlib.util

    from transformers.utils.import_utils import is_accelerate_available

    missing = [] if is_accelerate_available() else ["accelerate (the version transformers needs)"]
    missing += [name for name in ("peft", "datasets", "yaml") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"saisa {command} needs the [train] extra; missing: {', '.join(missing)}. {TRAIN_EXTRA_HINT}")


DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device`, `--dtype`."""
    parser.add_argument("--model", required=True, metavar="DIR", help="a saved SAISA model directory (or hub id)")
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda if available, else mps, else cpu), 'cpu', 'cuda', 'cuda:1', ..."
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="weights dtype ('auto': as saved in the checkpoint)"
    )


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """`--max-new-tokens` and the sampling flags (greedy unless `--do-sample`)."""
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens to generate (256)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --do-sample)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --do-sample)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling (with --do-sample)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `generate` kwargs the flags ask for; sampling knobs without `--do-sample` are an error, not ignored."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": bool(args.do_sample)}
    knobs = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    given = {name: value for name, value in knobs.items() if value is not None}
    if given and not args.do_sample:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags} only apply to sampling; add --do-sample.")
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}.")
    kwargs.update(given)
    return kwargs


def check_image_file(path: str) -> str:
    """Fail before loading the model when an image path is wrong (a model can take minutes to load).

    http(s) URLs pass unchecked: the processor fetches them.
    """
    if path.startswith(("http://", "https://")):
        return path
    if not os.path.exists(path):
        raise FileNotFoundError(f"Image file {path!r} does not exist.")
    if not os.path.isfile(path):
        raise ValueError(f"Image path {path!r} is not a file.")
    return path


def _resolve_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_model_and_processor(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load `SaisaForConditionalGeneration` and `SaisaProcessor` from `--model`, on `--device` in `--dtype`."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_saisa  # noqa: F401  (registers the SAISA classes with the Auto factories)

    if args.seed is not None:
        torch.manual_seed(args.seed)
    local = os.path.isdir(args.model)
    if not local and (os.path.exists(args.model) or args.model.startswith((".", os.sep, "~"))):
        raise FileNotFoundError(f"Model directory {args.model!r} does not exist.")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
    model = model.to(_resolve_device(args.device)).eval()
    return model, processor


def model_inputs(processor: Any, model: Any, messages: list[dict[str, Any]]) -> Any:
    """Chat messages -> tensors on the model's device, pixel values in the model's dtype."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return inputs.to(model.device, dtype=model.dtype)


def make_streamer(processor: Any, stream: TextIO | None = None) -> Any:
    """A streamer that writes the answer to `stream` (default: the current `sys.stdout`) as it is generated.

    Prompt and special tokens are left out. `TextStreamer` itself always prints to `sys.stdout`; the chat loop
    writes to the streams it is given, so the streamer must too.
    """
    from transformers import TextStreamer

    class _StreamWriter(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out = stream if stream is not None else sys.stdout
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _StreamWriter(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
