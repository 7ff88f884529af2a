"""`SaisaProcessor`: image processor + tokenizer + chat template, producing exactly what the model's `forward` takes.

It behaves like transformers' `LlavaProcessor` (same `<image>` convention, same chat-template flow, works with
`pipeline("image-text-to-text")`), with these choices, each for a reason:

- Every `<image>` in the prompt becomes `image_seq_length` copies of the image token (576 for CLIP ViT-L/14-336),
  because the model finds the visual positions by that id and SAISA places visual K/V at exactly those positions.
  `image_seq_length` is stored in `processor_config.json` and must equal the model config's `image_seq_length`.
- Padding defaults to the left: batched generation appends to the right end of every row.
- The output holds only `input_ids`, `attention_mask` and `pixel_values`: `generate` rejects keys its model's
  `forward` does not name (e.g. `token_type_ids`).
- Mistakes fail early with a `ValueError` that says what to fix: tag/image count mismatches (both counts, per prompt
  when images are given per prompt), empty prompts, missing or unreadable image files (the path), empty images.

With the `vicuna_v1` template and a Llama/Vicuna tokenizer, BOS + the system prompt + `" USER: "` is 35 tokens, so the
first visual token sits at index 35 and the text after the image at 35 + 576 (LLaVA-1.5's layout, spec §3).
"""

# No `from __future__ import annotations`: transformers reads the kwargs TypedDicts' annotations at runtime.

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.image_utils import ImageInput, is_valid_image
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput

from .image_processing_saisa import SaisaImageProcessor, SaisaImagesKwargs
from .templates import CHAT_TEMPLATE_NAMES, load_chat_template

__all__ = ["SaisaProcessor", "SaisaProcessorKwargs"]

# What the model's forward takes from the processor; anything else would make `generate` fail.
_MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values")


class SaisaProcessorKwargs(ProcessingKwargs, total=False):
    """Processor kwargs: transformers' usual ones, with SAISA's image kwargs (`do_pad_to_square`)."""

    images_kwargs: SaisaImagesKwargs


class SaisaProcessor(ProcessorMixin):
    r"""
    Processor for SAISA: a [`SaisaImageProcessor`] and a tokenizer that knows the image token, plus a chat template.

    Args:
        image_processor ([`SaisaImageProcessor`]):
            Turns images into `pixel_values` (pad to square, CLIP resize/crop/normalise).
        tokenizer ([`PreTrainedTokenizerBase`]):
            Must contain `image_token` as a single, never-split token (see `modeling_saisa.tokenizers.add_image_token`).
        chat_template (`str`, *optional*):
            A Jinja template, or the name of a bundled one (`"vicuna_v1"`, `"llama_3"`). Defaults to `"vicuna_v1"`,
            the original SAISA prompt.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The placeholder written in prompts; the tokenizer's own `image_token`, if it has one, wins.
        image_seq_length (`int`, *optional*, defaults to 576):
            Visual tokens per image; must equal the model config's `image_seq_length`.
        padding_side (`str`, *optional*, defaults to `"left"`):
            Set on the tokenizer; left padding is what batched generation needs. Per call, `padding_side="right"`
            (e.g. in a training collator) overrides it.

    Example:

    ```python
    >>> processor = SaisaProcessor(SaisaImageProcessor(), tokenizer)  # doctest: +SKIP
    >>> messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    >>> prompt = processor.apply_chat_template(messages, add_generation_prompt=True)  # doctest: +SKIP
    >>> inputs = processor(images=image, text=prompt, return_tensors="pt")  # doctest: +SKIP
    ```
    """

    valid_processor_kwargs = SaisaProcessorKwargs

    def __init__(
        self,
        image_processor: SaisaImageProcessor | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        image_seq_length: int = 576,
        padding_side: str = "left",
    ) -> None:
        if image_processor is None or tokenizer is None:
            raise ValueError("SaisaProcessor needs both an image_processor and a tokenizer.")
        if not isinstance(image_seq_length, int) or isinstance(image_seq_length, bool) or image_seq_length < 1:
            raise ValueError(f"image_seq_length must be a positive int, got {image_seq_length!r}.")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        self.image_token = getattr(tokenizer, "image_token", None) or image_token
        self.image_token_id = self._single_token_id(tokenizer, self.image_token)
        self.image_seq_length = image_seq_length
        self.padding_side = padding_side
        tokenizer.padding_side = padding_side
        if chat_template is None:
            chat_template = "vicuna_v1"
        if isinstance(chat_template, str) and chat_template in CHAT_TEMPLATE_NAMES:
            chat_template = load_chat_template(chat_template)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @staticmethod
    def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
        """The id of `token`, which must be one token of its own (so the expansion can be counted by id)."""
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer does not know {token!r} as a single token (it encodes to {ids}). Add it first with "
                "modeling_saisa.tokenizers.add_image_token(tokenizer) and resize the model's embeddings."
            )
        return int(ids[0])

    @classmethod
    def from_model_config(
        cls,
        config: Any,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = "vicuna_v1",
        **image_processor_kwargs: Any,
    ) -> "SaisaProcessor":
        """Build the processor that matches a `SaisaConfig`: image size, normalisation and tokens per image.

        CLIP towers get CLIP's mean/std with a shortest-edge resize + centre crop; SigLIP towers get mean = std = 0.5
        and a square resize (no crop), as their own processors do. The image token must already be in `tokenizer`
        with the config's `image_token_id`.
        """
        vision = config.vision_config
        side = int(vision.image_size)
        kwargs: dict[str, Any] = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
        if str(vision.model_type).startswith("siglip"):
            kwargs = {
                "size": {"height": side, "width": side},
                "do_center_crop": False,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            }
        kwargs.update(image_processor_kwargs)
        processor = cls(
            image_processor=SaisaImageProcessor(**kwargs),
            tokenizer=tokenizer,
            chat_template=chat_template,
            image_seq_length=int(config.image_seq_length),
        )
        expected_id = getattr(config, "image_token_id", None)
        if expected_id is not None and processor.image_token_id != expected_id:
            raise ValueError(
                f"The tokenizer maps {processor.image_token!r} to id {processor.image_token_id}, but the model config "
                f"expects image_token_id={expected_id}."
            )
        return processor

    # ------------------------------------------------------------------------------------------------- calling
    def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
        """Render (and with `tokenize=True, return_dict=True`, process) chat messages; see `ProcessorMixin`.

        Messages are checked first so that an empty user turn is reported as such: the template would otherwise
        wrap it in the system prompt and the model would answer a question nobody asked.
        `chat_template` may also name a bundled template (`"vicuna_v1"`, `"llama_3"`).
        """
        if isinstance(chat_template, str) and chat_template in CHAT_TEMPLATE_NAMES:
            chat_template = load_chat_template(chat_template)
        batched = isinstance(conversation, (list, tuple)) and bool(conversation)
        batched = batched and isinstance(conversation[0], (list, tuple))
        for messages in conversation if batched else [conversation]:
            self._check_messages(messages)
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    @staticmethod
    def _check_messages(messages: Any) -> None:
        if hasattr(messages, "messages"):  # a pipeline `Chat`
            messages = messages.messages
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("A conversation must be a non-empty list of {'role': ..., 'content': ...} messages.")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"Message {i} must be a dict with 'role' and 'content'; got {message!r}.")
            if message["role"] != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                empty = not content.strip()
            else:
                parts = content or []
                empty = not any(
                    isinstance(part, dict)
                    and (part.get("type") not in ("text", None) or str(part.get("text", "")).strip())
                    for part in parts
                )
            if empty:
                raise ValueError(f"Message {i} (user) is empty; write a question or add an image.")

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        videos: None = None,
        audio: None = None,
        **kwargs: Unpack[SaisaProcessorKwargs],
    ):
        """Tokenise `text` with each `<image>` expanded, and preprocess `images` (one per `<image>`, in order).

        `images` may be flat (matched to the tags in reading order across the batch) or nested per prompt (then each
        prompt's tags must match its own images). Returns a `BatchFeature` with `input_ids`, `attention_mask` and
        (when images are given) `pixel_values`.
        """
        if videos is not None or audio is not None:
            raise ValueError("SaisaProcessor handles images and text only (no videos or audio).")
        return super().__call__(images=images, text=text, **kwargs)

    def validate_inputs(
        self,
        images: ImageInput | None = None,
        text: TextInput | list[TextInput] | None = None,
        videos: None = None,
        audio: None = None,
        **kwargs: Any,
    ) -> None:
        """Check prompts and images before any work, with messages that name the prompt and both counts."""
        if images is None and text is None:
            raise ValueError("SaisaProcessor needs `text` (a prompt or a list of prompts) and/or `images`.")
        if images is not None:
            self._check_images_not_empty(images)
        if text is None:
            return
        prompts = [text] if isinstance(text, str) else text
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"`text` must be a string or a list of strings, got {type(text).__name__}.")
        if len(prompts) == 0:
            raise ValueError("`text` is an empty list; pass at least one prompt.")
        for i, prompt in enumerate(prompts):
            if not prompt.strip():
                raise ValueError(f"Prompt {i} is empty; write a question or instruction.")
        tags = [prompt.count(self.image_token) for prompt in prompts]
        where = "The prompt contains" if len(prompts) == 1 else "The prompts contain"
        if images is None:
            if sum(tags):
                raise ValueError(
                    f"{where} {sum(tags)} {self.image_token} tag(s) but no images were passed; "
                    f"pass one image per {self.image_token} or remove the tags."
                )
            return
        per_prompt = self._images_per_prompt(images, len(prompts))
        if per_prompt is not None:
            for i, (n_tags, n_images) in enumerate(zip(tags, per_prompt)):
                if n_tags != n_images:
                    raise ValueError(
                        f"Prompt {i} contains {n_tags} {self.image_token} tag(s) but {n_images} image(s) were passed "
                        f"for it; each {self.image_token} needs exactly one image."
                    )
            return
        n_images = len(self._flatten(images))
        if sum(tags) != n_images:
            raise ValueError(
                f"{where} {sum(tags)} {self.image_token} tag(s) but {n_images} image(s) were "
                f"passed; each {self.image_token} needs exactly one image, in order."
            )

    def _flatten(self, images: Any) -> list[Any]:
        """Single images in reading order; a 4-D array/tensor is a stack of images, as transformers reads it."""
        if isinstance(images, (list, tuple)):
            return [leaf for item in images for leaf in self._flatten(item)]
        if getattr(images, "ndim", None) == 4:
            return list(images)
        return [images]

    @staticmethod
    def _images_per_prompt(images: Any, n_prompts: int) -> list[int] | None:
        """Counts per prompt when `images` is nested one list per prompt (as `apply_chat_template` passes them)."""
        if (
            isinstance(images, (list, tuple))
            and len(images) == n_prompts
            and all(isinstance(item, (list, tuple)) for item in images)
        ):
            return [len(item) for item in images]
        return None

    def _check_images_not_empty(self, images: Any) -> None:
        flat = self._flatten(images)
        if not flat:
            raise ValueError("`images` is empty; pass one image per image tag, or leave `images` out.")
        for i, image in enumerate(flat):
            if image is None:
                raise ValueError(f"Image {i} is None.")
            if not is_valid_image(image):
                raise ValueError(
                    f"Image {i} is a {type(image).__name__}; expected a PIL image, a NumPy array, a torch tensor, "
                    "or a path/URL string."
                )

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """Each image takes `image_seq_length` placeholder tokens, whatever its original size (it is resized)."""
        return self.image_token * self.image_seq_length

    @property
    def unused_input_names(self) -> list[str]:
        """Keys some tokenizers add that SAISA's forward (hence `generate`) does not accept."""
        return ["token_type_ids"]

    @property
    def model_input_names(self) -> list[str]:
        return list(_MODEL_KEYS)

    def _get_num_multimodal_tokens(
        self, image_sizes: Sequence[Sequence[int]] | None = None, **kwargs: Any
    ) -> MultiModalData:
        """Placeholder counts per image (used by serving engines such as vLLM): always `image_seq_length`."""
        data = {}
        if image_sizes is not None:
            data = {
                "num_image_tokens": [self.image_seq_length] * len(image_sizes),
                "num_image_patches": [1] * len(image_sizes),
            }
        return MultiModalData(**data)

    # ----------------------------------------------------------------------------------------------- decoding
    def post_process_image_text_to_text(
        self, generated_outputs: Any, skip_special_tokens: bool = True, **kwargs: Any
    ) -> list[str]:
        """Decode `generate` output (batch, seq) into one string per row; image and padding tokens are dropped.

        Why it exists: the image-text-to-text pipeline decodes both the prompt and the full output with it and strips
        the former from the latter (`return_full_text=False`), so both must decode the same way.
        """
        if hasattr(generated_outputs, "tolist"):
            generated_outputs = generated_outputs.tolist()
        if generated_outputs and isinstance(generated_outputs[0], int):
            generated_outputs = [generated_outputs]
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
