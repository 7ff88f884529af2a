"""`saisa bench --reuse`: many questions about the same images, LLaVA against SAISA with and without `ImageKVStore`.

The workload is `images` images x `questions` questions each, answered one prompt at a time by
(a) transformers' Llava `generate`, (b) Llava reusing a deep copy of the prefix cache shared by the prompts of one
image (it covers the image only when the image comes before the question), (c) SAISA `generate`, (d) SAISA with a
fresh `ImageKVStore` per pass (the first question about each image fills it). Two prompt layouts: image first, and
question first (the prefix cache then covers only the text before the question). Prefill is timed as
`generate(max_new_tokens=1)` over the whole workload (prefix building and store filling included); end to end as
`generate(max_new_tokens=decode_steps)`. Both models share weights and shapes (`benchmark.build_models`).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from modeling_saisa import flops as F
from modeling_saisa.benchmark import BenchConfig, build_models
from modeling_saisa.image_kv import ImageKVStore

__all__ = ["METHODS", "LAYOUTS", "run_reuse_benchmark", "format_reuse_table"]

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


def _run(method: str, llava, saisa, prompts, pixel_values, image_id: int, new_tokens: int) -> None:
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    store = ImageKVStore(max_bytes=1 << 40) if method == "saisa_store" else None
    prefixes: dict[int, tuple[int, Any]] = {}
    if method == "llava_prefix_reuse":
        for image in sorted({i for i, _ in prompts}):
            ids = [p for i, p in prompts if i == image]
            length = _common_prefix(ids)
            prefix = ids[0][:, :length]
            has_image = bool((prefix == image_id).any())
            extra = dict(pixel_values=pixel_values[image : image + 1]) if has_image else {}
            prefixes[image] = (length, llava(input_ids=prefix, use_cache=True, **extra).cache)
    for image, ids in prompts:
        px = pixel_values[image : image + 1]
        mask = torch.ones_like(ids)
        if method == "llava_generate":
            llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **gen)
        elif method == "llava_prefix_reuse":
            length, cache = prefixes[image]
            # The image's pixels are needed only if the cached prefix stops before the image.
            extra = {} if bool((ids[:, :length] == image_id).any()) else dict(pixel_values=px)
            llava.generate(input_ids=ids, attention_mask=mask, cache=copy.deepcopy(cache), **extra, **gen)
        else:
            saisa.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_kv=store, **gen)


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
    cfg: BenchConfig, images: int = 4, questions: int = 8, question_tokens: int = 16, repeats: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Measure the four methods in both layouts; throughput = prompt tokens (visual included) / seconds."""
    llava, saisa = build_models(cfg, seed)[:2]
    image_id = cfg.vocab - 1
    results: dict[str, Any] = {
        "images": images,
        "questions": questions,
        "analytic_speedup": _analytic(cfg, saisa.config, question_tokens, questions),
    }
    with torch.inference_mode():
        for layout in LAYOUTS:
            prompts, pixel_values = _prompts(cfg, layout, images, questions, question_tokens, seed)
            tokens = sum(ids.shape[1] for _, ids in prompts)
            row: dict[str, dict[str, float]] = {}
            for method in METHODS:
                _run(method, llava, saisa, prompts[:2], pixel_values, image_id, 1)  # warm-up
                timings = {}
                for phase, new_tokens in (("prefill", 1), ("end_to_end", cfg.decode_steps)):
                    best = float("inf")
                    for _ in range(repeats):
                        start = time.perf_counter()
                        _run(method, llava, saisa, prompts, pixel_values, image_id, new_tokens)
                        best = min(best, time.perf_counter() - start)
                    timings[phase] = best
                row[method] = {
                    "prefill_s": timings["prefill"],
                    "prefill_tokens_per_s": tokens / timings["prefill"],
                    "end_to_end_s": timings["end_to_end"],
                }
            base = row["llava_generate"]["prefill_tokens_per_s"]
            for method in METHODS:
                row[method]["prefill_speedup"] = row[method]["prefill_tokens_per_s"] / base
            results[layout] = row
    return results


def format_reuse_table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['images']} images x {results['questions']} questions, one prompt at a time",
        f"{'layout':<15} {'method':<20} {'prefill tok/s':>14} {'prefill s':>10} {'end-to-end s':>13} "
        f"{'speedup':>8} {'analytic':>9}",
    ]
    for layout in LAYOUTS:
        for method in METHODS:
            r = results[layout][method]
            lines.append(
                f"{layout:<15} {method:<20} {r['prefill_tokens_per_s']:>14.0f} {r['prefill_s']:>10.2f} "
                f"{r['end_to_end_s']:>13.2f} {r['prefill_speedup']:>7.2f}x "
                f"{results['analytic_speedup'][layout][method]:>8.2f}x"
            )
    return "\n".join(lines)
