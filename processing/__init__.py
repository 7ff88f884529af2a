"""Processing classes (installed as `modeling_saisa.processing`): image processor, processor, chat templates."""

from .image_processing_saisa import (
    SaisaImageProcessor,
    SaisaImagesKwargs,
    install_pipeline_image_errors,
    pad_fill_color,
)
from .processing_saisa import SaisaProcessor, SaisaProcessorKwargs
from .templates import CHAT_TEMPLATE_NAMES, DEFAULT_CHAT_TEMPLATE, load_chat_template

__all__ = [
    "CHAT_TEMPLATE_NAMES",
    "DEFAULT_CHAT_TEMPLATE",
    "SaisaImageProcessor",
    "SaisaImagesKwargs",
    "SaisaProcessor",
    "SaisaProcessorKwargs",
    "install_pipeline_image_errors",
    "load_chat_template",
    "pad_fill_color",
]
