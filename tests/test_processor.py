"""SaisaProcessor, SaisaImageProcessor, the chat templates and the hub-free tokenizer builders.

The expected ids are written by hand from the word list below (id = 4 + position), never by calling the tokenizer,
and the expected pixels are computed with NumPy + PIL only, so a bug in the code under test cannot hide in the
reference. Everything runs on 8-16 px images and needs no model.

About "the image sits at index 35" (spec section 3): that count is a property of the real Llama/Vicuna
SentencePiece vocabulary (BOS + 34 pieces for the system prompt and " USER: "), which cannot be downloaded here.
What the processor guarantees, and what is tested, is the layout: [BOS] + tokens(prefix) + image_seq_length x
<image> + tokens(rest), with exactly one BOS, so with the real tokenizer the image starts at 1 + 34 = 35.
"""

from __future__ import annotations

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoProcessor, AutoTokenizer, CLIPImageProcessorPil, TokenizersBackend

import modeling_saisa
from modeling_saisa.processing import (
    CHAT_TEMPLATE_NAMES,
    SaisaImageProcessor,
    SaisaProcessor,
    load_chat_template,
    pad_fill_color,
)
from modeling_saisa.tokenizers import add_image_token, build_word_tokenizer, split_words

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
# The vocabulary, in id order (id = 4 + index). The system prompt's words come first, as they first occur.
WORDS = [
    "A", "chat", "between", "a", "curious", "user", "and", "an", "artificial", "intelligence", "assistant", ".",
    "The", "gives", "helpful", ",", "detailed", "polite", "answers", "to", "the", "'", "s", "questions",
    "USER", ":", "ASSISTANT", "What", "is", "in", "image", "?", "Describe", "it", "red", "square", "Compare",
    "them",
]  # fmt: skip
PAD, BOS, EOS, UNK = 0, 1, 2, 3
N_V = 16  # visual tokens per image in these tests (tests/tiny.py's CLIP tower: 8 px / patch 2)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def ids(*words: str) -> list[int]:
    """Hand-built ids: the position of each word in WORDS, plus the 4 special tokens before them."""
    return [4 + WORDS.index(w) for w in words]


# The word sequence of SYSTEM + " USER:" as the Whitespace pre-tokenizer splits it, typed out by hand.
SYSTEM_WORDS = (
    "A chat between a curious user and an artificial intelligence assistant . The assistant gives helpful , "
    "detailed , and polite answers to the user ' s questions ."
).split()


@pytest.fixture(scope="module")
def tokenizer() -> TokenizersBackend:
    return build_word_tokenizer(WORDS, vocab_size=99)


@pytest.fixture(scope="module")
def image_processor() -> SaisaImageProcessor:
    return SaisaImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})


@pytest.fixture()
def processor(image_processor, tokenizer) -> SaisaProcessor:
    return SaisaProcessor(image_processor, tokenizer, image_seq_length=N_V)


def rgb(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return PIL.Image.fromarray(array, mode="RGB")


def question(text: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


# ----------------------------------------------------------------------------------------------- tokenizers
def test_word_tokenizer_layout_and_special_tokens(tokenizer):
    assert len(tokenizer) == 99
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        PAD,
        BOS,
        EOS,
        UNK,
    )
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == 98
    assert tokenizer.convert_tokens_to_ids(["A", "them"]) == [4, 4 + len(WORDS) - 1]
    assert tokenizer("What is in the image?").input_ids == [BOS, *ids("What", "is", "in", "the", "image", "?")]
    assert tokenizer("zebra").input_ids == [BOS, UNK]
    assert tokenizer.padding_side == "left"
    decoded = tokenizer.decode([BOS, 98, *ids("What", "is", "in", "the", "image", "?")], skip_special_tokens=True)
    assert decoded == "What is in the image?"
    assert split_words("USER: <image>\nIt's red, it's red.") == ["USER", ":", "It", "'", "s", "red", ",", "it", "."]


def test_word_tokenizer_rejects_bad_vocabularies():
    with pytest.raises(ValueError, match="reserved"):
        build_word_tokenizer(["<image>"])
    with pytest.raises(ValueError, match="not a single word"):
        build_word_tokenizer(["USER:"])
    with pytest.raises(ValueError, match="too small"):
        build_word_tokenizer(["a", "b"], vocab_size=6)
    assert len(build_word_tokenizer(["a", "b"], vocab_size=7)) == 7


def test_word_tokenizer_round_trips(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "USER: <image>\nWhat is in the image?"
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.image_token_id == 98 and reloaded.padding_side == "left"


def test_add_image_token_registers_once(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<s>": 1, "hi": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = TokenizersBackend(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    assert getattr(plain, "image_token", None) is None
    assert add_image_token(plain) == 3
    assert add_image_token(plain) == 3 and len(plain) == 4
    assert plain("hi <image> hi").input_ids == [2, 3, 2]
    assert plain.decode([2, 3, 2], skip_special_tokens=True) == "hi hi"
    plain.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).image_token_id == 3


# ------------------------------------------------------------------------------------------------ templates
def test_vicuna_v1_single_turn_is_byte_exact(processor):
    prompt = processor.apply_chat_template(question("What is in the image?"), add_generation_prompt=True)
    assert prompt == SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT:"
    assert processor.apply_chat_template(question("What is in the image?")) == (
        SYSTEM + " USER: <image>\nWhat is in the image? "
    )


def test_vicuna_v1_multi_turn_system_and_string_content(processor):
    messages = [
        *question("What is in the image?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": "Describe it."},
    ]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: A red square.</s>USER: Describe it. ASSISTANT:"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system, add_generation_prompt=True) == "Be brief. USER: Hi ASSISTANT:"


def test_image_parts_render_in_place(processor):
    parts = [
        {"type": "text", "text": "Compare"},
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "and this"},
    ]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    assert prompt == SYSTEM + " USER: Compare\n<image>\n<image>\nand this ASSISTANT:"


def test_llama_3_template(processor):
    messages = [*question("What?"), {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Why?"}]
    prompt = processor.apply_chat_template(messages, chat_template="llama_3", add_generation_prompt=True)
    assert prompt == SYSTEM + " USER: <image>\nWhat? ASSISTANT: A cat.<|end_of_text|>USER: Why? ASSISTANT:"
    assert set(CHAT_TEMPLATE_NAMES) == {"vicuna_v1", "llama_3"}
    with pytest.raises(ValueError, match="Unknown chat template"):
        load_chat_template("chatml")


def test_template_rejects_unknown_roles_and_empty_turns(processor):
    with pytest.raises(Exception, match="roles system"):
        processor.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="Message 0 \\(user\\) is empty"):
        processor.apply_chat_template([{"role": "user", "content": "   "}])
    with pytest.raises(ValueError, match="Message 1 \\(user\\) is empty"):
        processor.apply_chat_template(
            [{"role": "system", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": ""}]}]
        )


# --------------------------------------------------------------------------------------------- token layout
def test_known_prompt_gives_hand_built_ids(processor):
    prompt = processor.apply_chat_template(question("What is in the image?"), add_generation_prompt=True)
    out = processor(images=rgb(8, 8), text=prompt, return_tensors="pt")
    prefix = [BOS, *ids(*SYSTEM_WORDS, "USER", ":")]
    expected = prefix + [98] * N_V + ids("What", "is", "in", "the", "image", "?", "ASSISTANT", ":")
    assert out["input_ids"].tolist() == [expected]
    assert out["attention_mask"].tolist() == [[1] * len(expected)]
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values"}
    assert tuple(out["pixel_values"].shape) == (1, 3, 8, 8)
    # The first visual token follows BOS and the prefix; with the real Vicuna tokenizer that is index 35.
    assert out["input_ids"][0].tolist().index(98) == len(prefix) == 1 + len(SYSTEM_WORDS) + 2


def test_chat_template_tokenized_has_one_bos_and_matches_two_step_call(processor):
    image = rgb(6, 9)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    direct = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    two_step = processor(images=image, text=prompt, return_tensors="pt")
    assert torch.equal(direct["input_ids"], two_step["input_ids"])
    assert torch.equal(direct["pixel_values"], two_step["pixel_values"])
    assert direct["input_ids"][0].tolist().count(BOS) == 1 and direct["input_ids"][0, 0] == BOS


def test_multi_image_multi_turn_tensors(processor, tmp_path):
    path = tmp_path / "red.png"
    rgb(5, 7, seed=3).save(path)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": rgb(9, 4, seed=1)},
                {"type": "image", "path": str(path)},
                {"type": "text", "text": "Compare them."},
            ],
        },
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [{"type": "image", "url": str(path)}, {"type": "text", "text": "Describe it."}]},
    ]
    out = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    row = out["input_ids"][0].tolist()
    assert row.count(98) == 3 * N_V and tuple(out["pixel_values"].shape) == (3, 3, 8, 8)
    assert row[-2:] == ids("ASSISTANT", ":") and row.count(EOS) == 1  # the finished assistant turn ends in </s>
    from_path = processor.image_processor(str(path), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(out["pixel_values"][1], from_path) and torch.equal(out["pixel_values"][2], from_path)


def test_batch_pads_left_and_right_on_request(processor):
    short = "USER: <image>\nWhat? ASSISTANT:"
    long = "USER: <image>\nWhat is in the image? ASSISTANT:"
    out = processor(images=[rgb(8, 8), rgb(4, 8)], text=[short, long], padding=True, return_tensors="pt")
    n_short = 1 + 2 + N_V + 4  # BOS, USER, :, images, What, ?, ASSISTANT, :
    n_long = 1 + 2 + N_V + 8
    assert out["input_ids"].shape == (2, n_long)
    assert out["input_ids"][0, : n_long - n_short].tolist() == [PAD] * (n_long - n_short)
    assert out["attention_mask"][0].tolist() == [0] * (n_long - n_short) + [1] * n_short
    assert out["input_ids"][0, n_long - n_short] == BOS
    right = processor(images=[rgb(8, 8), rgb(4, 8)], text=[short, long], padding=True, padding_side="right")
    assert right["input_ids"][0][-1] == PAD and right["input_ids"][0][0] == BOS


def test_text_only_prompt_has_no_pixel_values(processor):
    out = processor(text="USER: What is in the image? ASSISTANT:", return_tensors="pt")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert out["input_ids"][0].tolist() == [BOS, *ids("USER", ":", "What", "is", "in", "the", "image", "?")] + ids(
        "ASSISTANT", ":"
    )


def test_post_process_drops_image_and_padding_tokens(processor):
    rows = torch.tensor([[PAD, BOS, 98, 98, *ids("What", "?")], [BOS, *ids("A", "red", "square", "."), EOS]])
    assert processor.post_process_image_text_to_text(rows) == ["What?", "A red square."]
    assert processor.batch_decode(rows, skip_special_tokens=True) == ["What?", "A red square."]
    assert processor.decode(rows[1], skip_special_tokens=True) == "A red square."


# ------------------------------------------------------------------------------------------------ save/load
def test_save_and_auto_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(tmp_path)
    )
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["processor_class"] == "SaisaProcessor" and config["image_seq_length"] == N_V
    assert config["image_processor"]["do_pad_to_square"] is True
    assert (tmp_path / "chat_template.jinja").read_text() == load_chat_template("vicuna_v1")

    assert modeling_saisa.SaisaProcessor is SaisaProcessor
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is SaisaProcessor and type(loaded.image_processor) is SaisaImageProcessor
    assert loaded.image_seq_length == N_V and loaded.image_token_id == 98
    assert loaded.tokenizer.padding_side == "left" and loaded.chat_template == processor.chat_template
    messages = question("What is in the image?")
    messages[0]["content"][0]["image"] = rgb(7, 3)
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    before, after = processor.apply_chat_template(messages, **kwargs), loaded.apply_chat_template(messages, **kwargs)
    assert torch.equal(before["input_ids"], after["input_ids"])
    assert torch.equal(before["pixel_values"], after["pixel_values"])


def test_from_model_config_matches_tiny_model():
    from tiny import tiny_config

    config = tiny_config()
    processor = SaisaProcessor.from_model_config(config, build_word_tokenizer(WORDS, vocab_size=99))
    assert processor.image_seq_length == config.image_seq_length == N_V
    assert processor.image_processor.crop_size.height == config.vision_config.image_size
    with pytest.raises(ValueError, match="image_token_id=98"):
        SaisaProcessor.from_model_config(config, build_word_tokenizer(WORDS))


# ------------------------------------------------------------------------------------------------- pixels
def reference_pixels(image: PIL.Image.Image, resize_to: int, crop: int, pad: bool = True) -> np.ndarray:
    """LLaVA-1.5 preprocessing written independently: expand2square, bicubic resize, centre crop, normalise."""
    array = np.asarray(image.convert("RGB"))
    height, width = array.shape[:2]
    if pad and height != width:
        side = max(height, width)
        canvas = np.empty((side, side, 3), dtype=np.uint8)
        canvas[:] = (122, 116, 104)
        top, left = (side - height) // 2, (side - width) // 2
        canvas[top : top + height, left : left + width] = array
        array = canvas
        height = width = side
    scale = resize_to / min(height, width)
    new_w, new_h = (resize_to, round(height * scale)) if width <= height else (round(width * scale), resize_to)
    resized = np.asarray(PIL.Image.fromarray(array).resize((new_w, new_h), PIL.Image.BICUBIC), dtype=np.float64)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    cropped = resized[top : top + crop, left : left + crop] / 255.0
    normalised = (cropped - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return normalised.transpose(2, 0, 1).astype(np.float32)


def test_pad_fill_is_the_originals_truncated_mean():
    assert pad_fill_color(CLIP_MEAN) == (122, 116, 104)


@pytest.mark.parametrize("size", [(12, 5), (5, 12), (7, 7), (1, 9)])
def test_pad_to_square_matches_reference(size):
    processor = SaisaImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 12, "width": 12})
    image = rgb(*size, seed=sum(size))
    got = processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(got, reference_pixels(image, 16, 12), atol=1e-5)


def test_pad_to_square_canvas_and_switch_off():
    processor = SaisaImageProcessor()
    tall = np.zeros((3, 5, 2), dtype=np.uint8)  # C, H, W
    padded = processor.pad_to_square(tall, (122, 116, 104))
    assert padded.shape == (3, 5, 5)
    assert padded[:, :, 1:3].max() == 0  # the image sits at columns (5 - 2) // 2 = 1 .. 2
    assert padded[:, 0, 0].tolist() == [122, 116, 104] and padded[:, 4, 4].tolist() == [122, 116, 104]

    image = rgb(12, 5, seed=4)
    kwargs = dict(size={"shortest_edge": 16}, crop_size={"height": 12, "width": 12})
    unpadded = SaisaImageProcessor(do_pad_to_square=False, **kwargs)(image, return_tensors="np")["pixel_values"]
    clip = CLIPImageProcessorPil(**kwargs)(image, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(unpadded, clip, atol=1e-6)
    np.testing.assert_allclose(unpadded[0], reference_pixels(image, 16, 12, pad=False), atol=1e-5)


def test_do_pad_to_square_passes_through_the_processor(processor):
    image = rgb(8, 3)
    text = "USER: <image>\nWhat? ASSISTANT:"
    padded = processor(images=image, text=text, return_tensors="np")["pixel_values"][0]
    plain = processor(images=image, text=text, do_pad_to_square=False, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(padded, reference_pixels(image, 8, 8), atol=1e-5)
    np.testing.assert_allclose(plain, reference_pixels(image, 8, 8, pad=False), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(width=st.integers(1, 40), height=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_any_size_matches_reference(width, height, seed):
    processor = SaisaImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    image = rgb(width, height, seed)
    got = processor(image, return_tensors="np")["pixel_values"]
    assert got.shape == (1, 3, 8, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got[0], reference_pixels(image, 8, 8), atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F"])
def test_modes_convert_like_the_original_loader(mode, tmp_path):
    processor = SaisaImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    base = rgb(9, 6, seed=5)
    if mode in ("I;16", "I"):
        gray = np.asarray(base.convert("L"), dtype=np.uint16)
        image = PIL.Image.fromarray((gray * 257).astype("<u2"))
        image = image if mode == "I;16" else image.convert("I")
        assert image.mode == mode
        expected_rgb = PIL.Image.fromarray(gray.astype(np.uint8)).convert("RGB")  # 16-bit scaled back to 8-bit
    elif mode == "F":
        gray = np.asarray(base.convert("L"), dtype=np.float32)
        image = PIL.Image.fromarray(gray / 255.0)
        assert image.mode == "F"
        expected_rgb = PIL.Image.fromarray(gray.astype(np.uint8)).convert("RGB")
    else:
        image = base.convert(mode)
        expected_rgb = image.convert("RGB")  # what LLaVA's loader does (alpha dropped, not composited)
    got = processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(got, reference_pixels(expected_rgb, 8, 8), atol=1e-5)
    if mode in ("RGBA", "P", "LA", "L"):  # a file path gives the same pixels as the PIL image
        path = tmp_path / f"image_{mode}.png"
        image.save(path)
        from_path = processor(str(path), return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(from_path, got, atol=1e-6)


def test_array_inputs_and_grayscale_arrays():
    processor = SaisaImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    image = rgb(10, 6, seed=6)  # (6, 10, 3): no side of 1, 3 or 4 px, so the channel axis is unambiguous
    hwc = np.asarray(image)
    expected = reference_pixels(image, 8, 8)
    np.testing.assert_allclose(processor(hwc, return_tensors="np")["pixel_values"][0], expected, atol=1e-5)
    chw = torch.from_numpy(hwc.transpose(2, 0, 1).copy())
    np.testing.assert_allclose(processor(chw, return_tensors="np")["pixel_values"][0], expected, atol=1e-5)
    gray = np.asarray(image.convert("L"))
    np.testing.assert_allclose(
        processor(gray, return_tensors="np")["pixel_values"][0],
        reference_pixels(image.convert("L"), 8, 8),
        atol=1e-5,
    )


def test_stacked_array_counts_as_several_images(processor):
    stack = np.stack([np.asarray(rgb(5, 6, seed=i)) for i in range(2)])  # (2, H, W, C)
    out = processor(images=stack, text="USER: <image>\n<image>\nWhat? ASSISTANT:", return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (2, 3, 8, 8) and (out["input_ids"] == 98).sum() == 2 * N_V
    with pytest.raises(ValueError, match=r"1 <image> tag\(s\) but 2 image\(s\)"):
        processor(images=stack, text="USER: <image>\nWhat? ASSISTANT:")


def test_tiny_and_huge_images():
    processor = SaisaImageProcessor()  # the real 336 px settings
    for size in [(1, 1), (1, 300), (3000, 2000)]:
        out = processor(rgb(*size), return_tensors="pt")["pixel_values"]
        assert tuple(out.shape) == (1, 3, 336, 336) and torch.isfinite(out).all()
    one_pixel = processor(PIL.Image.new("RGB", (1, 1), (255, 0, 0)), return_tensors="np")["pixel_values"][0]
    red = (np.array([1.0, 0.0, 0.0]) - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(one_pixel[:, 100, 100], red, atol=1e-5)


# ------------------------------------------------------------------------------------------------- errors
def test_tag_and_image_count_mismatches_name_both_counts(processor):
    two_tags = "USER: <image>\n<image>\nWhat? ASSISTANT:"
    with pytest.raises(ValueError, match=r"The prompt contains 2 <image> tag\(s\) but 1 image\(s\)"):
        processor(images=rgb(8, 8), text=two_tags)
    with pytest.raises(ValueError, match=r"1 <image> tag\(s\) but 2 image\(s\)"):
        processor(images=[rgb(8, 8), rgb(8, 8)], text="USER: <image>\nWhat? ASSISTANT:")
    with pytest.raises(ValueError, match=r"0 <image> tag\(s\) but 1 image\(s\)"):
        processor(images=rgb(8, 8), text="USER: What? ASSISTANT:")
    with pytest.raises(ValueError, match=r"The prompt contains 2 <image> tag\(s\) but no images"):
        processor(text=two_tags)
    with pytest.raises(ValueError, match=r"Prompt 1 contains 2 <image> tag\(s\) but 1 image\(s\)"):
        processor(images=[[rgb(8, 8)], [rgb(8, 8)]], text=["<image> What?", two_tags])


def test_empty_prompts_and_images(processor):
    with pytest.raises(ValueError, match="Prompt 0 is empty"):
        processor(text="")
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        processor(text=["What?", "  \n"])
    with pytest.raises(ValueError, match="empty list"):
        processor(text=[])
    with pytest.raises(ValueError, match="`images` is empty"):
        processor(images=[], text="What?")
    with pytest.raises(ValueError, match="empty image of size 0x5"):
        processor(images=PIL.Image.new("RGB", (0, 5)), text="<image> What?")
    with pytest.raises(ValueError, match="empty image array of shape"):
        processor.image_processor(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="Image 0 is a dict"):
        processor(images={"x": 1}, text="<image> What?")


def test_missing_and_unreadable_image_files_name_the_path(processor, tmp_path):
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(ValueError, match=f"Image file '{missing}' does not exist"):
        processor(images=missing, text="<image> What?")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=f"Cannot read image file '{broken}'"):
        processor(images=str(broken), text="<image> What?")
    with pytest.raises(ValueError, match="is a directory"):
        processor(images=str(tmp_path), text="<image> What?")
    messages = [{"role": "user", "content": [{"type": "image", "path": missing}, {"type": "text", "text": "What?"}]}]
    with pytest.raises(ValueError, match="does not exist"):
        processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)


def test_tokenizer_without_image_token_is_rejected(image_processor):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = TokenizersBackend(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(ValueError, match="add_image_token"):
        SaisaProcessor(image_processor, plain)
    with pytest.raises(ValueError, match="image_seq_length must be a positive int"):
        SaisaProcessor(image_processor, build_word_tokenizer(WORDS), image_seq_length=0)
