"""modeling_saisa: SAISA (Self-Attention Input Space Alignment) multimodal LLMs on Hugging Face transformers.

Importing the package registers SAISA with transformers' Auto classes, so that `AutoConfig`,
`AutoModel`, `AutoModelForImageTextToText` (and `AutoProcessor`) resolve `model_type="saisa"`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from modeling_saisa.configuration import SaisaConfig
from modeling_saisa.modeling_saisa import SaisaForConditionalGeneration, SaisaModel, SaisaPreTrainedModel

__version__ = "0.1.0"

__all__ = [
    "SaisaConfig",
    "SaisaForConditionalGeneration",
    "SaisaModel",
    "SaisaPreTrainedModel",
]

AutoConfig.register("saisa", SaisaConfig, exist_ok=True)
AutoModel.register(SaisaConfig, SaisaModel, exist_ok=True)
AutoModelForImageTextToText.register(SaisaConfig, SaisaForConditionalGeneration, exist_ok=True)
