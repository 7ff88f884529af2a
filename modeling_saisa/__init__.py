"""modeling_saisa: SAISA (Self-Attention Input Space Alignment) multimodal LLMs on Hugging Face transformers.

Importing the package registers SAISA with transformers' Auto classes, so that `AutoConfig`,
`AutoModel`, `AutoModelForImageTextToText` (and `AutoProcessor`) resolve `model_type="saisa"`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from modeling_saisa.configuration import SaisaConfig
from modeling_saisa.image_kv import ImageKVStore
from modeling_saisa.modeling_saisa import SaisaForConditionalGeneration, SaisaModel, SaisaPreTrainedModel
from modeling_saisa.processing import SaisaImageProcessor, SaisaProcessor, install_pipeline_image_errors

__version__ = "0.1.0"

__all__ = [
    "ImageKVStore",
    "SaisaConfig",
    "SaisaForConditionalGeneration",
    "SaisaImageProcessor",
    "SaisaModel",
    "SaisaPreTrainedModel",
    "SaisaProcessor",
]

AutoConfig.register("saisa", SaisaConfig, exist_ok=True)
AutoModel.register(SaisaConfig, SaisaModel, exist_ok=True)
AutoModelForImageTextToText.register(SaisaConfig, SaisaForConditionalGeneration, exist_ok=True)
# The image processor is PIL-backed (torchvision does not import beside the CPU torch wheel); registering it under
# "pil" lets `AutoImageProcessor` / `AutoProcessor.from_pretrained(dir)` find it by its saved class name.
AutoImageProcessor.register(SaisaConfig, image_processor_classes={"pil": SaisaImageProcessor}, exist_ok=True)
AutoProcessor.register(SaisaConfig, SaisaProcessor, exist_ok=True)

# `save_pretrained` writes `auto_map` and copies the defining modules, so a saved checkpoint also loads with
# `trust_remote_code=True` wherever this package is installed.
SaisaConfig.register_for_auto_class()
SaisaModel.register_for_auto_class("AutoModel")
SaisaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

# pipeline("image-text-to-text") loads image strings before the processor: give a missing file the same one-line
# message as the processor and the chat route ("Image file 'x' does not exist.").
install_pipeline_image_errors()
