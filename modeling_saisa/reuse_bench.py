"""`saisa bench --reuse`: many questions about the same images, LLaVA against SAISA with and without `ImageKVStore`.

The workload is `images` images x `questions` questions each, answered one prompt at a time by
(a) transformers' Llava `generate`, (b) Llava reusing a deep copy of the prefix cache shared by the prompts of one
image (it covers the image only when the image comes before the question), (c) SAISA `generate`, (d) SAISA with a
fresh `ImageKVStore` per pass (the first question about each image fills it). Two prompt layouts: image first, and
question first (the prefix cache then covers only the text before the question). Prefill is timed as
`generate(max_new_tokens=1)` over the whole workload (prefix building and store filling included); end to end as
`generate(max_new_tokens=decode_steps)`. Both models share weights and shapes (`benchmark.build_models`). The
eight passes (4 methods x 2 phases) of a repeat run interleaved, prompt by prompt, so machine noise hits them alike.
"""

from __future__ import annotations

import copy
import gc
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from modeling_saisa import flops as F
from modeling_saisa.benchmark import BenchConfig, build_models, machine_info, write_results
from modeling_saisa.image_kv import ImageKVStore

__all__ = [
    "LAYOUTS",
    "METHODS",
    "REUSE_TARGETS",
    "format_reuse_table",
    "plot_reuse",
    "reuse_targets",
    "run_reuse_benchmark",
    "write_reuse_outputs",
]

METHODS = ("llava_generate", "llava_prefix_reuse", "saisa", "saisa_store")
LAYOUTS = ("image_first", "question_first")
SUFFIX = 3  # the assistant prefix after the question (and image)


def _prompts(cfg: BenchConfig, layout: str, images: int, questions: int, question_tokens: int, seed: int):
    """[(image index, input_ids [1, S])] for every image x question, and the pixel values of the images."""
    gen = torch.Generator().manual_seed(seed)
    image_id = cfg.vocab - 1
    system = torch.cat([torch.tensor([1]), torch.randint(3, image_id, (cfg.text_before_image - 1,), generator=gen)])
    suffix = torch.randint(3, image_id, (SUFFIX,), generator=gen)
    placeholders = torch.full((cfg.visual_tokens,), image_id)
    prompts = []
    for image in range(images):
        for _ in range(questions):
            question = torch.randint(3, image_id, (question_tokens,), generator=gen)
            middle = [placeholders, question] if layout == "image_first" else [question, placeholders]
            prompts.append((image, torch.cat([system, *middle, suffix])[None]))
    pixel_values = torch.randn(images, 3, cfg.image_size, cfg.image_size, generator=gen)
    return prompts, pixel_values


def _common_prefix(rows: list[torch.Tensor]) -> int:
    first = rows[0][0]
    length = min(row.shape[1] for row in rows) - 1  # leave at least one token to run
    for row in rows[1:]:
        differs = (row[0, :length] != first[:length]).nonzero()
        length = int(differs[0]) if len(differs) else length
    return length


class _Pass:
    """One method's answers to the workload in one phase, one prompt at a time, with the state it keeps between
    prompts (a store, or the prefix caches of the images); `seconds` sums its timed work."""

    def __init__(self, method: str, phase: str, new_tokens: int, models, prompts, pixel_values, image_id: int):
        self.method, self.phase = method, phase
        self.gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        self.llava, self.saisa = models
        self.pixel_values, self.image_id = pixel_values, image_id
        self.store = ImageKVStore(max_bytes=1 << 40) if method == "saisa_store" else None
        # Each image's cached prefix (prefix reuse only): what all its prompts share (one token is always left to run).
        self.prefix_length = {}
        if method == "llava_prefix_reuse":
            for image in {i for i, _ in prompts}:
                self.prefix_length[image] = _common_prefix([ids for i, ids in prompts if i == image])
        self.prefixes: dict[int, Any] = {}
        self.seconds = 0.0

    def answer(self, image: int, ids: torch.Tensor) -> None:
        """Answer one prompt; the first one about an image also builds that image's prefix cache (timed with it)."""
        gen = self.gen
        px = self.pixel_values[image : image + 1]
        mask = torch.ones_like(ids)
        start = time.perf_counter()
        if self.method == "llava_generate":
            self.llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **gen)
        elif self.method == "llava_prefix_reuse":
            length = self.prefix_length[image]
            # The image's pixels are needed where the prefix includes the image, or the rest of the prompt does.
            covered = bool((ids[:, :length] == self.image_id).any())
            if image not in self.prefixes:
                extra = dict(pixel_values=px) if covered else {}
                self.prefixes[image] = self.llava(input_ids=ids[:, :length], use_cache=True, **extra).cache
            extra = {} if covered else dict(pixel_values=px)
            cache = copy.deepcopy(self.prefixes[image])
            self.llava.generate(input_ids=ids, attention_mask=mask, cache=cache, **extra, **gen)
        else:
            self.saisa.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_kv=self.store, **gen)
        self.seconds += time.perf_counter() - start


def _analytic(cfg: BenchConfig, config: Any, question_tokens: int, questions: int) -> dict[str, dict[str, float]]:
    """Analytic prefill FLOPs per prompt (flops.py formulas); the store and the prefix amortize over `questions`."""
    shape = F.model_shape(config.to_dict())
    t, v = cfg.text_before_image + question_tokens + SUFFIX, cfg.visual_tokens
    llava = F.llava_prefill_flops(shape, t, v).total
    saisa = F.saisa_prefill_flops(shape, t, v)
    kv = shape.text.layers * 4 * v * shape.text.hidden * shape.text.kv_dim
    per_image = saisa.vision + saisa.projector + kv
    store = saisa.total - per_image + per_image / questions
    prefix_image_first = F.llava_prefill_flops(shape, cfg.text_before_image, v)
    reuse_image_first = (
        llava - prefix_image_first.total + prefix_image_first.lm_head + prefix_image_first.total / questions
    )
    text_prefix = F.llava_prefill_flops(shape, cfg.text_before_image, 0)
    reuse_question_first = llava - text_prefix.llm + text_prefix.llm / questions
    flops = {
        "image_first": dict(zip(METHODS, (llava, reuse_image_first, saisa.total, store))),
        "question_first": dict(zip(METHODS, (llava, reuse_question_first, saisa.total, store))),
    }
    return {layout: {m: llava / f for m, f in per.items()} for layout, per in flops.items()}


def run_reuse_benchmark(
    cfg: BenchConfig,
    images: int = 4,
    questions: int = 8,
    question_tokens: int = 16,
    repeats: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the four methods in both layouts; throughput = prompt tokens (visual included) / seconds.

    Each repeat is one pass of every (method, phase) over the workload, run interleaved: each prompt is answered by
    all eight passes in turn, the first of them rotating from prompt to prompt, so that a slow minute of the machine
    (load from elsewhere) falls on every method alike instead of on whichever pass was running. A time is a pass's
    sum; the table takes the median over repeats (the minimum is kept too).
    """
    log = (lambda message: print(f"[saisa bench --reuse] {message}", file=sys.stderr, flush=True)) if progress else None
    llava, saisa = build_models(cfg, seed)[:2]
    image_id = cfg.vocab - 1
    results: dict[str, Any] = {
        "images": images,
        "questions": questions,
        "repeats": repeats,
        "config": asdict(cfg),
        "machine": machine_info(torch.get_num_threads()),
        "analytic_speedup": _analytic(cfg, saisa.config, question_tokens, questions),
    }
    phases = (("prefill", 1), ("end_to_end", cfg.decode_steps))
    with torch.inference_mode():
        for layout in LAYOUTS:
            prompts, pixel_values = _prompts(cfg, layout, images, questions, question_tokens, seed)
            tokens = sum(ids.shape[1] for _, ids in prompts)
            times: dict[tuple[str, str], list[float]] = {(m, p): [] for m in METHODS for p, _ in phases}
            stats: dict[str, Any] = {}
            for method in METHODS:  # warm-up
                warm = _Pass(method, "prefill", 1, (llava, saisa), prompts[:2], pixel_values, image_id)
                for image, ids in prompts[:2]:
                    warm.answer(image, ids)
            for repeat in range(repeats):
                if log:
                    log(f"{layout}: repeat {repeat + 1} of {repeats}")
                passes = [
                    _Pass(m, phase, n, (llava, saisa), prompts, pixel_values, image_id)
                    for m in METHODS
                    for phase, n in phases
                ]
                for index, (image, ids) in enumerate(prompts):
                    gc.collect()
                    turn = (index + repeat) % len(passes)  # who goes first rotates from prompt to prompt
                    for run in passes[turn:] + passes[:turn]:
                        run.answer(image, ids)
                for run in passes:
                    times[(run.method, run.phase)].append(run.seconds)
                    if run.store is not None:
                        stats[run.method] = run.store.stats()
            row: dict[str, dict[str, Any]] = {}
            for method in METHODS:
                prefill, end_to_end = times[(method, "prefill")], times[(method, "end_to_end")]
                row[method] = {
                    "prefill_s": statistics.median(prefill),
                    "prefill_min_s": min(prefill),
                    "prefill_tokens_per_s": tokens / statistics.median(prefill),
                    "end_to_end_s": statistics.median(end_to_end),
                    "end_to_end_min_s": min(end_to_end),
                    "all_s": {"prefill": prefill, "end_to_end": end_to_end},
                }
                if method in stats:
                    row[method]["store_stats"] = stats[method]
            base = row["llava_generate"]["prefill_tokens_per_s"]
            for method in METHODS:
                row[method]["prefill_speedup"] = row[method]["prefill_tokens_per_s"] / base
            results[layout] = row
    return results


# The reuse issue's targets: (layout, method, reference method, least speedup in prefill throughput).
REUSE_TARGETS = (
    ("image_first", "saisa_store", "llava_generate", 5.0),
    ("question_first", "saisa_store", "llava_generate", 5.0),
    ("question_first", "saisa_store", "llava_prefix_reuse", 1.5),
)
LABELS = {
    "llava_generate": "(a) Llava generate",
    "llava_prefix_reuse": "(b) Llava + prefix cache",
    "saisa": "(c) SAISA",
    "saisa_store": "(d) SAISA + ImageKVStore",
}


def reuse_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for layout, method, reference, least in REUSE_TARGETS:
        rows = results[layout]
        measured = rows[method]["prefill_tokens_per_s"] / rows[reference]["prefill_tokens_per_s"]
        checks.append(
            {"layout": layout, "method": method, "over": reference, "least": least, "measured": measured,
             "met": measured >= least}
        )  # fmt: skip
    return checks


def format_reuse_table(results: dict[str, Any]) -> str:
    """Markdown: every method in both layouts, the speedups beside the analytic ones, then the targets."""
    lines = [
        f"{results['images']} images x {results['questions']} questions, one prompt at a time "
        f"(median of {results.get('repeats', 1)} repeats)",
        "",
        "| layout | method | prefill tok/s | prefill s | end to end s | prefill speedup | analytic |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for layout in LAYOUTS:
        for method in METHODS:
            r = results[layout][method]
            lines.append(
                f"| {layout.replace('_', ' ')} | {LABELS[method]} | {r['prefill_tokens_per_s']:.0f} | "
                f"{r['prefill_s']:.2f} | {r['end_to_end_s']:.2f} | {r['prefill_speedup']:.2f}x | "
                f"{results['analytic_speedup'][layout][method]:.2f}x |"
            )
    lines.append("")
    for check in reuse_targets(results):
        lines.append(
            f"{check['layout'].replace('_', ' ')}: {LABELS[check['method']]} over {LABELS[check['over']]}: "
            f"{check['measured']:.2f}x (target >= {check['least']:.1f}x): {'met' if check['met'] else 'missed'}"
        )
    return "\n".join(lines)


def plot_reuse(results: dict[str, Any], path: str) -> None:
    """Measured and analytic prefill speedups over Llava generate, per method and layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LAYOUTS), figsize=(11, 4), sharey=True)
    for ax, layout in zip(axes, LAYOUTS):
        x = range(len(METHODS))
        measured = [results[layout][m]["prefill_speedup"] for m in METHODS]
        analytic = [results["analytic_speedup"][layout][m] for m in METHODS]
        ax.bar([i - 0.2 for i in x], measured, width=0.4, label="measured", color="#3b75af")
        ax.bar([i + 0.2 for i in x], analytic, width=0.4, label="analytic FLOPs", color="#cfe2f3")
        for i, value in enumerate(measured):
            ax.text(i - 0.2, value + 0.1, f"{value:.1f}x", ha="center", fontsize=8)
        ax.set_xticks(list(x), [LABELS[m].split(") ", 1)[1] for m in METHODS], fontsize=8, rotation=15)
        ax.set_title(layout.replace("_", " "), fontsize=9)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axes[0].set_ylabel("prefill throughput / Llava generate")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{results['images']} images x {results['questions']} questions, CPU "
        f"{results['machine']['torch_threads']} threads, fp32",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reuse_outputs(results: dict[str, Any], out_dir: str) -> dict[str, str]:
    """`reuse_bench_results.json` (with the targets) and `reuse_bench_speedups.png` in `out_dir`."""
    results = {**results, "targets": reuse_targets(results)}
    return write_results(results, out_dir, "reuse_bench_results.json", "reuse_bench_speedups.png", plot_reuse)
