"""`saisa convert SRC OUT`: original SAISA (or, with --from-llava, transformers Llava) checkpoints -> SAISA layout."""

from __future__ import annotations

import argparse
import logging

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an original SAISA (or llava-hf) checkpoint to this package's layout",
        description=(
            "Convert an original SAISA checkpoint (yuanqianhao/saisa-vicuna, yuanqianhao/saisa-llama3; "
            "model_type llava_llama) -- or, with --from-llava, a transformers Llava checkpoint -- into a directory "
            "that SaisaForConditionalGeneration.from_pretrained, AutoProcessor and pipeline('image-text-to-text') "
            "load. Tensors are streamed; OUT appears only when the conversion succeeded."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="local directory or hub repo id of the source checkpoint")
    parser.add_argument("out", metavar="OUT", help="output directory (must not exist, or be empty)")
    parser.add_argument(
        "--vision-tower",
        metavar="DIR_OR_ID",
        help="CLIP tower to use when SRC holds no vision weights (default: the mm_vision_tower of SRC's config)",
    )
    parser.add_argument(
        "--chat-template",
        default="vicuna_v1",
        choices=["vicuna_v1", "llama_3"],
        help="prompt format: vicuna_v1 for saisa-vicuna (default), llama_3 for saisa-llama3",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the written weights (default: that of SRC's language model)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read pytorch_model*.bin files (pickles can execute code: only for sources you trust)",
    )
    parser.add_argument(
        "--keep-shared-projector",
        action="store_true",
        help=(
            "keep the global stage-1 projector model.mm_projector in OUT/shared_projector.safetensors (dropped by "
            "default: inference never uses it); with --from-llava: keep llava's projector as one shared projector "
            "instead of copying it into every layer"
        ),
    )
    parser.add_argument(
        "--from-llava",
        action="store_true",
        help="SRC is a transformers Llava checkpoint (e.g. llava-hf/llava-1.5-7b-hf)",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default: 5GB)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeling_saisa.convert import convert_from_llava, convert_original_checkpoint

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("modeling_saisa").setLevel(logging.INFO)
    if args.from_llava:
        if args.vision_tower is not None:
            raise ValueError("--vision-tower does not apply with --from-llava (a Llava checkpoint holds its tower).")
        out = convert_from_llava(
            args.src,
            args.out,
            chat_template=args.chat_template,
            dtype=args.dtype,
            allow_pickle=args.allow_pickle,
            shared_projector=args.keep_shared_projector,
            max_shard_size=args.max_shard_size,
        )
    else:
        out = convert_original_checkpoint(
            args.src,
            args.out,
            vision_tower=args.vision_tower,
            chat_template=args.chat_template,
            dtype=args.dtype,
            allow_pickle=args.allow_pickle,
            keep_shared_projector=args.keep_shared_projector,
            max_shard_size=args.max_shard_size,
        )
    print(out)
    return 0
