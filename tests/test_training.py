"""Training: data loading and bad rows, collator labels, the two-stage recipe, LoRA, resume, learning, CLI, demo."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tiny import IMAGE_TOKEN_ID, tiny_config

from modeling_saisa import SaisaForConditionalGeneration
from modeling_saisa.processing import SaisaProcessor
from modeling_saisa.tokenizers import build_word_tokenizer, split_words
from modeling_saisa.training import synthetic
from modeling_saisa.training.collator import IGNORE_INDEX, BadExampleError, ConversationEncoder, SaisaDataCollator
from modeling_saisa.training.data import (
    SaisaSupervisedDataset,
    examples_from_hf,
    llava_to_messages,
    load_llava_json,
)
from modeling_saisa.training.recipes import (
    LORA_TARGET_MODULES,
    LoraSettings,
    apply_lora,
    freeze_for_stage,
    stage2_from_stage1,
)

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
N_V = 16  # tiny config: 8 px / patch 2 -> 16 visual tokens


@pytest.fixture(scope="module")
def processor() -> SaisaProcessor:
    words = split_words(SYSTEM + " USER: ASSISTANT: what is it a red circle and where left") + synthetic.vocabulary()
    tokenizer = build_word_tokenizer(words, vocab_size=99)
    return SaisaProcessor.from_model_config(tiny_config(), tokenizer)


def _user(*parts):
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]}


def _assistant(*parts):
    return {
        "role": "assistant",
        "content": [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts],
    }


def _image(color=(200, 30, 30), size=(10, 6)):
    return Image.new("RGB", size, color)


# --------------------------------------------------------------------------------------------------- collator
def test_collator_labels_multi_turn_hand_checked(processor):
    """Two turns: only the replies and their </s> are labels; the prompt, placeholders and separators are not."""
    tok = processor.tokenizer
    messages = [_user(None, "what is it"), _assistant("a red circle"), _user("where"), _assistant("left")]
    out = ConversationEncoder(processor)(messages, [_image()])
    system = split_words(SYSTEM)
    expected_tokens = (
        ["<s>", *system, "USER", ":"]
        + ["<image>"] * N_V
        + ["what", "is", "it", "ASSISTANT", ":", "a", "red", "circle", "</s>"]
        + ["USER", ":", "where", "ASSISTANT", ":", "left", "</s>"]
    )
    # `split_words` drops duplicates; the system prompt really is these words in this order, with repeats:
    system_tokens = re.findall(r"\w+|[^\w\s]+", SYSTEM)
    expected_tokens = ["<s>", *system_tokens, *expected_tokens[1 + len(system) :]]
    assert tok.convert_ids_to_tokens(out["input_ids"].tolist()) == expected_tokens
    n_prefix = 1 + len(system_tokens) + 2 + N_V + 5  # BOS, system, "USER :", image, "what is it ASSISTANT :"
    expected_labels = (
        [None] * n_prefix + ["a", "red", "circle", "</s>"] + [None] * 5 + ["left", "</s>"]
    )  # "USER : where ASSISTANT :" is prompt
    labels = [None if x == IGNORE_INDEX else tok.convert_ids_to_tokens(x) for x in out["labels"].tolist()]
    assert labels == expected_labels
    assert out["input_ids"][1 + len(system_tokens) + 2] == IMAGE_TOKEN_ID  # first placeholder right after "USER :"
    # Training ids are exactly what the processor gives at inference for the same text and image.
    text = processor.apply_chat_template(messages, tokenize=False)
    reference = processor(text=text, images=[_image()], return_tensors="pt")
    assert reference["input_ids"][0].tolist() == out["input_ids"].tolist()
    assert torch.equal(reference["pixel_values"], out["pixel_values"])


def test_label_right_after_an_image_span_is_ignored(processor):
    """SAISA has no output at visual rows: the token after an image can never be predicted, so it is no label."""
    messages = [_user("what is it"), _assistant(None, "red circle")]
    out = ConversationEncoder(processor)(messages, [_image()])
    tok = processor.tokenizer
    tokens = tok.convert_ids_to_tokens(out["input_ids"].tolist())
    labels = [None if x == IGNORE_INDEX else tok.convert_ids_to_tokens(x) for x in out["labels"].tolist()]
    first_after = len(tokens) - 1 - tokens[::-1].index("<image>") + 1
    assert tokens[first_after : first_after + 3] == ["red", "circle", "</s>"]
    assert labels[first_after : first_after + 3] == [None, "circle", "</s>"]
    assert all(labels[i] is None for i, t in enumerate(tokens) if t == "<image>")


def test_collator_pads_right_and_concatenates_images_in_row_order(processor):
    encoder = ConversationEncoder(processor)
    red, blue, green = _image((255, 0, 0)), _image((0, 0, 255)), _image((0, 255, 0))
    rows = [
        encoder([_user(None, "what is it"), _assistant("red")], [red]),
        encoder([_user("where"), _assistant("left")], []),
        encoder([_user(None, None, "what is it"), _assistant("a circle")], [blue, green]),
    ]
    batch = SaisaDataCollator(processor)(rows)
    lengths = [len(r["input_ids"]) for r in rows]
    assert batch["input_ids"].shape == (3, max(lengths))
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][i, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
    expected = torch.cat([rows[0]["pixel_values"], rows[2]["pixel_values"]])
    assert torch.equal(batch["pixel_values"], expected)
    # Raw rows (messages + images, as a plain datasets.Dataset yields them) are encoded by the collator itself.
    raw = SaisaDataCollator(processor)([{"messages": [_user(None, "what is it"), _assistant("red")], "image": red}])
    assert torch.equal(raw["input_ids"][0], rows[0]["input_ids"])


def test_encoder_rejects_rows_that_cannot_be_trained(processor):
    encoder = ConversationEncoder(processor, max_length=40)
    with pytest.raises(BadExampleError, match="'r1'.*1 image placeholder.*0 image"):
        encoder([_user(None, "what"), _assistant("red")], [], example_id="r1")
    with pytest.raises(BadExampleError, match="no assistant reply"):
        ConversationEncoder(processor)([_user("what")], [])
    with pytest.raises(BadExampleError, match="exceed max_length=40"):
        encoder([_user(None, "what"), _assistant("red")], [_image()])


# ------------------------------------------------------------------------------------------------------ data
def _write_rows(folder, rows):
    path = os.path.join(folder, "data.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


def test_llava_json_bad_rows_are_reported_and_skipped_or_raise(processor, tmp_path, caplog):
    samples = synthetic.make_samples(3, seed=1)
    path = synthetic.write_llava_dataset(tmp_path, samples)
    rows = json.load(open(path))
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "ok.png")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"not a png")
    conv = [{"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": "red"}]
    rows += [
        {"id": "missing", "image": "images/nope.png", "conversations": conv},
        {"id": "mismatch", "image": ["images/ok.png", "images/ok.png"], "conversations": conv},
        {"id": "no-image", "conversations": conv},
        {"id": "too-long", "image": "images/ok.png", "conversations": conv * 3},
        {"id": "bad-speaker", "conversations": [{"from": "robot", "value": "hi"}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "where"}, {"from": "gpt", "value": "left"}]},
        {"id": "corrupt", "image": "images/corrupt.png", "conversations": conv},
    ]
    path = _write_rows(tmp_path, rows)
    caplog.set_level("WARNING")
    dataset = SaisaSupervisedDataset(load_llava_json(path), processor, image_folder=tmp_path, max_length=100)
    # the row the reader left out (unknown speaker) comes first: every skipped row is counted once, in one list
    assert [i for i, _ in dataset.bad] == ["bad-speaker", "missing", "mismatch", "no-image", "too-long"]
    assert "bad-speaker" in caplog.text and "missing" in caplog.text
    assert len(dataset) == 5  # three samples, the text-only row, and the corrupt one (only found when loaded)
    item = dataset[0]
    assert item["id"] == samples[0].id and item["pixel_values"].shape == (1, 3, 8, 8)
    assert dataset[3]["pixel_values"] is None  # text-only rows train too
    assert dataset[4]["id"] == samples[0].id  # the corrupt image is reported and the next row served instead
    assert dataset.bad[-1][0] == "corrupt" and "cannot load image" in dataset.bad[-1][1]

    with pytest.raises(BadExampleError, match="'bad-speaker'.*unknown speaker"):
        load_llava_json(path, on_bad="raise")
    good = [r for r in rows if r["id"] not in ("bad-speaker",)]
    with pytest.raises(BadExampleError, match="'missing'.*image file not found"):
        SaisaSupervisedDataset(load_llava_json(_write_rows(tmp_path, good)), processor, tmp_path, on_bad="raise")
    only_corrupt = [r for r in rows if r["id"] in (samples[0].id, "corrupt")]
    dataset = SaisaSupervisedDataset(
        load_llava_json(_write_rows(tmp_path, only_corrupt)), processor, tmp_path, on_bad="raise"
    )
    with pytest.raises(BadExampleError, match="'corrupt'.*cannot load image"):
        dataset[1]


def test_llava_conversations_become_chat_messages():
    messages = llava_to_messages(
        [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nWhat?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Compare with\n<image>"},
        ]
    )
    assert messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare with"}, {"type": "image"}]},
    ]


def test_hf_dataset_gives_the_same_rows_as_llava_json(processor, tmp_path):
    samples = synthetic.make_samples(4, seed=2)
    from_json = SaisaSupervisedDataset(
        load_llava_json(synthetic.write_llava_dataset(tmp_path, samples)), processor, image_folder=tmp_path
    )
    from_hf = SaisaSupervisedDataset(examples_from_hf(synthetic.to_hf_dataset(samples)), processor)
    assert len(from_hf) == len(from_json) == 4
    for i in range(4):
        a, b = from_json[i], from_hf[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])


# ------------------------------------------------------------------------------------------------- recipes
def _tiny(shared: bool, seed: int = 0, **overrides) -> SaisaForConditionalGeneration:
    torch.manual_seed(seed)
    model = SaisaForConditionalGeneration(tiny_config(shared_projector=shared, **overrides))
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="module")
def tiny_dataset(processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    samples = synthetic.make_samples(23, seed=3)
    path = synthetic.write_llava_dataset(folder, samples)
    rows = json.load(open(path))  # one text-only row: batches mixing rows with and without images must train
    conv = [{"from": "human", "value": "where is it"}, {"from": "gpt", "value": "top left"}]
    rows.insert(1, {"id": "text-only", "conversations": conv})
    path = _write_rows(folder, rows)
    return SaisaSupervisedDataset(load_llava_json(path), processor, image_folder=folder), path, folder


def _trainer(model, dataset, processor, out, steps=3, **kwargs):
    from transformers import Trainer, TrainingArguments

    settings = dict(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **kwargs})
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=SaisaDataCollator(processor))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def test_stage1_trains_only_the_shared_projector(tiny_dataset, processor, tmp_path):
    model = freeze_for_stage(_tiny(shared=True), 1)
    before = _snapshot(model)
    _trainer(model, tiny_dataset[0], processor, tmp_path).train()
    changed = _changed(model, before)
    assert changed == {n for n in before if n.startswith("model.multi_modal_projector.0.")}
    assert len(changed) == 4
    with pytest.raises(ValueError, match="shared projector"):
        freeze_for_stage(_tiny(shared=False), 1)


def test_stage2_from_stage1_copies_the_projector_and_trains_projectors_and_llm(tiny_dataset, processor, tmp_path):
    stage1 = _tiny(shared=True)
    batch = SaisaDataCollator(processor)([tiny_dataset[0][i] for i in range(3)])
    with torch.no_grad():
        logits1 = stage1(**{k: v for k, v in batch.items() if k != "labels"}).logits
    model = stage2_from_stage1(stage1)
    assert not model.config.shared_projector and len(model.model.multi_modal_projector) == 2
    with torch.no_grad():
        assert torch.equal(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, logits1)
    freeze_for_stage(model, 2)
    before = _snapshot(model)
    _trainer(model, tiny_dataset[0], processor, tmp_path).train()
    changed = _changed(model, before)
    vision = {n for n in before if n.startswith("model.vision_tower.")}
    assert changed == set(before) - vision  # every projector and LLM tensor moved, no vision tensor did
    p0, p1 = model.model.multi_modal_projector
    assert not torch.equal(p0.linear_1.weight, p1.linear_1.weight)  # independent copies, trained apart


def test_stage2_from_stage1_keeps_tied_embeddings():
    model = stage2_from_stage1(_tiny(shared=True, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


def test_lora_trains_adapters_and_projectors_then_merges(tiny_dataset, processor, tmp_path):
    model = freeze_for_stage(_tiny(shared=False), 2)
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    before = _snapshot(peft_model)
    _trainer(peft_model, tiny_dataset[0], processor, tmp_path).train()
    changed = _changed(peft_model, before)
    assert changed and all(("lora_" in n) or ("multi_modal_projector" in n and "modules_to_save" in n) for n in changed)
    assert any("lora_B" in n for n in changed)
    assert {n for n in changed if "lora_" in n} == {n for n in before if "lora_" in n and "language_model" in n}
    targets = {n.split(".lora_")[0].split("language_model.")[1] for n in changed if "lora_" in n}
    assert {t.split(".")[-1] for t in targets} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert re.fullmatch(LORA_TARGET_MODULES, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(LORA_TARGET_MODULES, "model.vision_tower.encoder.layers.0.self_attn.q_proj")

    batch = SaisaDataCollator(processor)([tiny_dataset[0][i] for i in range(3)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    merged = peft_model.merge_and_unload()
    assert type(merged) is SaisaForConditionalGeneration
    merged.save_pretrained(tmp_path / "merged")
    reloaded = SaisaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)


def test_resumed_run_equals_uninterrupted_run(tiny_dataset, processor, tmp_path):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    common = dict(steps=6, save_strategy="steps", save_steps=3, seed=7)
    straight = freeze_for_stage(_tiny(shared=False), 2)
    _trainer(straight, tiny_dataset[0], processor, tmp_path / "a", **common).train()

    interrupted = freeze_for_stage(_tiny(shared=False), 2)
    trainer = _trainer(interrupted, tiny_dataset[0], processor, tmp_path / "b", **common)
    trainer.add_callback(StopAt())
    trainer.train()
    assert os.path.isdir(tmp_path / "b" / "checkpoint-3")
    resumed = freeze_for_stage(_tiny(shared=False, seed=1), 2)  # other init: everything must come from the checkpoint
    _trainer(resumed, tiny_dataset[0], processor, tmp_path / "b", **common).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3")
    )
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------------- learning
def test_small_model_learns_colors_far_above_chance():
    """A few seconds of training: the loss falls and held-out colour answers beat chance (20 %) by far."""
    from modeling_saisa.training import demo

    settings = demo.DemoSettings(hidden_size=32, intermediate_size=64)
    processor = demo.build_demo_processor(settings)
    model = demo.build_demo_model(processor, settings, seed=0).train()
    train = synthetic.make_samples(512, seed=0, kinds=("color",))
    test = synthetic.make_samples(100, seed=99, kinds=("color",), prefix="test")
    collate = SaisaDataCollator(processor)
    features = demo._training_features(train, processor, settings, 0, turns=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(150):
        batch = collate([features[i] for i in torch.randint(len(features), (32,)).tolist()])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:10]) / 10  # measured: ~3.1 -> ~0.02 on four seeds
    batch = collate(demo._training_features(test, processor, settings, 0, turns=1))
    model.eval()
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    correct = ((logits[:, :-1].argmax(-1) == labels) | (labels == IGNORE_INDEX)).all(1).float().mean().item()
    assert correct >= 0.8, correct  # measured: 100 % on seeds 0-3


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_checkpoint(processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stage1")
    _tiny(shared=True).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_cli_parses_yaml_with_flags_overriding(tmp_path):
    from modeling_saisa.cli.train import parse

    config = tmp_path / "run.yaml"
    config.write_text("stage: 2\nmodel: m\ndata: d.json\noutput-dir: out\nlearning_rate: 0.5\nlora: true\nlora_r: 4\n")
    training_args, opts = parse(["--config", str(config), "--learning-rate", "0.25", "--max-steps", "3"])
    assert (opts.stage, opts.model, opts.lora, opts.lora_r) == (2, "m", True, 4)
    assert training_args.learning_rate == 0.25 and training_args.max_steps == 3 and training_args.output_dir == "out"
    assert training_args.remove_unused_columns is False
    with pytest.raises(ValueError, match="missing --stage"):
        parse(["--model", "m", "--data", "d", "--output-dir", "o"])
    config.write_text("stage: 1\nbogus: 1\n")
    with pytest.raises(ValueError, match="unknown option.*bogus"):
        parse(["--config", str(config)])
    with pytest.raises(ValueError, match="--lora is a stage-2 option"):
        parse(["--stage", "1", "--model", "m", "--data", "d", "--output-dir", "o", "--lora"])


def test_cli_stage2_lora_trains_merges_and_saves_our_format(tiny_checkpoint, tiny_dataset, tmp_path):
    from transformers import pipeline

    from modeling_saisa.cli import main

    _, data, folder = tiny_dataset
    out = tmp_path / "stage2"
    argv = ["train", "--stage", "2", "--model", str(tiny_checkpoint), "--data", data, "--image-folder", str(folder)]
    argv += ["--output-dir", str(out), "--max-steps", "2", "--per-device-train-batch-size", "4", "--lora"]
    argv += ["--lora-r", "4", "--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true"]
    assert main(argv) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    model = SaisaForConditionalGeneration.from_pretrained(out)
    assert not model.config.shared_projector and len(model.model.multi_modal_projector) == 2
    assert not any("lora" in n for n, _ in model.named_parameters())
    pipe = pipeline("image-text-to-text", model=str(out))
    chat = [{"role": "user", "content": [{"type": "image", "image": _image()}, {"type": "text", "text": "what"}]}]
    assert isinstance(pipe(text=chat, max_new_tokens=2, return_full_text=False)[0]["generated_text"], str)


def test_train_stage_reads_a_saved_hf_dataset(tiny_checkpoint, tmp_path):
    from transformers import TrainingArguments

    from modeling_saisa.training.recipes import train_stage

    synthetic.to_hf_dataset(synthetic.make_samples(8, seed=4)).save_to_disk(str(tmp_path / "hf"))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    metrics = train_stage(stage=1, model_dir=tiny_checkpoint, data=str(tmp_path / "hf"), training_args=args)
    assert metrics["skipped_rows"] == 0
    assert SaisaForConditionalGeneration.from_pretrained(tmp_path / "out").config.shared_projector


def test_accelerate_launch_runs_a_training_step_in_one_cpu_process(tiny_checkpoint, tiny_dataset, tmp_path):
    from modeling_saisa.training import config_path

    _, data, folder = tiny_dataset
    out = tmp_path / "stage1"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_path("accelerate_cpu.yaml")]
    command += ["-m", "modeling_saisa", "train", "--stage", "1", "--model", str(tiny_checkpoint), "--data", data]
    command += ["--image-folder", str(folder), "--output-dir", str(out), "--max-steps", "1", "--report-to", "none"]
    command += ["--per-device-train-batch-size", "4", "--save-strategy", "no", "--activation-checkpointing"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "saved stage-1 model" in result.stdout
    trained = SaisaForConditionalGeneration.from_pretrained(out)
    start = SaisaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    for (name, a), (_, b) in zip(trained.named_parameters(), start.named_parameters()):
        assert torch.equal(a, b) != name.startswith("model.multi_modal_projector."), name


# ----------------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_saisa_demo_quick(tmp_path, capsys):
    from transformers import pipeline

    from modeling_saisa.cli import main

    assert main(["demo", "--quick", "--output-dir", str(tmp_path), "--seed", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"accuracy: (\d+\.\d)%", lines[-1])
    assert match, lines[-5:]
    assert float(match.group(1)) > 40.0  # chance is about 23 % over the three question kinds
    assert (tmp_path / "answers.png").is_file() and (tmp_path / "config.json").is_file()
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    sample = synthetic.make_samples(1, seed=5)[0]
    chat = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": sample.image}, {"type": "text", "text": sample.question}],
            }
        ]
    ]
    out = pipe(text=chat, max_new_tokens=4, return_full_text=False)
    assert isinstance(out[0][0]["generated_text"], str)
    assert not math.isnan(float(match.group(1)))


def test_demo_steps_flag_sets_the_schedule(monkeypatch, capsys):
    from modeling_saisa.cli import main
    from modeling_saisa.training import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: seen.update(kwargs))
    assert main(["demo", "--steps", "4000", "--visual-policy", "naavit", "--seed", "2"]) == 0
    assert seen["settings"] == demo.replace(demo.STANDARD, steps=4000)
    assert (seen["visual_policy"], seen["seed"]) == ("naavit", 2)
    assert main(["demo", "--quick"]) == 0 and seen["settings"] == demo.QUICK
    assert main(["demo", "--steps", "0"]) != 0
    assert "--steps must be a positive number of training steps; got 0" in capsys.readouterr().err
