"""`pipeline("image-text-to-text")` with a tiny SAISA model and SaisaProcessor: chat and plain inputs, images as PIL
or path, batched, loaded from a directory; the answers must equal `model.generate` + decode, token for token.

The vocabulary has no punctuation besides ":" on purpose: the word tokenizer's decoder glues " ." / " ," / " '" to
the previous word, which would make "prompt text + answer text" differ from the joint decode by a space.
(`pipeline(model=DIR)` without a task asks the Hub for the task, which transformers refuses offline; with the task
named, the directory is all it needs.)
"""

from __future__ import annotations

import re

import PIL.Image
import pytest
import torch
from tiny import tiny_config, tiny_model
from transformers import pipeline

from modeling_saisa import SaisaForConditionalGeneration, SaisaProcessor
from modeling_saisa.tokenizers import build_word_tokenizer

WORDS = "USER : ASSISTANT describe the picture what color is it a red green cat dog tell me more".split()
MAX_NEW = 6


@pytest.fixture(scope="module")
def model() -> SaisaForConditionalGeneration:
    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def processor() -> SaisaProcessor:
    return SaisaProcessor.from_model_config(tiny_config(), build_word_tokenizer(WORDS, vocab_size=99))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("images")
    red = PIL.Image.new("RGB", (12, 7), (200, 30, 30))
    green = PIL.Image.new("RGB", (5, 9), (30, 200, 60))
    red.save(folder / "red.png")
    green.save(folder / "green.png")
    return {"red": red, "green": green, "red_path": str(folder / "red.png"), "green_path": str(folder / "green.png")}


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, model, processor) -> str:
    folder = tmp_path_factory.mktemp("tiny_saisa")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def chat(text: str, *image_parts: dict) -> list[dict]:
    return [{"role": "user", "content": [*image_parts, {"type": "text", "text": text}]}]


def reference(model, processor, inputs) -> tuple[list[int], str]:
    """What the pipeline must reproduce: greedy `generate` on the processor's tensors, new tokens decoded."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :]
    return out[0].tolist(), processor.decode(new, skip_special_tokens=True)


def chat_reference(model, processor, messages):
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return reference(model, processor, inputs)


def test_chat_input_equals_generate(model, processor, images):
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = chat("describe the picture", {"type": "image", "image": images["red"]})
    ids, text = chat_reference(model, processor, messages)
    assert len(ids) > 0 and text.strip()
    result = pipe(text=messages, max_new_tokens=MAX_NEW, return_full_text=False)
    assert result[0]["generated_text"].strip() == text.strip()
    tensors = pipe(text=messages, max_new_tokens=MAX_NEW, return_tensors=True)
    assert tensors[0]["generated_token_ids"].tolist() == ids
    full = pipe(text=messages, max_new_tokens=MAX_NEW)  # return_full_text=True: the chat plus the answer
    assert full[0]["generated_text"][:-1] == messages
    assert full[0]["generated_text"][-1]["role"] == "assistant"
    assert full[0]["generated_text"][-1]["content"].strip() == text.strip()


def test_plain_input_with_pil_or_path_equals_generate(model, processor, images):
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    prompt = "USER: <image>\nwhat color is it ASSISTANT:"
    inputs = processor(images=images["green"], text=prompt, return_tensors="pt")
    ids, text = reference(model, processor, inputs)
    for image in (images["green"], images["green_path"]):
        result = pipe(images=image, text=prompt, max_new_tokens=MAX_NEW, return_full_text=False)
        assert result[0]["generated_text"].strip() == text.strip()
    full = pipe(images=images["green_path"], text=prompt, max_new_tokens=MAX_NEW)
    assert full[0]["generated_text"].startswith(prompt)
    assert full[0]["generated_text"][len(prompt) :].strip() == text.strip()


def test_chat_image_by_path_and_url_key(model, processor, images):
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    _, text = chat_reference(model, processor, chat("what color is it", {"type": "image", "image": images["red"]}))
    for part in ({"type": "image", "path": images["red_path"]}, {"type": "image", "url": images["red_path"]}):
        result = pipe(text=chat("what color is it", part), max_new_tokens=MAX_NEW, return_full_text=False)
        assert result[0]["generated_text"].strip() == text.strip()


def test_batched_chats_equal_one_by_one(model, processor, images):
    """Different prompt lengths, so the batch is left-padded: every row must still answer as if alone."""
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    chats = [
        chat("describe the picture", {"type": "image", "image": images["red"]}),
        chat("tell me more what color is it", {"type": "image", "image": images["green"]}),
        chat("what color", {"type": "image", "image": images["green"]}, {"type": "image", "image": images["red"]}),
    ]
    expected = [chat_reference(model, processor, messages)[1].strip() for messages in chats]
    assert len(set(expected)) > 1  # else a row mix-up could not show
    batched = pipe(text=chats, max_new_tokens=MAX_NEW, return_full_text=False, batch_size=3)
    assert [rows[0]["generated_text"].strip() for rows in batched] == expected


def test_batched_plain_prompts(model, processor, images):
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    prompts = ["USER: <image>\nwhat color is it ASSISTANT:", "USER: <image>\ndescribe ASSISTANT:"]
    pictures = [images["red_path"], images["green"]]
    expected = [
        reference(model, processor, processor(images=image, text=prompt, return_tensors="pt"))[1].strip()
        for image, prompt in zip(pictures, prompts)
    ]
    # One processor call for the whole list: the processor pads the rows (left) itself.
    results = pipe(images=pictures, text=prompts, max_new_tokens=MAX_NEW, return_full_text=False)
    assert [row["generated_text"].strip() for row in results] == expected


def test_text_only_chat(model, processor):
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = chat("tell me more")
    _, text = chat_reference(model, processor, messages)
    result = pipe(text=messages, max_new_tokens=MAX_NEW, return_full_text=False)
    assert result[0]["generated_text"].strip() == text.strip()


def test_pipeline_from_directory(saved_dir, model, processor, images):
    pipe = pipeline("image-text-to-text", model=saved_dir)
    assert isinstance(pipe.model, SaisaForConditionalGeneration) and isinstance(pipe.processor, SaisaProcessor)
    assert pipe.processor.image_seq_length == processor.image_seq_length
    messages = chat("describe the picture", {"type": "image", "path": images["red_path"]})
    _, text = chat_reference(model, processor, messages)
    result = pipe(text=messages, max_new_tokens=MAX_NEW, return_full_text=False)
    assert result[0]["generated_text"].strip() == text.strip()


def test_pipeline_reports_bad_inputs(model, processor, images, tmp_path):
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    with pytest.raises(ValueError, match=r"2 <image> tag\(s\) but 1 image\(s\)"):
        pipe(images=images["red"], text="USER: <image>\n<image>\nwhat ASSISTANT:", max_new_tokens=2)
    missing = str(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="does not exist"):
        pipe(text=chat("what", {"type": "image", "path": missing}), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"Message 0 \(user\) is empty"):
        pipe(text=chat(" "), max_new_tokens=2)
    # A plain prompt with `images=` a missing path: the pipeline loads it itself, and says the same as the processor.
    with pytest.raises(ValueError, match=f"^Image file '{re.escape(missing)}' does not exist.$"):
        pipe(images=missing, text="USER: <image>\nwhat ASSISTANT:", max_new_tokens=2)
    with pytest.raises(ValueError, match="^Image file 'nope.jpg' does not exist.$"):
        pipe(images=[images["red"], "nope.jpg"], text="USER: <image>\n<image>\nwhat ASSISTANT:", max_new_tokens=2)


def test_mixed_image_and_text_only_batch_equals_one_by_one(model, processor, images):
    """One `apply_chat_template` call over a batch where only some conversations have images."""
    chats = [chat("what color is it", {"type": "image", "image": images["red"]}), chat("tell me more")]
    batch = processor.apply_chat_template(
        chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True},
    )  # fmt: skip
    assert (batch["input_ids"] == 98).sum(1).tolist() == [16, 0] and batch["pixel_values"].shape[0] == 1
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False)
    answers = processor.post_process_image_text_to_text(out[:, batch["input_ids"].shape[1] :])
    assert [a.strip() for a in answers] == [chat_reference(model, processor, c)[1].strip() for c in chats]


def test_pipeline_with_image_kv_store(model, processor, images):
    from modeling_saisa import ImageKVStore

    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    store = ImageKVStore(max_bytes=1 << 26)
    for question in ("describe the picture", "what color is it"):
        messages = chat(question, {"type": "image", "image": images["red"]})
        _, text = chat_reference(model, processor, messages)
        kwargs = dict(max_new_tokens=MAX_NEW, return_full_text=False, generate_kwargs={"image_kv": store})
        assert pipe(text=messages, **kwargs)[0]["generated_text"].strip() == text.strip()
    assert store.stats()["misses"] == 1 and store.stats()["hits"] == 1
