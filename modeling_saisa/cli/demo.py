"""`saisa demo`: train a small SAISA from scratch on synthetic shapes, on the CPU, and show that it sees.

    saisa demo [--output-dir DIR] [--quick] [--seed N] [--steps N] [--visual-policy SPEC] [--threads N]

Prints Trainer's progress bar, a results table per question kind, and ends with the line `accuracy: NN.N%`;
the trained model, its processor and a PNG grid of answers are saved in DIR (a new temporary folder by default).
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def run(args: argparse.Namespace) -> int:
    from modeling_saisa.cli._common import require_train_extra

    require_train_extra("demo")
    from dataclasses import replace

    from modeling_saisa.training.demo import QUICK, STANDARD, run_demo

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive number of training steps; got {args.steps}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else STANDARD
    if args.steps is not None:
        settings = replace(settings, steps=args.steps)
    run_demo(output_dir=args.output_dir, settings=settings, seed=args.seed, visual_policy=args.visual_policy)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a small SAISA from scratch on synthetic shapes (CPU, minutes) and measure its accuracy",
        description=(
            "Generate a synthetic visual question answering set (coloured shapes on noisy backgrounds), build a "
            "small SAISA from scratch, train it with Trainer, answer held-out images through "
            "pipeline('image-text-to-text') and report exact-match accuracy."
        ),
    )
    parser.add_argument(
        "--output-dir", help="Where to save the model, processor and answers.png (default: a temp dir)."
    )
    parser.add_argument("--quick", action="store_true", help="A smaller, faster run (for tests; lower accuracy).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for data, initialisation and training order.")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="training steps (default 2000; 500 with --quick); the cosine schedule spans them",
    )
    parser.add_argument(
        "--visual-policy",
        default=None,
        metavar="SPEC",
        help="train another family member: naavit, composite, composite_noffn, dense, or a per-layer list/preset",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
    parser.set_defaults(func=run)
