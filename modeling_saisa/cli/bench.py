"""`saisa bench`: SAISA vs transformers' LLaVA on this machine (prefill, decode, training step, memory).

The measuring code lives in `modeling_saisa.benchmark`; `benchmarks/bench.py` is the same command as a script.
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["add_arguments", "register", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smaller shape that runs in under a minute")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--out", metavar="DIR", default=None, help="write bench_results.json and bench_ratios.png")
    parser.add_argument("--repeats", type=int, default=None, metavar="N", help="timed runs per measurement")
    parser.add_argument(
        "--reuse", action="store_true", help="many questions per image: Llava, Llava prefix cache, SAISA, SAISA+store"
    )
    parser.add_argument(
        "--visual-policy",
        action="append",
        default=None,
        metavar="SPEC",
        help="a family member on transformers' Llava (from_llava) against that Llava: a policy name, preset "
        "(shortv-llava-1.5-7b gets its 32 layers) or preset file; repeat to compare several in one run",
    )
    parser.add_argument(
        "--batch", type=int, default=8, metavar="N", help="prompts in the batched case of --visual-policy (default 8)"
    )
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="torch intra-op threads")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark SAISA against transformers' LLaVA on this CPU",
        description=(
            "Builds LLaVA and SAISA with the same shapes and weights in one process and measures prefill (LLM part "
            "and end to end), decode per token, a training step and peak prefill memory, A/B interleaved, beside "
            "the analytic FLOPs ratios. Progress goes to stderr."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from modeling_saisa.benchmark import DEFAULT, QUICK, format_table, run_benchmark, write_outputs

    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if args.reuse and args.visual_policy:
        raise ValueError("--reuse and --visual-policy are separate benchmarks: run them one at a time")
    if args.reuse:
        return run_reuse(args)
    if args.visual_policy:
        return run_policies(args)
    results = run_benchmark(QUICK if args.quick else DEFAULT, repeats=args.repeats, threads=args.threads)
    if args.out:
        paths = write_outputs(results, args.out)
        print(f"[saisa bench] wrote {paths['json']} and {paths['png']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2, default=float))
    else:
        print(format_table(results))
        print(
            f"\nmatmul-only LLM-part ratio on this machine: {results['matmul_only_llm_ratio']:.3f}; "
            f"elapsed {results['elapsed_s']:.0f} s"
        )
    return 0


def run_reuse(args: argparse.Namespace) -> int:
    """`saisa bench --reuse`: the image-KV store against Llava (see modeling_saisa.reuse_bench)."""
    import torch

    from modeling_saisa.benchmark import DEFAULT, QUICK
    from modeling_saisa.reuse_bench import format_reuse_table, run_reuse_benchmark, write_reuse_outputs

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run_reuse_benchmark(QUICK if args.quick else DEFAULT, repeats=args.repeats or 3)
    if args.out:
        paths = write_reuse_outputs(results, args.out)
        print(f"[saisa bench] wrote {paths['json']} and {paths['png']}", file=sys.stderr)
    print(json.dumps(results, indent=2, default=float) if args.json else format_reuse_table(results))
    return 0


def run_policies(args: argparse.Namespace) -> int:
    """`saisa bench --visual-policy SPEC ...`: each policy on a Llava against that Llava (modeling_saisa.policy_bench)."""
    from modeling_saisa.benchmark import DEFAULT, QUICK
    from modeling_saisa.cli._common import visual_policy_spec
    from modeling_saisa.policy_bench import format_policy_table, run_policy_benchmark, write_policy_outputs

    if args.batch < 2:
        raise ValueError(f"--batch must be at least 2 (the batched case); got {args.batch}")
    cfg = QUICK if args.quick else DEFAULT
    # A comma-separated per-layer list works here as on every other command (its length sets the depth).
    results = [
        run_policy_benchmark(
            visual_policy_spec(spec), cfg, batch=args.batch, repeats=args.repeats or 3, threads=args.threads
        )
        for spec in args.visual_policy
    ]
    if args.out:
        paths = write_policy_outputs(results, args.out)
        print(f"[saisa bench] wrote {paths['json']} and {paths['png']}", file=sys.stderr)
    print(json.dumps(results, indent=2, default=float) if args.json else format_policy_table(results))
    return 0
