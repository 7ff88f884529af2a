"""`saisa train` keeps float32 master weights when the checkpoint is stored in bf16/fp16 (unless --dtype says so).

Why: conversion.md composes and converts in bfloat16; training those weights in bfloat16 rounds most small updates
away. The check goes through the command a user runs, on a tiny bf16 stage-1 checkpoint.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_config

from modeling_saisa import SaisaForConditionalGeneration
from modeling_saisa.cli import main
from modeling_saisa.processing import SaisaProcessor
from modeling_saisa.tokenizers import build_word_tokenizer, split_words
from modeling_saisa.training import synthetic


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16_stage1")
    words = split_words("A chat USER: ASSISTANT:") + synthetic.vocabulary()
    processor = SaisaProcessor.from_model_config(tiny_config(), build_word_tokenizer(words, vocab_size=99))
    torch.manual_seed(0)
    model = SaisaForConditionalGeneration(tiny_config(shared_projector=True)).to(torch.bfloat16)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    data = synthetic.write_llava_dataset(folder / "data", synthetic.make_samples(4, seed=1))
    return folder, data


def _train(folder, data, out, *extra: str) -> int:
    argv = ["train", "--stage", "2", "--model", str(folder), "--data", str(data)]
    argv += ["--image-folder", str(folder / "data"), "--output-dir", str(out), "--max-steps", "1", "--use-cpu"]
    argv += ["--per-device-train-batch-size", "2", "--report-to", "none", "--save-strategy", "no"]
    argv += ["--disable-tqdm", "true", *extra]
    return main(argv)


def _stored_dtypes(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_bf16_checkpoint_trains_with_fp32_master_weights(bf16_checkpoint, tmp_path, caplog):
    folder, data = bf16_checkpoint
    with caplog.at_level(logging.INFO, logger="modeling_saisa"):
        assert _train(folder, data, tmp_path / "out") == 0
    assert "stored in bfloat16; training keeps float32 master weights" in caplog.text
    assert _stored_dtypes(tmp_path / "out") == {"F32"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_explicit_low_precision_is_honoured_with_a_warning(bf16_checkpoint, tmp_path, caplog):
    folder, data = bf16_checkpoint
    with caplog.at_level(logging.INFO, logger="modeling_saisa"):
        assert _train(folder, data, tmp_path / "out", "--dtype", "bfloat16") == 0
    assert "Training the weights in bfloat16 as asked" in caplog.text
    assert _stored_dtypes(tmp_path / "out") == {"BF16"}
