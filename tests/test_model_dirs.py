"""Wrong model directories get one line that says what is missing and what to run (issue: a new user's first hour).

Each case goes through the command a user runs (`saisa generate` / `saisa train`, exit status 2) and, for the
unconverted checkpoints, through `from_pretrained` too.
"""

from __future__ import annotations

import json
import shutil

import pytest
from tiny import tiny_config, tiny_model

from modeling_saisa import SaisaForConditionalGeneration, SaisaProcessor
from modeling_saisa.cli import main
from modeling_saisa.tokenizers import build_word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saisa_model")
    tiny_model().save_pretrained(folder)
    SaisaProcessor.from_model_config(tiny_config(), build_word_tokenizer(["what"], vocab_size=99)).save_pretrained(
        folder
    )
    return folder


def _generate(model: str, capsys) -> str:
    assert main(["generate", "--model", model, "--prompt", "what", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saisa generate: error: ") and err.count("\n") == 1, err
    return err


def _train(model: str, capsys) -> str:
    assert main(["train", "--stage", "2", "--model", model, "--data", "d.json", "--output-dir", "o"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saisa train: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("model_type", "command"),
    [("llava_llama", "`saisa convert {} OUT`"), ("llava", "`saisa convert --from-llava {} OUT`")],
)
def test_unconverted_checkpoint_is_refused_with_the_command(tmp_path, capsys, model_type, command):
    src = tmp_path / model_type
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": ["X"]}))
    expected = command.format(src)
    with pytest.raises(ValueError, match="not a SAISA model; convert it once with") as info:
        SaisaForConditionalGeneration.from_pretrained(src)
    assert expected in str(info.value)
    assert expected in _train(str(src), capsys)
    if model_type == "llava_llama":
        assert expected in _generate(str(src), capsys)
    else:  # generate runs a llava-hf directory training-free (from_llava); this one has no processor to run with
        assert "has no processor files" in _generate(str(src), capsys)


def test_model_dir_without_processor_files(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(model_dir / name, bare / name)
    err = _generate(str(bare), capsys)
    assert "has no processor files: missing processor_config.json or preprocessor_config.json and tokenizer" in err
    assert "processor.save_pretrained(" in err


def test_lora_adapter_dir_names_the_merged_model(tmp_path, capsys):
    adapter = tmp_path / "stage2" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert "is a LoRA adapter (adapter_config.json), not a model" in _generate(str(adapter), capsys)


@pytest.mark.parametrize("run", [_generate, _train])
def test_missing_directory(run, capsys):
    assert "Model directory '/nonexistent/model' does not exist" in run("/nonexistent/model", capsys)


def test_directory_without_config(tmp_path, capsys):
    assert "has no config.json; expected a SAISA model directory" in _train(str(tmp_path), capsys)
