"""Training data: LLaVA conversation JSON + an image folder, or a `datasets.Dataset` with image + messages columns.

LLaVA's format (`llava_v1_5_mix665k.json` and friends) is a list of rows
`{"id", "image": "rel/path.jpg" | ["a.jpg", "b.jpg"] (optional), "conversations": [{"from": "human" | "gpt" |
"system", "value": "<image>\\n..."}, ...]}`; JSON Lines with the same rows works too. Each row becomes transformers
chat messages, with every `<image>` tag turned into an `{"type": "image"}` part at its place, so the processor's
chat template renders it (for `vicuna_v1`, `"<image>\\n" + question` is byte-identical to LLaVA's prompt).

Why rows are checked before training and not while it runs: a bad row found at step 40 000 of a multi-GPU run
costs hours. `SaisaSupervisedDataset` scans every row once at construction (cheap checks: conversation shape,
`<image>` tags versus images, image files present, and — when `max_length` is set — the exact token count after
image expansion) and either skips the bad rows, logging each with its id and reason, or raises on the first one
(`on_bad="raise"`). Images are only decoded when a row is fetched, so the scan never opens an image; an image
that exists but cannot be decoded is caught at fetch time and handled by the same flag.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from modeling_saisa.training.collator import BadExampleError, ConversationEncoder, count_images

__all__ = [
    "Example",
    "ExampleList",
    "SaisaSupervisedDataset",
    "examples_from_hf",
    "llava_to_messages",
    "load_llava_json",
]

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
OnBad = Literal["skip", "raise"]


@dataclass
class Example:
    """One training row: chat `messages` with image parts, and its images (paths, PIL images or `datasets` dicts)."""

    id: str
    messages: list[dict]
    images: list[Any] = field(default_factory=list)


def llava_to_messages(conversations: Sequence[dict], example_id: str | None = None) -> list[dict]:
    """LLaVA `conversations` -> transformers chat messages; `<image>` tags become image parts in place.

    Text around a tag loses the one newline that LLaVA writes between tag and text, because the templates join
    parts with a newline themselves: `"<image>\\nWhat?"` -> `[image, text "What?"]` -> rendered `"<image>\\nWhat?"`.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadExampleError("'conversations' must be a non-empty list", example_id)
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or "value" not in turn or not isinstance(turn["value"], str):
            raise BadExampleError(f"a turn must be {{'from': ..., 'value': str}}, got {turn!r}", example_id)
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise BadExampleError(f"unknown speaker {turn.get('from')!r} (expected human, gpt or system)", example_id)
        value = turn["value"]
        if IMAGE_TAG not in value:
            messages.append({"role": role, "content": [{"type": "text", "text": value}]})
            continue
        parts: list[dict] = []
        for i, piece in enumerate(value.split(IMAGE_TAG)):
            if i:
                parts.append({"type": "image"})
            piece = piece.strip("\n")
            if piece.strip():
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    return messages


def _row_images(row: dict) -> list[Any]:
    images = row.get("image", row.get("images"))
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


class ExampleList(list):
    """The rows of a file, plus `bad`: `(id, reason)` of the rows already left out while reading it.

    Why: `SaisaSupervisedDataset` reports every skipped row in one count ("Skipped 5 of 10 rows"); without this the
    rows dropped at reading time would be missing from both numbers.
    """

    bad: list[tuple[str, str]]

    def __init__(self, examples: Sequence[Example] = (), bad: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(examples)
        self.bad = list(bad)


def load_llava_json(path: str | os.PathLike, on_bad: OnBad = "skip") -> ExampleList:
    """Read a LLaVA conversation file (`.json` list or `.jsonl`) into `Example`s with image paths as written.

    Rows whose structure is unusable (no conversations, unknown speaker) are reported and skipped, or raise, by
    `on_bad`; file-level problems (missing file, invalid JSON) always raise.
    """
    with open(path, encoding="utf-8") as f:
        if str(path).endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
        else:
            rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}.")
    examples = ExampleList()
    for index, row in enumerate(rows):
        example_id = str(row.get("id", index)) if isinstance(row, dict) else str(index)
        try:
            if not isinstance(row, dict):
                raise BadExampleError("a row must be a JSON object", example_id)
            messages = llava_to_messages(row.get("conversations"), example_id)
        except BadExampleError as err:
            if on_bad == "raise":
                raise
            logger.warning("Skipping %s", err)
            examples.bad.append((str(err.example_id), err.reason))
            continue
        examples.append(Example(example_id, messages, _row_images(row)))
    return examples


def examples_from_hf(dataset: Any, messages_column: str = "messages", image_column: str | None = None) -> HFExamples:
    """View a `datasets.Dataset` with a messages column and an image column (`image` or `images`) as examples.

    The dataset stays lazy: rows are read (and images decoded) only when the training loop fetches them.
    """
    return HFExamples(dataset, messages_column, image_column)


class HFExamples:
    """A lazy `Sequence[Example]` over a `datasets.Dataset`; `scan_view` reads rows without decoding images."""

    def __init__(self, dataset: Any, messages_column: str = "messages", image_column: str | None = None):
        columns = dataset.column_names
        if messages_column not in columns:
            raise ValueError(f"The dataset has no {messages_column!r} column (columns: {columns}).")
        if image_column is None:
            image_column = next((c for c in ("images", "image") if c in columns), None)
        elif image_column not in columns:
            raise ValueError(f"The dataset has no {image_column!r} column (columns: {columns}).")
        self.dataset, self.messages_column, self.image_column = dataset, messages_column, image_column

    def __len__(self) -> int:
        return len(self.dataset)

    def _example(self, index: int, row: dict) -> Example:
        example_id = str(row.get("id", index))
        images = _row_images({"image": row[self.image_column]}) if self.image_column else []
        return Example(example_id, list(row[self.messages_column]), images)

    def __getitem__(self, index: int) -> Example:
        return self._example(index, self.dataset[int(index)])

    def scan_view(self) -> list[Example]:
        """All rows with images as undecoded references (`{"path", "bytes"}`), for the up-front checks."""
        import datasets

        dataset = self.dataset
        if self.image_column:
            feature = dataset.features[self.image_column]
            if isinstance(feature, datasets.Image):
                dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
            elif isinstance(getattr(feature, "feature", None), datasets.Image):
                dataset = dataset.cast_column(self.image_column, datasets.List(datasets.Image(decode=False)))
        keep = [c for c in (self.messages_column, self.image_column, "id") if c and c in dataset.column_names]
        return [self._example(i, row) for i, row in enumerate(dataset.select_columns(keep))]


class SaisaSupervisedDataset(torch.utils.data.Dataset):
    """A map-style dataset of encoded training rows, checked up front and loaded lazily.

    Args:
        examples: `Example`s (e.g. from `load_llava_json`) or an `HFExamples` view of a `datasets.Dataset`.
        processor: the `SaisaProcessor` whose chat template, tokenizer and image processor define the encoding.
        image_folder: root for relative image paths (LLaVA's `--image_folder`).
        max_length: longest sequence after image expansion; longer rows are bad rows (never truncated).
        on_bad: `"skip"` (report each bad row with its id and reason, then leave it out) or `"raise"`.
        check_images: check at construction that every image file exists (a `stat` per image, no decoding).

    Attributes:
        bad: `(id, reason)` of every row left out, in order, so callers can report or save them.
    """

    def __init__(
        self,
        examples: Sequence[Example] | HFExamples,
        processor: Any,
        image_folder: str | os.PathLike | None = None,
        max_length: int | None = None,
        on_bad: OnBad = "skip",
        check_images: bool = True,
    ):
        if on_bad not in ("skip", "raise"):
            raise ValueError(f"on_bad must be 'skip' or 'raise', got {on_bad!r}.")
        self.examples = examples
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        self.encoder = ConversationEncoder(processor, max_length=max_length)
        self.on_bad = on_bad
        # Rows the reader already left out (load_llava_json) count among the skipped ones.
        self.bad: list[tuple[str, str]] = list(getattr(examples, "bad", []))
        read_bad = len(self.bad)
        view = examples.scan_view() if isinstance(examples, HFExamples) else examples
        self.indices = [i for i, example in enumerate(view) if self._check(example, check_images, max_length)]
        total = len(view) + read_bad
        if self.bad:
            logger.warning(
                "Skipped %d of %d rows%s; first ones: %s",
                len(self.bad),
                total,
                f" ({read_bad} while reading the file)" if read_bad else "",
                "; ".join(f"{i}: {r}" for i, r in self.bad[:5]),
            )
        if not self.indices:
            raise ValueError(f"No usable training rows: all {total} were bad (see the warnings above).")

    def _report(self, err: BadExampleError) -> None:
        if self.on_bad == "raise":
            raise err
        self.bad.append((str(err.example_id), err.reason))
        logger.warning("Skipping %s", err)

    def _check(self, example: Example, check_images: bool, max_length: int | None) -> bool:
        try:
            n_tags = count_images(example.messages)
            if n_tags != len(example.images):
                raise BadExampleError(f"{n_tags} <image> placeholder(s) but {len(example.images)} image(s)", example.id)
            if check_images:
                for image in example.images:
                    path = self._path(image)
                    if path is not None and not os.path.isfile(path):
                        raise BadExampleError(f"image file not found: {path}", example.id)
            if max_length is not None:  # the exact count, from the same encoding the training step will use
                self.encoder.encode_text(example.messages, example.id)
        except BadExampleError as err:
            self._report(err)
            return False
        except ValueError as err:  # e.g. the chat template rejects a role: the row is bad, say which
            self._report(BadExampleError(str(err), example.id))
            return False
        return True

    def _path(self, image: Any) -> str | None:
        """The file an image reference points to (None for in-memory images)."""
        if isinstance(image, dict):  # datasets' undecoded Image: {"path", "bytes"}
            if image.get("bytes") is not None:
                return None
            image = image.get("path")
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            if self.image_folder is not None and not os.path.isabs(path):
                path = os.path.join(self.image_folder, path)
            return path
        return None

    def load_image(self, image: Any) -> Image.Image:
        """Decode one image reference to RGB (LLaVA loads with `.convert("RGB")` too)."""
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if isinstance(image, dict) and image.get("bytes") is not None:
            import io

            return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
        path = self._path(image)
        if path is None:
            raise BadExampleError(f"unsupported image reference {type(image).__name__}")
        with Image.open(path) as opened:
            return opened.convert("RGB")

    def __len__(self) -> int:
        return len(self.indices)

    def encode(self, position: int) -> dict[str, Any]:
        """Encode row `position` of this dataset (images decoded now); raises `BadExampleError` for a bad row."""
        example = self.examples[self.indices[position]]
        try:
            images = [self.load_image(image) for image in example.images]
        except (OSError, BadExampleError) as err:
            raise BadExampleError(f"cannot load image: {err}", example.id) from err
        encoded = self.encoder(example.messages, images, example_id=example.id)
        encoded["id"] = example.id
        return encoded

    def __getitem__(self, position: int) -> dict[str, Any]:
        # A row can only turn out bad here if an image is unreadable: report it and serve the next row instead, so
        # that a batch never silently shrinks (and distributed ranks keep equal batch sizes).
        for attempt in range(len(self.indices)):
            try:
                return self.encode((position + attempt) % len(self.indices))
            except BadExampleError as err:
                self._report(err)
        raise ValueError("No row of the dataset could be loaded.")
