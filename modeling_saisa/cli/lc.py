"""`saisa lc`: ShortV's Layer Contribution of every decoder layer for visual tokens, and the preset it selects.

    saisa lc MODEL --data calib.json [--image-folder DIR] [--layers N] [--out DIR]

Prints the layers in ascending LC, writes `visual_policy.json` (the first N layers `frozen`, the rest `dense`),
readable by `SaisaForConditionalGeneration.from_llava(..., visual_policy=FILE)` and `--visual-policy FILE`, and
`lc.png` (one bar per layer). The computation lives in `modeling_saisa.layer_contribution`.
"""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lc",
        help="ShortV layer contribution for visual tokens -> a visual_policy preset",
        description=(
            "For every decoder layer of a llava-hf model, the mean KL(P_frozen_i || P_orig) of the next-token "
            "distribution at each calibration prompt's end when only that layer's visual tokens are frozen."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="a llava-hf model directory (LlavaForConditionalGeneration)")
    parser.add_argument("--data", required=True, metavar="FILE", help="LLaVA JSON/JSONL conversations with images")
    parser.add_argument("--image-folder", default=None, metavar="DIR", help="root of relative image paths")
    parser.add_argument("--layers", type=int, default=None, metavar="N", help="layers to freeze (default 60%%)")
    parser.add_argument("--out", default=".", metavar="DIR", help="where visual_policy.json and lc.png go")
    parser.add_argument("--batch-size", type=int, default=4, metavar="B", help="prompts per prefill (4)")
    parser.add_argument("--max-prompts", type=int, default=None, metavar="K", help="use the first K prompts only")
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _load(model_dir: str, dtype: str, device: str):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    config = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"no config.json in {model_dir!r} (expected a llava-hf model directory)")
    with open(config, encoding="utf-8") as handle:
        model_type = json.load(handle).get("model_type")
    if model_type != "llava":
        raise ValueError(f"saisa lc needs a llava-hf model (model_type 'llava'), got {model_type!r} in {config}")
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def run(args: argparse.Namespace) -> int:
    from modeling_saisa.layer_contribution import (
        calibration_batches,
        layer_contributions,
        lc_order,
        plot_layer_contributions,
        write_policy_preset,
    )

    model, processor = _load(args.model, args.dtype, args.device)
    batches, n_prompts = calibration_batches(processor, args.data, args.image_folder, args.batch_size, args.max_prompts)
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    lc = layer_contributions(model, batches, progress=not args.no_progress, total=len(batches))
    num_layers = len(lc)
    n = round(0.6 * num_layers) if args.layers is None else args.layers
    order = lc_order(lc)
    print(f"LC on {n_prompts} prompts, ascending (layer: KL(P_frozen_i || P_orig)):")
    for layer in order:
        print(f"  {layer:3d}: {float(lc[layer]):.6g}")
    print("order:", ",".join(map(str, order)))
    preset = os.path.join(args.out, "visual_policy.json")
    write_policy_preset(preset, lc, n, source=args.model)
    plot = os.path.join(args.out, "lc.png")
    plot_layer_contributions(plot, lc, n)
    print(f"frozen ({n}): {','.join(map(str, order[:n]))}\nwrote {preset} and {plot}")
    return 0
