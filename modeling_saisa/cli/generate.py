"""`saisa generate`: answer one prompt about zero or more images, streaming the answer as it is generated.

Why: the quickest end-to-end check of a converted or trained checkpoint, with exactly the prompt format the model
was trained on (the processor's chat template, `vicuna_v1` by default).
"""

from __future__ import annotations

import argparse

from modeling_saisa.cli._common import (
    add_generation_arguments,
    add_model_arguments,
    add_visual_policy_argument,
    check_image_file,
    check_no_image_tags,
    fit_to_context,
    generation_kwargs,
    load_model_and_processor,
    make_streamer,
    model_inputs,
)

__all__ = ["build_messages", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer one prompt about an image, streaming tokens",
        description=(
            "Answer PROMPT about the --image(s) with a saved SAISA model. The prompt is wrapped in the processor's "
            "chat template (images first, as SAISA was trained) and the answer is printed as it is generated."
        ),
    )
    add_model_arguments(parser)
    add_visual_policy_argument(parser)
    parser.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image file; repeat for several images"
    )
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction")
    add_generation_arguments(parser)
    parser.set_defaults(func=run)


def build_messages(prompt: str, images: list[str]) -> list[dict]:
    """One user turn: the images (in order) then the text, the layout of SAISA's training prompts."""
    if not prompt.strip():
        raise ValueError("--prompt is empty; write a question or instruction.")
    check_no_image_tags(prompt, "--prompt")
    content = [{"type": "image", "path": path} for path in images]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def run(args: argparse.Namespace) -> int:
    images = [check_image_file(path) for path in args.image]
    messages = build_messages(args.prompt, images)
    kwargs = generation_kwargs(args)
    model, processor = load_model_and_processor(args)
    inputs = model_inputs(processor, model, messages)
    kwargs = fit_to_context(model, inputs, kwargs)
    model.generate(**inputs, streamer=make_streamer(processor), **kwargs)
    return 0
