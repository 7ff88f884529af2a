"""Training SAISA with transformers' Trainer: data, collator, the two-stage recipe, LoRA, the demo.

Modules (imported on demand, so that `import modeling_saisa` stays light):
- `data`: LLaVA conversation JSON / `datasets.Dataset` rows, checked up front, images loaded lazily.
- `collator`: chat-template encoding with labels on assistant replies only, and batch padding.
- `recipes`: stage 1 / stage 2 (full or LoRA), `stage2_from_stage1`, `train_stage` (what `saisa train` runs).
- `synthetic`, `demo`: the coloured-shapes task and `saisa demo`.
- `configs/`: DeepSpeed ZeRO-2/3, FSDP and accelerate configs and example stage YAMLs; `config_path(name)`.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["config_path"]


def config_path(name: str = "") -> str:
    """Filesystem path of a shipped config (e.g. `config_path("zero3.json")`), or of the folder for `""`."""
    folder = resources.files(__package__).joinpath("configs")
    path = folder.joinpath(name) if name else folder
    if name and not path.is_file():
        available = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(f"No shipped training config {name!r}; available: {available}")
    return str(path)
