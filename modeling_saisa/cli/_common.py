"""Options and loading shared by `saisa generate` and `saisa chat` (the leading underscore hides it from the dispatcher).

Heavy imports (torch, transformers) happen inside the functions: the dispatcher imports every subcommand module to
build `saisa --help`, which must stay fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from modeling_saisa.model_dirs import check_model_dir

__all__ = [
    "add_generation_arguments",
    "add_model_arguments",
    "check_image_file",
    "check_no_image_tags",
    "fit_to_context",
    "generation_kwargs",
    "load_model_and_processor",
    "add_visual_policy_argument",
    "make_streamer",
    "model_inputs",
    "parse_visual_policy",
    "visual_policy_spec",
    "require_train_extra",
    "resolve_device",
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


def add_visual_policy_argument(parser: argparse.ArgumentParser) -> None:
    """`--visual-policy SPEC`: one policy name, a comma-separated per-layer list, a preset name or a preset file."""
    parser.add_argument(
        "--visual-policy",
        default=None,
        metavar="SPEC",
        help=(
            "per-layer visual policy: one of injected/dense/frozen/naavit/composite/composite_noffn for every layer, "
            "a comma-separated list (one entry per decoder layer), a preset (shortv-llava-1.5-7b, "
            "shortv-llava-1.5-13b) or a preset JSON file written by `saisa lc`"
        ),
    )


def visual_policy_spec(spec: str) -> str | list[str]:
    """A `--visual-policy` string as `resolve_visual_policy` takes it: commas split a per-layer list (unless the
    string names an existing file); a name, a preset or a file stays a string."""
    spec = spec.strip()
    if not spec:
        raise ValueError("--visual-policy is empty; give a policy name, a comma-separated list, a preset or a file.")
    if "," in spec and not os.path.exists(spec):
        return [part.strip() for part in spec.split(",")]
    return spec


def parse_visual_policy(spec: str, num_layers: int) -> list[str]:
    """The per-layer list a `--visual-policy` string asks for (`visual_policy_spec`, then
    `modeling_saisa.policies.resolve_visual_policy`)."""
    from modeling_saisa.policies import resolve_visual_policy

    return resolve_visual_policy(visual_policy_spec(spec), num_layers)


def _is_llava_hf(model: str) -> bool:
    """A llava-hf directory (model_type `llava`): loaded through `from_llava`, its weights shared, not copied."""
    import json

    config = os.path.join(model, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config, encoding="utf-8") as handle:
        return json.load(handle).get("model_type") == "llava"


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
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{flags} only {verb} to sampling; add --do-sample.")
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


def resolve_device(name: str) -> str:
    """`--device` -> a device this machine has, checked before the model loads (loading can take minutes).

    'auto' picks cuda, else mps, else cpu. A name torch cannot parse, or a CUDA / MPS device this build or machine
    lacks, is a usage error with one line, not a traceback after loading.
    """
    import torch

    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; expected auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device {name!r}: {build} (torch {torch.__version__}); use --device cpu or auto.")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name!r}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1}).")
    if device.type == "mps" and not has_mps:
        raise ValueError(f"--device {name!r}: MPS is not available on this machine; use --device cpu or auto.")
    return name


def load_model_and_processor(args: argparse.Namespace) -> tuple[Any, Any]:
    """Load `SaisaForConditionalGeneration` and its processor from `--model`, on `--device` in `--dtype`.

    A llava-hf directory goes through `SaisaForConditionalGeneration.from_llava` (all-`dense` unless
    `--visual-policy` says otherwise); a SAISA directory gets `--visual-policy` set on its config.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_saisa  # noqa: F401  (registers the SAISA classes with the Auto factories)

    if args.seed is not None:
        torch.manual_seed(args.seed)
    # A llava-hf directory runs training-free through `from_llava` (its weights shared); anything else must be SAISA.
    check_model_dir(args.model, allow_llava=True)
    llava_hf = _is_llava_hf(os.path.expanduser(args.model))
    device = resolve_device(args.device)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    processor = AutoProcessor.from_pretrained(args.model)
    spec = getattr(args, "visual_policy", None)
    if llava_hf:
        from modeling_saisa import SaisaForConditionalGeneration

        llava = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
        layers = llava.config.text_config.num_hidden_layers
        policy = parse_visual_policy(spec, layers) if spec else ["dense"] * layers
        model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=policy)
    else:
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype)
        if spec:  # read at forward time: the loaded weights serve any policy the checkpoint's modules allow
            model.config.visual_policy = parse_visual_policy(spec, model.config.text_config.num_hidden_layers)
    model = model.to(device).eval()
    return model, processor


def check_no_image_tags(text: str, where: str) -> str:
    """The commands place the images themselves (one per --image or /image, before the text).

    An `<image>` typed into the text would be a second placeholder for the same image, and the processor's count
    ("2 <image> tag(s) but 1 image(s)") would not say where the extra one came from.
    """
    if "<image>" in text:
        raise ValueError(
            f"{where} contains '<image>': the command places each image itself (--image / /image PATH, before the "
            "text); remove '<image>' from the text."
        )
    return text


def model_inputs(processor: Any, model: Any, messages: list[dict[str, Any]]) -> Any:
    """Chat messages -> tensors on the model's device, pixel values in the model's dtype."""
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return inputs.to(model.device, dtype=model.dtype)


def fit_to_context(model: Any, inputs: Any, kwargs: dict[str, Any], stderr: TextIO | None = None) -> dict[str, Any]:
    """Check the token budget before generating: the prompt must leave room in the model's context.

    Why before: the model only notices when a position passes its context, after streaming part of the answer,
    and the answer is lost. A prompt that fills the context is an error; a `--max-new-tokens` that would pass it is
    lowered to what fits, with a note on stderr.
    """
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not context:
        return kwargs
    prompt = int(inputs["input_ids"].shape[1])
    if prompt >= context:
        raise ValueError(
            f"The prompt is {prompt} tokens (images included) but the model's context is {context} tokens: no room "
            "left for an answer; shorten the prompt, use fewer images, or /reset the chat."
        )
    room = context - prompt
    if kwargs["max_new_tokens"] > room:
        print(
            f"note: --max-new-tokens lowered from {kwargs['max_new_tokens']} to {room}: the prompt takes {prompt} "
            f"of the model's {context}-token context.",
            file=stderr if stderr is not None else sys.stderr,
        )
        kwargs = {**kwargs, "max_new_tokens": room}
    return kwargs


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
