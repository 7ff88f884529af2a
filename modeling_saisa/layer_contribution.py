"""ShortV's Layer Contribution (LC) of every decoder layer for visual tokens, and the preset it selects.

Why: ShortV replaces the layers whose visual-token updates matter least by `frozen` layers; which layers those are
is a property of the checkpoint, measured on calibration prompts. LC of layer i is the divergence of the
next-token distribution at the prompt's last position when only layer i is frozen for the visual rows. The KL
direction is the released code's: ``KLDivLoss(batchmean)(log_softmax(z_orig), softmax(z_i))`` = ``KL(P_i || P_orig)``.

What is reused: layers before i are identical in the clean pass and in "layer i frozen", so the clean pass records
every layer's input (a forward pre-hook per layer) and the frozen-i pass starts there: the backbone runs only
layers i..L-1 (its own embedding is bypassed through `inputs_embeds`; its rotary, masks and final norm are its own
code, computed from the same positions and padding mask). That is L(L+1)/2 layer evaluations per prompt instead of
L^2 - about half. The frozen layer itself is the spec's exact oracle: the unmodified layer runs, then its visual rows
are put back to their input (a text row's output depends only on its query and the K/V, which are unchanged).

Works on a transformers `LlavaForConditionalGeneration` (a llava-hf checkpoint: every layer dense), whose backbone
loops over `language_model.layers`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "calibration_batches",
    "last_positions",
    "layer_contributions",
    "lc_order",
    "plot_layer_contributions",
    "write_policy_preset",
]


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, for left or right padding (the prompt's end, where LC is read)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _only_layers_from(language_model: nn.Module, start: int) -> Iterator[None]:
    """Run the backbone's own forward over layers `start..L-1` only (restored on exit, errors included)."""
    layers = language_model.layers
    language_model.layers = nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        language_model.layers = layers


@contextmanager
def _frozen_visual_rows(layer: nn.Module, is_visual: torch.Tensor) -> Iterator[None]:
    """Make `layer` a ShortV frozen layer for the rows in `is_visual`: output visual rows = input visual rows."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x_in = args[0] if args else kwargs["hidden_states"]
        out = _hidden(output)
        out = torch.where(is_visual.unsqueeze(-1), x_in, out)
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _language_model(model: nn.Module) -> nn.Module:
    lm = getattr(getattr(model, "model", None), "language_model", None)
    if lm is None or not isinstance(getattr(lm, "layers", None), nn.ModuleList):
        raise TypeError(
            f"LC needs a LLaVA-style model with `model.language_model.layers` (a transformers "
            f"LlavaForConditionalGeneration), got {type(model).__name__}"
        )
    return lm


def _kl_to_orig(z_i: torch.Tensor, z_orig: torch.Tensor) -> torch.Tensor:
    """Per row ``KL(P_i || P_orig)`` of last-position logits, in float32."""
    logp_i = torch.log_softmax(z_i.float(), dim=-1)
    logp_o = torch.log_softmax(z_orig.float(), dim=-1)
    return (logp_i.exp() * (logp_i - logp_o)).sum(-1)


@torch.no_grad()
def layer_contributions(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], progress: bool = True, total: int | None = None
) -> torch.Tensor:
    """Mean LC of every decoder layer over the prompts of `batches` (processor outputs: input_ids,
    attention_mask, pixel_values, ...). One clean prefill per batch, then one partial prefill per layer."""
    from tqdm.auto import tqdm

    lm = _language_model(model)
    layers = list(lm.layers)
    image_token_id = model.config.image_token_id
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    bar = tqdm(total=None if total is None else total * len(layers), disable=not progress, desc="LC", unit="layer")
    for batch in batches:
        mask = batch["attention_mask"]
        # positions from the padding mask (as `generate` does), so a padded row is scored as if it were alone
        batch = {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0), **batch}
        last = last_positions(mask)
        rows = torch.arange(mask.shape[0], device=mask.device)
        is_visual = batch["input_ids"] == image_token_id
        inputs: list[torch.Tensor] = []
        handles = [
            layer.register_forward_pre_hook(
                lambda _m, args, kwargs, sink=inputs: sink.append(args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True,
            )
            for layer in layers
        ]
        try:
            # The base model (no LM head): z_orig comes from the head on the same [B, h] rows as every z_i below; a
            # product of another shape (logits over all [B*S] rows) may round differently (seen with MKL on an
            # AVX2-only AMD CPU), and a layer that changes nothing must score exactly 0.
            final = model.model(**batch, use_cache=False).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
        z_orig = model.lm_head(final[rows, last])
        for i, layer in enumerate(layers):
            with _only_layers_from(lm, i), _frozen_visual_rows(layer, is_visual):
                hidden = lm(
                    inputs_embeds=inputs[i], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
                ).last_hidden_state
            z_i = model.lm_head(hidden[rows, last])
            sums[i] += _kl_to_orig(z_i, z_orig).double().sum().cpu()
            bar.update(1)
        count += int(mask.shape[0])
    bar.close()
    if count == 0:
        raise ValueError("no calibration prompts: the data gave no batches")
    return (sums / count).float()


def _prompt_turns(messages: list[dict]) -> list[dict]:
    """The turns before the first answer: the calibration prompt ends where the model would start answering."""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            return messages[:index]
    return messages


def calibration_batches(
    processor: Any, data: str, image_folder: str | None = None, batch_size: int = 4, max_prompts: int | None = None
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Processor batches of the first user turn(s) of each LLaVA JSON conversation with images (the released
    calibration: one prefill per prompt, the chat template's generation prompt appended). Returns (batches, n)."""
    from PIL import Image

    from modeling_saisa.training.data import load_llava_json

    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    folder = image_folder if image_folder is not None else os.path.dirname(os.path.abspath(data))
    prompts = [e for e in load_llava_json(data) if e.images][:max_prompts]
    if not prompts:
        raise ValueError(f"{data}: no conversation with an image (LC measures visual tokens)")
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        texts = [
            processor.apply_chat_template(_prompt_turns(e.messages), add_generation_prompt=True, tokenize=False)
            for e in chunk
        ]
        images = []
        for example in chunk:
            for image in example.images:
                path = image if os.path.isabs(image) else os.path.join(folder, image)
                with Image.open(path) as handle:
                    images.append(handle.convert("RGB"))
        batches.append(dict(processor(text=texts, images=images, padding=True, return_tensors="pt")))
    return batches, len(prompts)


def lc_order(lc: torch.Tensor) -> list[int]:
    """Layers in ascending LC (ShortV replaces the first N); ties keep layer order."""
    return sorted(range(len(lc)), key=lambda i: (float(lc[i]), i))


def _atomic_write(path: str, write: Any, mode: str = "w") -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_policy_preset(path: str, lc: torch.Tensor, n_frozen: int, source: str | None = None) -> list[str]:
    """Write `{"visual_policy": [...], ...}` with the `n_frozen` lowest-LC layers `frozen`, the rest `dense`
    (atomically); returns the list. The file is what `resolve_visual_policy` / `from_llava` read."""
    num_layers = len(lc)
    if not 0 <= n_frozen <= num_layers:
        raise ValueError(f"--layers must be within 0..{num_layers} (the model's decoder layers), got {n_frozen}")
    order = lc_order(lc)
    frozen = set(order[:n_frozen])
    policy = ["frozen" if i in frozen else "dense" for i in range(num_layers)]
    payload = {
        "visual_policy": policy,
        "replaced_layers_in_lc_order": order[:n_frozen],
        "lc_order": order,
        "layer_contribution": [float(x) for x in lc],
        "kl_direction": "KL(P_frozen_i || P_orig) at the last prompt position",
        "source": source,
    }
    _atomic_write(path, lambda handle: json.dump(payload, handle, indent=2))
    return policy


def plot_layer_contributions(path: str, lc: torch.Tensor, n_frozen: int, title: str = "") -> None:
    """A bar per layer (log scale), the `n_frozen` replaced layers highlighted; saved as PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frozen = set(lc_order(lc)[:n_frozen])
    values = [max(float(x), 1e-12) for x in lc]
    colors = ["tab:orange" if i in frozen else "tab:blue" for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(values)), 3.5))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("LC = KL(P_frozen_i || P_orig)")
    ax.set_title(title or f"Layer Contribution for visual tokens (orange: the {n_frozen} frozen layers)")
    fig.tight_layout()
    try:
        _atomic_write(path, lambda handle: fig.savefig(handle, format="png"), mode="wb")
    finally:
        plt.close(fig)
