"""`saisa generate` / `saisa chat` with the input a new user plausibly gives: `<image>` typed into the prompt, a
prompt or `--max-new-tokens` beyond the context, a device this machine lacks, sampling knobs without sampling, and a
chat message that fails while an image is pending. Each gets one clear line (exit status 2 where it is an error).
"""

from __future__ import annotations

import io

import PIL.Image
import pytest
import torch
from tiny import tiny_config

from modeling_saisa import SaisaForConditionalGeneration, SaisaProcessor
from modeling_saisa.cli import main
from modeling_saisa.cli.chat import ChatSession, chat_loop
from modeling_saisa.tokenizers import build_word_tokenizer

WORDS = "what color is it a red green tell me more".split()
CONTEXT = 96  # small enough that a prompt reaches it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("edge_model")
    config = tiny_config()
    config.text_config.max_position_embeddings = CONTEXT
    torch.manual_seed(0)
    SaisaForConditionalGeneration(config).save_pretrained(folder)
    SaisaProcessor.from_model_config(config, build_word_tokenizer(WORDS, vocab_size=99)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("edge_images") / "red.png"
    PIL.Image.new("RGB", (10, 6), (220, 40, 40)).save(path)
    return str(path)


def _error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]  # beside transformers' loading progress bar
    assert len(lines) == 1 and lines[0].startswith(f"saisa {argv[0]}: error: "), err
    return lines[0]


def test_image_tag_in_prompt_says_the_cli_places_images(model_dir, image_path, capsys):
    argv = ["generate", "--model", model_dir, "--image", image_path, "--prompt", "<image> what color"]
    err = _error(argv, capsys)
    assert "--prompt contains '<image>': the command places each image itself" in err


def test_max_new_tokens_beyond_the_context_is_lowered_before_generating(model_dir, image_path, capsys):
    argv = ["generate", "--model", model_dir, "--image", image_path, "--prompt", "what color", "--max-new-tokens"]
    assert main([*argv, "500"]) == 0
    captured = capsys.readouterr()
    assert "note: --max-new-tokens lowered from 500 to " in captured.err
    assert f"of the model's {CONTEXT}-token context" in captured.err
    assert "Sequence too long" not in captured.out + captured.err


def test_prompt_filling_the_context_is_an_error_before_streaming(model_dir, capsys):
    err = _error(["generate", "--model", model_dir, "--prompt", "what " * CONTEXT], capsys)
    assert f"but the model's context is {CONTEXT} tokens: no room left for an answer" in err


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("foo", "--device 'foo' is not a device; expected auto, cpu, cuda, cuda:N or mps."),
        pytest.param(
            "cuda",
            "--device 'cuda': this torch build has no CUDA",
            marks=pytest.mark.skipif(torch.cuda.is_available() or torch.version.cuda is not None, reason="CPU build"),
        ),
    ],
)
def test_device_errors_are_one_line(model_dir, capsys, device, message):
    assert message in _error(["generate", "--model", model_dir, "--prompt", "what", "--device", device], capsys)


def test_single_sampling_knob_grammar(model_dir, capsys):
    err = _error(["generate", "--model", model_dir, "--prompt", "what", "--temperature", "0.5"], capsys)
    assert "--temperature only applies to sampling; add --do-sample." in err
    err = _error(["generate", "--model", model_dir, "--prompt", "what", "--top-p", "0.5", "--top-k", "3"], capsys)
    assert "--top-p, --top-k only apply to sampling" in err


def test_chat_error_prints_no_answer_prefix_and_keeps_the_pending_image(model_dir, image_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    session = ChatSession(model, AutoProcessor.from_pretrained(model_dir), {"max_new_tokens": 2, "do_sample": False})
    stdin = io.StringIO(f"/image {image_path}\n<image> what color\nwhat color\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    assert chat_loop(session, stdin, stdout, stderr) == 0
    log = stderr.getvalue()
    assert "error: Your message contains '<image>'" in log
    assert f"(still pending for your next message: {image_path}; /reset drops them)" in log
    assert stdout.getvalue().count("ASSISTANT: ") == 1  # only the answer that was generated
    (user, _) = session.messages
    assert user["content"][0] == {"type": "image", "path": image_path}  # the image went with the next message
