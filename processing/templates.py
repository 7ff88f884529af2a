"""The bundled chat templates, by name: `load_chat_template("vicuna_v1")` returns the Jinja source.

The templates live as `chat_templates/<name>.jinja` package data (installed with the package), so that a processor
saved with `save_pretrained` carries the same bytes in its `chat_template.jinja`:

- `vicuna_v1` (default): the saisa-vicuna / LLaVA-1.5 prompt, byte-exact with the original
  ("<system> USER: <image>\\n{question} ASSISTANT:", answers end with "</s>").
- `llama_3`: the saisa-llama3 prompt: the same text and roles, answers end with "<|end_of_text|>".
"""

from __future__ import annotations

from importlib import resources

__all__ = ["CHAT_TEMPLATE_NAMES", "DEFAULT_CHAT_TEMPLATE", "load_chat_template"]

CHAT_TEMPLATE_NAMES = ("vicuna_v1", "llama_3")
DEFAULT_CHAT_TEMPLATE = "vicuna_v1"


def load_chat_template(name: str = DEFAULT_CHAT_TEMPLATE) -> str:
    """Return the Jinja source of the bundled template `name` (one of `CHAT_TEMPLATE_NAMES`)."""
    if name not in CHAT_TEMPLATE_NAMES:
        raise ValueError(f"Unknown chat template {name!r}; bundled templates are {list(CHAT_TEMPLATE_NAMES)}.")
    return resources.files(__package__).joinpath("chat_templates", f"{name}.jinja").read_text(encoding="utf-8")
