"""Turn chat conversations into model-ready training batches: `input_ids`, `attention_mask`, `pixel_values`, `labels`.

Why the labels are computed this way:

- The prompt format belongs to the processor's chat template (`vicuna_v1`, `llama_3`, or any template the user
  ships), so the collator never hard-codes separators. It renders the conversation once, and finds each assistant
  reply as the characters between "the conversation up to this reply, with the generation prompt" and "the
  conversation up to and including this reply". That span is the reply plus its end token (`</s>` for
  `vicuna_v1`), exactly what the model must learn to produce at inference, where generation starts right after the
  generation prompt. The rendered prefixes must be prefixes of the whole rendering; a template for which that is
  false is rejected loudly instead of producing shifted labels.
- The rendered text is tokenised once, with character offsets, the same way the processor tokenises a prompt
  (BOS added by the tokenizer unless the template writes it), so training ids equal inference ids. A token is a
  label iff it overlaps an assistant span. Each `<image>` token is then expanded into `image_seq_length`
  placeholders, as the processor does, with labels -100.
- SAISA has no output at visual rows, so a token right after an image span can never be predicted (nothing before
  it produces logits); its label is forced to -100 too, as is anything after padding. The model also ignores such
  labels, but keeping them out of the batch keeps `num_items_in_batch` (the loss normaliser) honest.
- Nothing is truncated: an over-long conversation would lose its answer or cut an image span in half. The encoder
  raises `BadExampleError` (with the row's id, when known) and the dataset decides whether to skip or stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "BadExampleError", "ConversationEncoder", "SaisaDataCollator", "count_images"]

IGNORE_INDEX = -100


class BadExampleError(ValueError):
    """A training row that cannot be used as it is (missing image, tag/image mismatch, too long, no answer...)."""

    def __init__(self, reason: str, example_id: str | None = None):
        self.reason = reason
        self.example_id = example_id
        super().__init__(f"example {example_id!r}: {reason}" if example_id is not None else reason)


def count_images(messages: Sequence[dict]) -> int:
    """Number of `{"type": "image"}` parts (string contents count their `<image>` tags, as the template keeps them)."""
    n = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            n += content.count("<image>")
        else:
            n += sum(1 for part in content or [] if isinstance(part, dict) and part.get("type") == "image")
    return n


def _strip_nones(messages: Sequence[dict]) -> list[dict]:
    """Drop `None` fields from content parts: `datasets` stores `{"type": "image", "text": None}` for image parts."""
    clean = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str):
            content = [{k: v for k, v in part.items() if v is not None} for part in content or []]
        clean.append({"role": message["role"], "content": content})
    return clean


class ConversationEncoder:
    """Encode one conversation (+ its images) into unpadded `input_ids`, `labels` and `pixel_values`.

    Args:
        processor: a `SaisaProcessor` (or any processor with `tokenizer`, `image_processor`, `image_token`,
            `image_seq_length` and `apply_chat_template`).
        max_length: the longest allowed sequence after image expansion; longer rows raise `BadExampleError`.
        chat_template: a template name or Jinja source overriding the processor's own.
        train_on_all_assistant_turns: label every assistant reply (default). With False only the last one is
            learned, for data whose earlier replies are context rather than targets.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        chat_template: str | None = None,
        train_on_all_assistant_turns: bool = True,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if not getattr(self.tokenizer, "is_fast", True):
            raise ValueError(
                "ConversationEncoder needs a fast (tokenizers-backed) tokenizer: reply spans are located through "
                "character offsets, which slow tokenizers do not provide."
            )
        self.image_processor = processor.image_processor
        self.image_token = processor.image_token
        self.image_token_id = int(self.tokenizer.convert_tokens_to_ids(self.image_token))
        self.image_seq_length = int(processor.image_seq_length)
        self.max_length = max_length
        self.chat_template = chat_template
        self.train_on_all_assistant_turns = train_on_all_assistant_turns

    # ------------------------------------------------------------------------------------------ text and labels
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans `[start, end)` of the assistant replies to learn."""
        messages = _strip_nones(messages)
        text = self._render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True) if i else ""
            through = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
                raise ValueError(
                    "The chat template is not prefix-stable: rendering the conversation up to an assistant reply "
                    "does not give a prefix of the whole rendering, so reply spans cannot be located. Use a template "
                    "that renders earlier turns identically whatever follows (vicuna_v1 and llama_3 do)."
                )
            spans.append((len(before), len(through)))
        if spans and not self.train_on_all_assistant_turns:
            spans = spans[-1:]
        return text, spans

    def encode_text(self, messages: Sequence[dict], example_id: str | None = None) -> tuple[list[int], list[int]]:
        """`(input_ids, labels)` with images expanded; raises `BadExampleError` for rows that cannot be trained on."""
        text, spans = self.render(messages)
        if not spans:
            raise BadExampleError("no assistant reply to learn from", example_id)
        bos = self.tokenizer.bos_token
        encoding = self.tokenizer(
            text,
            add_special_tokens=not (bos is not None and text.startswith(bos)),
            return_offsets_mapping=True,
            return_attention_mask=False,
        )
        ids: list[int] = []
        labels: list[int] = []
        previous_is_image = False
        span_index = 0
        for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
            if token == self.image_token_id:
                ids.extend([token] * self.image_seq_length)
                labels.extend([IGNORE_INDEX] * self.image_seq_length)
                previous_is_image = True
                continue
            # Spans are sorted and disjoint: advance past those that end before this token starts.
            while span_index < len(spans) and spans[span_index][1] <= start:
                span_index += 1
            in_reply = span_index < len(spans) and end > start and start < spans[span_index][1]
            in_reply = in_reply and end > spans[span_index][0]
            ids.append(token)
            labels.append(token if in_reply and not previous_is_image else IGNORE_INDEX)
            previous_is_image = False
        if all(label == IGNORE_INDEX for label in labels):
            raise BadExampleError("the assistant replies tokenise to nothing that can be learned", example_id)
        if self.max_length is not None and len(ids) > self.max_length:
            raise BadExampleError(
                f"{len(ids)} tokens after expanding images exceed max_length={self.max_length} "
                "(rows are never truncated: that could cut an answer or an image span)",
                example_id,
            )
        return ids, labels

    def __call__(
        self, messages: Sequence[dict], images: Sequence[Any] = (), example_id: str | None = None
    ) -> dict[str, Any]:
        """Encode a conversation with its (already loaded) images: `input_ids`, `labels`, `pixel_values` or None."""
        n_tags = count_images(messages)
        if n_tags != len(images):
            raise BadExampleError(
                f"{n_tags} image placeholder(s) in the conversation but {len(images)} image(s)", example_id
            )
        ids, labels = self.encode_text(messages, example_id)
        pixel_values = None
        if images:
            pixel_values = self.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "pixel_values": pixel_values,
        }


class SaisaDataCollator:
    """Pad encoded examples into a batch; raw examples (`messages` + `images`) are encoded here first.

    Encoded features are dicts with `input_ids`, `labels` and optionally `pixel_values` (`[n_images, C, H, W]`), as
    `SaisaSupervisedDataset` yields them; raw ones have `messages` and `images` (loaded PIL images), which lets a
    plain `datasets.Dataset` feed Trainer with `remove_unused_columns=False`. Images of all rows are concatenated in
    row order, which is how the model matches them to placeholder spans. Padding is on the right (training needs no
    left padding, and right padding keeps every row's first token at position 0).

    Args:
        processor: the `SaisaProcessor` (its tokenizer's pad id, and the encoder for raw features).
        max_length: passed to the encoder for raw features.
        pad_to_multiple_of: round the padded length up (tensor-core friendly shapes on GPUs).
    """

    def __init__(self, processor: Any, max_length: int | None = None, pad_to_multiple_of: int | None = None):
        self.encoder = ConversationEncoder(processor, max_length=max_length)
        pad = processor.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else processor.tokenizer.eos_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [f if "input_ids" in f else self._encode_raw(f) for f in features]
        if not encoded:
            raise ValueError("SaisaDataCollator got an empty batch.")
        length = max(len(f["input_ids"]) for f in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, feature in enumerate(encoded):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
            labels[row, :n] = torch.as_tensor(feature["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        pixels = [torch.as_tensor(f["pixel_values"]) for f in encoded if f.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)
        return batch

    def _encode_raw(self, feature: dict[str, Any]) -> dict[str, Any]:
        images = feature.get("images")
        if images is None:
            image = feature.get("image")
            images = [] if image is None else [image]
        images = [image.convert("RGB") if hasattr(image, "convert") else image for image in images]
        return self.encoder(feature["messages"], images, example_id=feature.get("id"))
