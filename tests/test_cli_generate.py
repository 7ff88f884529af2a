"""`saisa generate` and `saisa chat` on a tiny saved model: end to end in subprocesses (the real entry points), and
in-process through `modeling_saisa.cli.main` for the error paths (exit code 2 and one clear line on stderr).

The expected answers are computed in this process with `model.generate` + decode on the same directory.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import PIL.Image
import pytest
import torch
from tiny import tiny_config, tiny_model

from modeling_saisa import SaisaProcessor
from modeling_saisa.cli import main
from modeling_saisa.cli.chat import ChatSession, chat_loop
from modeling_saisa.tokenizers import build_word_tokenizer

WORDS = "USER : ASSISTANT describe the picture what color is it a red green cat dog tell me more".split()
MAX_NEW = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("cli_model")
    tiny_model(seed=1).save_pretrained(folder)
    SaisaProcessor.from_model_config(tiny_config(), build_word_tokenizer(WORDS, vocab_size=99)).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("cli_images") / "red.png"
    PIL.Image.new("RGB", (10, 6), (220, 40, 40)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def expected_answers(loaded, turns: list[tuple[str, list[str]]]) -> list[str]:
    """Greedy answers to a conversation, turn by turn, each answer fed back as the assistant's message."""
    model, processor = loaded
    messages, answers = [], []
    for text, images in turns:
        content = [{"type": "image", "path": path} for path in images] + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        answers.append(answer)
    return answers


def run_cli(*argv: str, stdin: str | None = None, script: bool = False) -> subprocess.CompletedProcess:
    command = [os.path.join(os.path.dirname(sys.executable), "saisa")] if script else [sys.executable, "-m"]
    command += [] if script else ["modeling_saisa"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [*command, *argv], input=stdin, capture_output=True, text=True, timeout=240, env=env, check=False
    )


@pytest.mark.slow
def test_generate_subprocess_streams_the_answer(model_dir, image_path, loaded):
    (expected,) = expected_answers(loaded, [("describe the picture", [image_path])])
    assert expected
    result = run_cli(
        "generate", "--model", model_dir, "--image", image_path, "--prompt", "describe the picture",
        "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--dtype", "float32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.slow
def test_chat_subprocess_multi_turn_with_image_command(model_dir, image_path, loaded):
    expected = expected_answers(loaded, [("tell me more", []), ("what color is it", [image_path])])
    stdin = f"tell me more\n/image {image_path}\nwhat color is it\n/exit\nnever sent\n"
    result = run_cli("chat", "--model", model_dir, "--max-new-tokens", str(MAX_NEW), stdin=stdin, script=True)
    assert result.returncode == 0, result.stderr
    replies = [line.split("ASSISTANT: ", 1)[1].strip() for line in result.stdout.splitlines() if "ASSISTANT: " in line]
    assert replies == expected
    assert f"(image {image_path} will go with your next message)" in result.stderr


def test_generate_in_process_text_only_and_sampling(model_dir, loaded, capsys):
    (expected,) = expected_answers(loaded, [("tell me more", [])])
    assert main(["generate", "--model", model_dir, "--prompt", "tell me more", "--max-new-tokens", str(MAX_NEW)]) == 0
    assert capsys.readouterr().out.strip() == expected
    argv = ["generate", "--model", model_dir, "--prompt", "tell me more", "--max-new-tokens", "3"]
    sampled = argv + ["--do-sample", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--seed", "3"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first  # --seed makes sampling reproducible


def test_chat_loop_eof_reset_and_errors(loaded, image_path, tmp_path):
    model, processor = loaded
    session = ChatSession(model, processor, {"max_new_tokens": MAX_NEW, "do_sample": False})
    missing = str(tmp_path / "missing.png")
    stdin = io.StringIO(f"/image {missing}\n/image\n/bogus\n/image {image_path}\nwhat color is it\n/reset\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    assert chat_loop(session, stdin, stdout, stderr) == 0  # ends at end of input
    log = stderr.getvalue()
    assert f"error: Image file '{missing}' does not exist." in log
    assert "usage: /image PATH" in log and "unknown command '/bogus'" in log and "(conversation cleared)" in log
    assert session.messages == [] and session.pending_images == []
    (expected,) = expected_answers(loaded, [("what color is it", [image_path])])
    assert f"ASSISTANT: {expected}" in stdout.getvalue()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--image", "/nonexistent/cat.png", "--prompt", "what"], "Image file '/nonexistent/cat.png' does not exist"),
        (["--prompt", "   "], "--prompt is empty"),
        (["--prompt", "what", "--top-k", "4"], "--top-k only applies to sampling; add --do-sample"),
        (["--prompt", "what", "--do-sample", "--temperature", "0"], "--temperature must be positive"),
        (["--prompt", "what", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_generate_bad_inputs_exit_2_with_message(model_dir, capsys, extra, message):
    assert main(["generate", "--model", model_dir, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saisa generate: error: ") and message in err


def test_missing_model_directory(tmp_path, capsys):
    missing = str(tmp_path / "no_model")
    assert main(["generate", "--model", missing, "--prompt", "what"]) == 2
    assert f"Model directory '{missing}' does not exist" in capsys.readouterr().err
    assert main(["chat", "--model", missing, "--image", "/nonexistent/x.png"]) == 2
    assert "Image file '/nonexistent/x.png' does not exist" in capsys.readouterr().err


def test_chat_second_question_about_an_image_runs_no_vision(loaded, image_path):
    model, processor = loaded
    session = ChatSession(model, processor, {"max_new_tokens": MAX_NEW, "do_sample": False})
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        session.add_image(image_path)
        first = session.ask("what color is it")
        second = session.ask("tell me more")
    finally:
        hook.remove()
    assert len(calls) == 1 and session.image_kv.stats()["hits"] >= 1
    expected = expected_answers(loaded, [("what color is it", [image_path]), ("tell me more", [])])
    assert [first, second] == expected
