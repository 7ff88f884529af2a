"""What `saisa train` tells the user: the stage-2 projector source, the LoRA parameter summary, the skipped-row
count. Each through the command, on a tiny stage-1 checkpoint and a tiny LLaVA-format file."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny import tiny_config

from modeling_saisa import SaisaForConditionalGeneration
from modeling_saisa.cli import main
from modeling_saisa.processing import SaisaProcessor
from modeling_saisa.tokenizers import build_word_tokenizer, split_words
from modeling_saisa.training import synthetic


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A stage-1 checkpoint (shared projector), a stage-2 one (per-layer projectors), and a data file."""
    root = tmp_path_factory.mktemp("train_reports")
    words = split_words("A chat USER: ASSISTANT:") + synthetic.vocabulary()
    processor = SaisaProcessor.from_model_config(tiny_config(), build_word_tokenizer(words, vocab_size=99))
    for name, shared in (("stage1", True), ("stage2", False)):
        torch.manual_seed(0)
        SaisaForConditionalGeneration(tiny_config(shared_projector=shared)).save_pretrained(root / name)
        processor.save_pretrained(root / name)
    data = synthetic.write_llava_dataset(root / "data", synthetic.make_samples(6, seed=1))
    return root, data


def _argv(root, data, out, *extra: str) -> list[str]:
    argv = ["train", "--stage", "2", "--model", str(root / "stage1"), "--data", str(data), "--use-cpu"]
    argv += ["--image-folder", str(root / "data"), "--output-dir", str(out), "--max-steps", "1"]
    argv += ["--per-device-train-batch-size", "2", "--report-to", "none", "--save-strategy", "no"]
    return argv + ["--disable-tqdm", "true", *extra]


def test_init_projectors_from_a_stage2_checkpoint_is_refused(checkpoints, tmp_path, capsys):
    root, data = checkpoints
    assert main(_argv(root, data, tmp_path / "out", "--init-projectors-from", str(root / "stage2"))) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("saisa train: error: ")
    assert "holds per-layer projectors (shared_projector is false: a stage-2 checkpoint)" in err
    assert "continue from this checkpoint with --model" in err


def test_lora_summary_counts_projectors_as_fully_trainable(checkpoints, tmp_path, caplog):
    root, data = checkpoints
    with caplog.at_level(logging.INFO, logger="modeling_saisa"):
        assert main(_argv(root, data, tmp_path / "out", "--lora", "--lora-r", "4")) == 0
    (line,) = [line for line in caplog.text.splitlines() if line.startswith("projectors: ")]
    trainable, total = line.removeprefix("projectors: ").removesuffix(" trainable").split(" / ")
    assert trainable == total, line


def test_skipped_count_includes_rows_dropped_while_reading(checkpoints, tmp_path, caplog):
    root, data = checkpoints
    rows = json.loads(open(data).read())
    rows.append({"id": "no-conversations"})  # dropped by the reader
    rows.append({"id": "missing-image", "image": "nope.png", "conversations": rows[0]["conversations"]})
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    with caplog.at_level(logging.INFO, logger="modeling_saisa"):
        assert main(_argv(root, path, tmp_path / "out")) == 0
    assert f"Skipped 2 of {len(rows)} rows (1 while reading the file)" in caplog.text
    assert f"Stage 2 on {len(rows) - 2} rows (2 skipped)" in caplog.text
