"""`saisa train`: one stage of SAISA's recipe with transformers' Trainer.

    saisa train --stage 1|2 --model DIR --data JSON --image-folder DIR --output-dir DIR [any TrainingArguments flag]
    saisa train --config run.yaml [flags that override the YAML]

Every `TrainingArguments` field is a flag (`--learning-rate 2e-5` or `--learning_rate 2e-5`), so the command runs
unchanged under `accelerate launch` / `torchrun` with `--deepspeed` or `--fsdp` (see docs/training.md). A YAML config
holds the same keys (SAISA's and Trainer's, dashes or underscores); command-line flags win over it. Mixed precision
defaults to what the device has (bf16, else fp16 on CUDA, fp32 on CPU) unless `bf16`/`fp16` is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from modeling_saisa.model_dirs import check_model_dir

__all__ = ["build_parser", "parse", "register", "run"]


def build_parser() -> Any:
    """The full parser: SAISA's options plus every `TrainingArguments` field (an `HfArgumentParser`)."""
    from transformers import HfArgumentParser, TrainingArguments

    from modeling_saisa.training.recipes import LORA_TARGET_MODULES, LoraSettings

    parser = HfArgumentParser(
        TrainingArguments,
        prog="saisa train",
        description=(
            "Train SAISA with Trainer. Stage 1: only the shared projector (vision and LLM frozen). Stage 2: per-layer "
            "projectors (initialised from the stage-1 shared one) + the LLM, vision frozen; full or --lora."
        ),
    )
    group = parser.add_argument_group("SAISA")
    group.add_argument("--stage", type=int, choices=(1, 2), help="Recipe stage (required).")
    group.add_argument("--model", help="SAISA checkpoint directory with its processor (required).")
    group.add_argument(
        "--data", help="LLaVA conversation JSON/JSONL, or a datasets.Dataset saved with save_to_disk (required)."
    )
    group.add_argument("--image-folder", "--image_folder", dest="image_folder", help="Root of relative image paths.")
    group.add_argument("--config", help="YAML file with any of these options; command-line flags override it.")
    defaults = LoraSettings()
    group.add_argument("--lora", action="store_true", help="Stage 2 with LoRA on the LLM (projectors train in full).")
    group.add_argument("--lora-r", "--lora_r", dest="lora_r", type=int, default=defaults.r)
    group.add_argument("--lora-alpha", "--lora_alpha", dest="lora_alpha", type=int, default=defaults.alpha)
    group.add_argument("--lora-dropout", "--lora_dropout", dest="lora_dropout", type=float, default=defaults.dropout)
    group.add_argument(
        "--lora-target-modules",
        "--lora_target_modules",
        dest="lora_target_modules",
        default=LORA_TARGET_MODULES,
        help="Regex over module names (default: the LLM's q/k/v/o/gate/up/down projections).",
    )
    group.add_argument(
        "--max-length", "--max_length", dest="max_length", type=int, help="Longest row after image expansion."
    )
    group.add_argument(
        "--on-bad",
        "--on_bad",
        dest="on_bad",
        choices=("skip", "raise"),
        default="skip",
        help="Bad rows (missing image, <image>/image count mismatch, too long): report and skip, or stop.",
    )
    group.add_argument(
        "--train-vision", "--train_vision", dest="train_vision", action="store_true", help="Also train the tower."
    )
    group.add_argument(
        "--init-projectors-from",
        "--init_projectors_from",
        dest="init_projectors_from",
        help="Stage 2: copy this shared projector (shared_projector.safetensors or a stage-1 checkpoint) into "
        "every layer.",
    )
    group.add_argument(
        "--dtype",
        help="Train the weights themselves in this dtype ('auto': as stored). Default: float32 master weights, "
        "with --bf16/--fp16 (picked for the GPU) computing in low precision.",
    )
    group.add_argument("--attn-implementation", "--attn_implementation", dest="attn_implementation")
    return parser


def _given(argv: list[str], *names: str) -> bool:
    flags = {f"--{n}" for name in names for n in (name, name.replace("_", "-"))}
    return any(arg.split("=", 1)[0] in flags for arg in argv)


# Options that transformers 5 removed from TrainingArguments, with what replaces them: old configs and commands
# (LLaVA's scripts, transformers 4 tutorials) still carry them, and argparse's "unrecognized arguments" does not say
# what to write instead.
REMOVED_OPTIONS = {
    "warmup_ratio": "use warmup_steps with a float below 1 (e.g. --warmup-steps 0.03 = 3 % of the steps)",
}


def _check_removed(names: list[str], where: str) -> None:
    for name in names:
        if name in REMOVED_OPTIONS:
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{where}{flag} no longer exists in transformers 5's TrainingArguments: {REMOVED_OPTIONS[name]}."
            )


def parse(argv: list[str]) -> tuple[Any, argparse.Namespace]:
    """Parse `argv` (YAML first, flags over it) into `(TrainingArguments, SAISA namespace)`."""
    import yaml

    from modeling_saisa.training.recipes import auto_precision

    parser = build_parser()
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    from_yaml: dict[str, Any] = {}
    if config_path is not None:
        with open(config_path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path}: expected a mapping of option names to values.")
        from_yaml = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        _check_removed(sorted(from_yaml), f"{config_path}: ")
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(from_yaml) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown option(s) {unknown}.")
    _check_removed([name for name in REMOVED_OPTIONS if _given(argv, name)], "")
    defaults: dict[str, Any] = {"remove_unused_columns": False}
    if not (_given(argv, "bf16", "fp16", "use_cpu") or {"bf16", "fp16", "use_cpu"} & set(from_yaml)):
        defaults.update(auto_precision())
    defaults.update(from_yaml)
    parser.set_defaults(**defaults)
    training_args, saisa_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    missing = [f"--{k.replace('_', '-')}" for k in ("stage", "model", "data") if getattr(saisa_args, k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (on the command line or in --config).")
    if not _given(argv, "output_dir") and "output_dir" not in from_yaml:
        raise ValueError("missing --output-dir (on the command line or in --config).")
    check_model_dir(saisa_args.model)
    if saisa_args.lora and saisa_args.stage != 2:
        raise ValueError("--lora is a stage-2 option: stage 1 trains only the shared projector.")
    return training_args, saisa_args


def run(args: argparse.Namespace) -> int:
    from modeling_saisa.cli._common import require_train_extra

    require_train_extra("train")
    argv = list(args.argv)
    if any(a in ("-h", "--help") for a in argv):
        build_parser().print_help()
        return 0
    training_args, opts = parse(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
        stream=sys.stdout,
    )
    from modeling_saisa.training.recipes import LoraSettings, train_stage

    lora = None
    if opts.lora:
        lora = LoraSettings(
            r=opts.lora_r, alpha=opts.lora_alpha, dropout=opts.lora_dropout, target_modules=opts.lora_target_modules
        )
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "latest", "last"):
        resume = True
    metrics = train_stage(
        stage=opts.stage,
        model_dir=opts.model,
        data=opts.data,
        training_args=training_args,
        image_folder=opts.image_folder,
        lora=lora,
        max_length=opts.max_length,
        on_bad=opts.on_bad,
        train_vision=opts.train_vision,
        init_projectors_from=opts.init_projectors_from,
        dtype=opts.dtype,
        attn_implementation=opts.attn_implementation,
        resume_from_checkpoint=resume,
    )
    if training_args.process_index == 0:
        print(f"saved stage-{opts.stage} model to {os.path.abspath(metrics['output_dir'])}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    # The subcommand only collects its arguments (prefix "+" keeps argparse from reading the "--" flags here), so that
    # every TrainingArguments flag passes through to the full parser in `run`, which also prints the real --help.
    parser = subparsers.add_parser(
        "train",
        help="train one stage of SAISA's recipe with Trainer (saisa train --help lists every option)",
        add_help=False,
        prefix_chars="+",
    )
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    parser.set_defaults(func=run)
