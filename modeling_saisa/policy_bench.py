"""`saisa bench --visual-policy SPEC`: a family member on transformers' LLaVA against that LLaVA, in one process.

Why this shape: the policies are training-free on the LLaVA checkpoints people already have, so the question is "how
much faster is *my* Llava under ShortV or EE-MLLM-F". The policy model is `SaisaForConditionalGeneration.from_llava(
llava, SPEC)`, which *is* the Llava's modules: the two differ only in what they execute. What is timed is the LLM
part of one prefill as `generate` runs it (projector + decoder + `lm_head` on the last position; the shared vision
tower's output is recorded once and replayed, as in `saisa bench`), for one prompt and for a batch of `batch` prompts
of equal length, A/B interleaved with the order alternating each repeat; a ratio is the median over repeats of the
two adjacent runs' time ratio. Beside each measured ratio stand:

- the analytic FLOPs ratio of the same work (`flops.policy_prefill_flops`, the last layer's visual update skipped as
  the model skips it; a batch is `batch` times one prompt for both models, so its analytic ratio is the same);
- a plain-matmul reference: every matrix product the two models execute, timed alone with `torch.matmul` at its
  shape on this machine; the "matmul-only" ratio is what the policy could reach with zero overhead, given that its
  text-row GEMMs are smaller (and so less efficient) than LLaVA's. Where the single prompt misses the analytic ratio,
  this says how much of the miss is the hardware.

Shape: the scaled LLaVA-1.5 of `saisa bench` (hidden 1024, 576 visual tokens); a preset made for a fixed depth
(`shortv-llava-1.5-7b`: 32 layers) gets that many layers, a policy name or a list the default 8.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn

from modeling_saisa import flops as F
from modeling_saisa.benchmark import (
    DEFAULT,
    BenchConfig,
    bench_inputs,
    bench_shape,
    build_llava,
    interleaved,
    machine_info,
    matmul_seconds,
    recorded_tower_output,
    replayed_tower,
    write_results,
)
from modeling_saisa.policies import VISUAL_POLICY_PRESETS, resolve_visual_policy

__all__ = [
    "BATCHED_TARGET",
    "format_policy_table",
    "plot_policy_ratios",
    "policy_bench_config",
    "policy_products",
    "run_policy_benchmark",
    "write_policy_outputs",
]

# The policy issue's target: batched measured ratio <= 1.10 x the analytic FLOPs ratio.
BATCHED_TARGET = 1.10

Product = tuple[int, int, int, int]  # (rows, inner, cols, batch): one `[batch, rows, inner] @ [batch, inner, cols]`


def _log(message: str) -> None:
    print(f"[saisa bench --visual-policy] {message}", file=sys.stderr, flush=True)


def policy_bench_config(spec: Any, cfg: BenchConfig = DEFAULT) -> BenchConfig:
    """`cfg` with as many decoder layers as a depth-specific preset (or preset file) needs; else `cfg` itself."""
    layers = None
    if isinstance(spec, str) and spec in VISUAL_POLICY_PRESETS:
        layers = len(VISUAL_POLICY_PRESETS[spec])
    elif isinstance(spec, (str, os.PathLike)) and os.path.isfile(spec):
        with open(spec, encoding="utf-8") as handle:
            layers = len(json.load(handle).get("visual_policy", []))
    elif isinstance(spec, (list, tuple)):
        layers = len(spec)
    return replace(cfg, layers=layers) if layers else cfg


def policy_products(cfg: BenchConfig, policy_list: list[str] | None, batch: int = 1) -> Counter[Product]:
    """Every matrix product of one LLM-part prefill of `batch` prompts, with its count.

    `policy_list=None` is transformers' Llava (every row through every layer). Otherwise the policy model as
    `visual_kv.VisualState` runs it: text rows through the unmodified layer (keys over text and visual rows), visual
    k/v projections in every layer, and per policy: `dense` visual queries / attention / o_proj / FFN, `composite`
    o_proj + FFN, `composite_noffn` o_proj, `naavit` FFN, `injected` its projector; none for the last layer's update.
    """
    t, v, h, m = cfg.text_tokens, cfg.visual_tokens, cfg.hidden, cfg.intermediate
    head_dim = h // cfg.heads
    q_dim, kv_dim = cfg.heads * head_dim, cfg.kv_heads * head_dim
    heads = batch * cfg.heads
    products: Counter[Product] = Counter()

    def rows_through_layer(rows: int, queries: int, keys: int) -> None:
        products[(rows, h, q_dim, 1)] += 1  # q_proj
        products[(rows, h, kv_dim, 1)] += 2  # k_proj, v_proj
        products[(queries, head_dim, keys, heads)] += 1  # QK^T
        products[(queries, keys, head_dim, heads)] += 1  # AV
        products[(rows, q_dim, h, 1)] += 1  # o_proj
        ffn(rows)

    def ffn(rows: int) -> None:
        products[(rows, h, m, 1)] += 2  # gate, up
        products[(rows, m, h, 1)] += 1  # down

    def projector() -> None:
        products[(batch * v, cfg.vision_hidden, h, 1)] += 1
        products[(batch * v, h, h, 1)] += 1

    if policy_list is None:
        projector()
        for _ in range(cfg.layers):
            rows_through_layer(batch * (t + v), t + v, t + v)
    else:
        if policy_list[0] != "injected":
            projector()  # layer 0's carried state is the (shared) projector's output
        for index, policy in enumerate(policy_list):
            rows_through_layer(batch * t, t, t + v)  # the text rows: the unmodified layer
            products[(batch * v, h, kv_dim, 1)] += 2  # visual keys and values
            if policy == "injected":
                projector()
            if index == len(policy_list) - 1:
                continue  # the last layer's visual update feeds nothing: not computed
            if policy == "dense":
                products[(batch * v, h, q_dim, 1)] += 1
                products[(v, head_dim, t + v, heads)] += 1
                products[(v, t + v, head_dim, heads)] += 1
            if policy in ("dense", "composite", "composite_noffn"):
                products[(batch * v, q_dim, h, 1)] += 1
            if policy in ("dense", "naavit", "composite"):
                ffn(batch * v)
    products[(batch, h, cfg.vocab, 1)] += 1  # lm_head on the last position of each prompt
    return products


def _matmul_only(products: Counter[Product], rates: dict[Product, float]) -> float:
    for shape in products:
        if shape not in rates:
            rows, inner, cols, batch = shape
            rates[shape] = matmul_seconds(rows, inner, cols, batch)
    return sum(count * rates[shape] for shape, count in products.items())


def _analytic(cfg: BenchConfig, policy_list: list[str]) -> dict[str, float]:
    shape = bench_shape(cfg)
    t, v = cfg.text_tokens, cfg.visual_tokens
    dense = F.llava_prefill_flops(shape, t, v)
    policy = F.policy_prefill_flops(shape, policy_list, t, v)
    llava_part = dense.llm_and_projector + dense.lm_head
    policy_part = policy.llm_and_projector + policy.lm_head
    return {"llava_flops": llava_part, "policy_flops": policy_part, "ratio": policy_part / llava_part}


def _llm_part_prefill(model: nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One LLM-part prefill of `model` on `inputs`, the vision tower replaced by its output recorded here.

    The tower is shared by the Llava and the policy model (`from_llava`), so the replacement is installed for the
    duration of each call only.
    """
    output = recorded_tower_output(model, inputs["pixel_values"])

    def run() -> None:
        with replayed_tower(model, output), torch.inference_mode():
            model(**inputs, use_cache=True, logits_to_keep=1)

    return run


def run_policy_benchmark(
    spec: Any,
    cfg: BenchConfig = DEFAULT,
    batch: int = 8,
    repeats: int = 3,
    threads: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure `from_llava(llava, spec)` against `llava` for 1 and `batch` prompts (ratios: policy / LLaVA)."""
    from modeling_saisa import SaisaForConditionalGeneration

    began = time.perf_counter()
    log = _log if progress else (lambda _message: None)
    if threads:
        torch.set_num_threads(threads)
    cfg = policy_bench_config(spec, cfg)
    policy_list = resolve_visual_policy(spec, cfg.layers)
    analytic = _analytic(cfg, policy_list)
    log(f"{spec}: LLaVA h={cfg.hidden} x {cfg.layers} layers, t={cfg.text_tokens}, v={cfg.visual_tokens}")
    llava = build_llava(cfg, seed)
    policy_model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=policy_list).eval()
    rates: dict[Product, float] = {}
    results: dict[str, Any] = {
        "visual_policy": str(spec) if isinstance(spec, (str, os.PathLike)) else ",".join(spec),
        "policy_list": policy_list,
        "config": asdict(cfg),
        "machine": machine_info(torch.get_num_threads()),
        "repeats": repeats,
        "analytic_ratio": analytic["ratio"],
        "cases": {},
    }
    for name, prompts in (("single", 1), (f"batch of {batch}", batch)):
        inputs = bench_inputs(cfg, prompts, seed)
        inputs.pop("labels")
        log(f"{name}: prefill, LLM part ({repeats} repeats, A/B interleaved)")
        times = interleaved(
            {"llava": _llm_part_prefill(llava, inputs), "policy": _llm_part_prefill(policy_model, inputs)}, repeats
        )
        log(f"{name}: plain-matmul reference")
        matmul_only = {
            "llava": _matmul_only(policy_products(cfg, None, prompts), rates),
            "policy": _matmul_only(policy_products(cfg, policy_list, prompts), rates),
        }
        medians = {key: statistics.median(values) for key, values in times.items()}
        ratio = statistics.median(b / a for a, b in zip(times["llava"], times["policy"]))
        flops = {"llava": prompts * analytic["llava_flops"], "policy": prompts * analytic["policy_flops"]}
        results["cases"][name] = {
            "prompts": prompts,
            "ratio": ratio,
            "analytic_ratio": analytic["ratio"],
            "ratio_over_analytic": ratio / analytic["ratio"],
            "matmul_only_ratio": matmul_only["policy"] / matmul_only["llava"],
            "times_s": {"median": medians, "all": times},
            "matmul_only_s": matmul_only,
            "gflops_achieved": {key: flops[key] / medians[key] / 1e9 for key in flops},
            "gflops_matmul_only": {key: flops[key] / matmul_only[key] / 1e9 for key in flops},
        }
    batched = results["cases"][f"batch of {batch}"]
    limit = BATCHED_TARGET * analytic["ratio"]
    results["target"] = {"measured": batched["ratio"], "limit": limit, "met": batched["ratio"] <= limit}
    results["elapsed_s"] = time.perf_counter() - began
    return results


def format_policy_table(all_results: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per policy and prompt count."""
    lines = [
        "| visual policy | layers | prompts | LLaVA | policy | measured ratio | analytic FLOPs ratio | "
        "measured / analytic | matmul-only ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for results in all_results:
        for case in results["cases"].values():
            median = case["times_s"]["median"]
            lines.append(
                f"| `{results['visual_policy']}` | {results['config']['layers']} | {case['prompts']} | "
                f"{1e3 * median['llava']:.0f} ms | {1e3 * median['policy']:.0f} ms | {case['ratio']:.3f} | "
                f"{case['analytic_ratio']:.3f} | {case['ratio_over_analytic']:.3f} | {case['matmul_only_ratio']:.3f} |"
            )
    for results in all_results:
        target = results["target"]
        lines.append(
            f"\n`{results['visual_policy']}`, batched: measured {target['measured']:.3f}, target <= "
            f"{BATCHED_TARGET:.2f} x analytic = {target['limit']:.3f}: {'met' if target['met'] else 'missed'}"
        )
    return "\n".join(lines)


def plot_policy_ratios(all_results: list[dict[str, Any]], path: str) -> None:
    """Bars per policy and prompt count: measured ratio, matmul-only ratio, analytic FLOPs ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, measured, matmul, analytic = [], [], [], []
    for results in all_results:
        for case in results["cases"].values():
            labels.append(f"{results['visual_policy']}\n{case['prompts']} prompt{'s' if case['prompts'] > 1 else ''}")
            measured.append(case["ratio"])
            matmul.append(case["matmul_only_ratio"])
            analytic.append(case["analytic_ratio"])
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(labels)), 4.5))
    ax.bar([i - 0.27 for i in x], measured, width=0.27, label="measured time ratio", color="#3b75af")
    ax.bar(list(x), matmul, width=0.27, label="matmul-only ratio (this machine)", color="#6fa8dc")
    ax.bar([i + 0.27 for i in x], analytic, width=0.27, label="analytic FLOPs ratio", color="#cfe2f3")
    for i, value in enumerate(measured):
        ax.text(i - 0.27, value + 0.015, f"{value:.2f}", ha="center", fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("policy / LLaVA (LLM-part prefill)")
    machine = all_results[0]["machine"]
    ax.set_title(f"Visual policies on transformers' LLaVA, CPU {machine['torch_threads']} threads, fp32", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, max(1.25, max(measured + matmul) + 0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_policy_outputs(all_results: list[dict[str, Any]], out_dir: str) -> dict[str, str]:
    """`policy_bench_results.json` and `policy_bench_ratios.png` in `out_dir`."""
    return write_results(
        all_results, out_dir, "policy_bench_results.json", "policy_bench_ratios.png", plot_policy_ratios
    )
