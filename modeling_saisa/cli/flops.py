"""`saisa flops`: analytic prefill FLOPs of LLaVA vs SAISA (and ShortV) for a preset or a model config.

Why a command: the saving depends on the shapes (text length, visual tokens, GQA), and users ask "how much
cheaper on my prompt?" before they run anything. The counting lives in `modeling_saisa.flops`.
"""

from __future__ import annotations

import argparse
import json
import os

from modeling_saisa.cli._common import add_visual_policy_argument, parse_visual_policy
from modeling_saisa.flops import PRESETS, flops_report, model_shape

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flops",
        help="analytic prefill FLOPs: LLaVA vs SAISA (papers' convention)",
        description=(
            "Prefill FLOPs of one prompt in the papers' convention (2 x MACs of matrix products, attention not "
            "halved for causality). 'dense' is LLaVA's decoder, 'saisa' SAISA's decoder plus its per-layer "
            "projectors, 'saisa_llm_only' without them; the vision tower is reported separately."
        ),
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="published model shape (default llava-1.5-7b)")
    source.add_argument("--model", metavar="DIR_OR_CONFIG_JSON", help="a model directory or its config.json")
    parser.add_argument("--text-tokens", type=int, default=None, metavar="N", help="text tokens t (default 64)")
    parser.add_argument(
        "--visual-tokens", type=int, default=None, metavar="N", help="visual tokens v (default: the model's)"
    )
    parser.add_argument(
        "--shortv-layers", type=int, default=None, metavar="N", help="also count ShortV with N frozen layers"
    )
    add_visual_policy_argument(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON object (keys dense, saisa, ...)")
    parser.set_defaults(func=run)


def _tflops(x: float) -> str:
    return f"{x / 1e12:9.3f}"


def run(args: argparse.Namespace) -> int:
    if args.model is not None and not os.path.exists(os.path.expanduser(args.model)):
        raise FileNotFoundError(f"--model {args.model!r}: no such model directory or config.json")
    source = os.path.expanduser(args.model) if args.model else args.preset or "llava-1.5-7b"
    policy = None
    if args.visual_policy:
        policy = parse_visual_policy(args.visual_policy, model_shape(source).text.layers)
    report = flops_report(source, args.text_tokens, args.visual_tokens, args.shortv_layers, policy)
    report["source"] = source
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    dense = report["dense"]
    text = report["shape"]["text"]
    print(
        f"{source}: t={report['text_tokens']} text + v={report['visual_tokens']} visual tokens; "
        f"h={text['hidden']}, m={text['intermediate']}, L={text['layers']}, "
        f"heads={text['n_heads']}/{text['n_kv_heads']} (q/kv)"
    )
    rows = [
        ("LLaVA (dense LLM)", dense),
        ("SAISA (LLM + projectors)", report["saisa"]),
        ("SAISA (LLM only)", report["saisa_llm_only"]),
    ]
    if "shortv" in report:
        rows.append((f"ShortV (N={report['shortv_layers']})", report["shortv"]))
    if "policy" in report:
        rows.append((f"--visual-policy {args.visual_policy}"[:26], report["policy"]))
    print(f"{'':26s} {'TFLOPs':>9s}  {'vs LLaVA':>8s}")
    for name, value in rows:
        print(f"{name:26s} {_tflops(value)}  {100 * (value / dense - 1):+7.1f}%")
    print(f"{'vision tower (both)':26s} {_tflops(report['vision_tower'])}  (not in the papers' figures)")
    train = report["train_step"]
    print(
        f"training step (fwd+bwd, vision frozen, with tower and lm_head): LLaVA {_tflops(train['dense']).strip()}, "
        f"SAISA {_tflops(train['saisa']).strip()} TFLOPs (ratio {train['ratio']:.3f})"
    )
    return 0
