"""More than one process, really run: DDP, FSDP2, DeepSpeed ZeRO-2/3 training and tensor-parallel inference.

Every test launches two CPU processes (gloo) on a tiny stage-2 SAISA (2 decoder layers, one projector per layer)
and the 32-row coloured-shapes dataset, through the same launchers users run on GPUs: `accelerate launch` for DDP and
FSDP, `torchrun` for DeepSpeed and tensor parallelism. The training runs are `saisa train` itself
(`tests/distributed_worker.py` adds only an end-of-training probe of the live model). Each launch has a timeout and
is killed with its whole process group, so a crashed or hung rank fails the test instead of hanging the suite.

Equalities proved (same data order, same global batch of 4, 4 steps, lr 1e-2):
- DDP (2 x 2 rows) loss curve == one process (1 x 4 rows); a run resumed from a checkpoint in a new pair of processes
  ends with the same weights; the saved model answers through `pipeline("image-text-to-text")`.
- FSDP2 (decoder layers, vision layers and each projector wrapped), sharded and full state dicts, and activation
  checkpointing: loss curve == DDP's; the saved model, in one process, gives the live sharded model's logits.
- ZeRO-2 / ZeRO-3: loss curve == DDP's; the saved model gives the live model's logits.
- Tensor parallelism: logits and greedy tokens == one process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import tiny_config

from modeling_saisa import SaisaForConditionalGeneration
from modeling_saisa.processing import SaisaProcessor
from modeling_saisa.tokenizers import build_word_tokenizer, split_words
from modeling_saisa.training import config_path, synthetic
from modeling_saisa.training.collator import SaisaDataCollator
from modeling_saisa.training.data import SaisaSupervisedDataset, load_llava_json

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
# Float tolerance for "the same run on another engine". Observed here: DDP vs one process 2.4e-7 (loss), FSDP2,
# ZeRO-2 and ZeRO-3 vs DDP equal to the printed digits; reloaded logits vs the live model: 0.
LOSS_ATOL = 1e-5
LAUNCH_TIMEOUT_S = 240  # the first DeepSpeed launch JIT-builds its shared-memory op (~40 s here); later ones reuse it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(command: list[str], env: dict[str, str] | None = None, timeout: float = LAUNCH_TIMEOUT_S) -> str:
    """Run a launcher in its own process group; on timeout kill the group, so no rank outlives a failed test."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    full_env.update(env or {})
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... timed out after {timeout} s (a rank hung):\n{output[-4000:]}")
    assert proc.returncode == 0, output[-6000:]
    return output


def _accelerate(*launcher_flags: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"] + [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *launcher_flags,
    ]


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny stage-2 checkpoint with its processor, a LLaVA-JSON dataset, a probe batch and a generation batch."""
    root = tmp_path_factory.mktemp("distributed")
    words = split_words(SYSTEM + " USER: ASSISTANT: what is it") + synthetic.vocabulary()
    processor = SaisaProcessor.from_model_config(tiny_config(), build_word_tokenizer(words, vocab_size=99))
    torch.manual_seed(0)
    model = SaisaForConditionalGeneration(tiny_config(shared_projector=False))
    model.set_attn_implementation("sdpa")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    data = synthetic.write_llava_dataset(root / "data", synthetic.make_samples(32, seed=3))
    dataset = SaisaSupervisedDataset(load_llava_json(data), processor, image_folder=root / "data")
    batch = SaisaDataCollator(processor)([dataset[i] for i in range(3)])
    torch.save({k: v for k, v in batch.items() if k != "labels"}, root / "batch.pt")
    samples = synthetic.make_samples(2, seed=5)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
            add_generation_prompt=True,
        )
        for s in samples
    ]
    processor.tokenizer.padding_side = "left"
    generation = processor(text=prompts, images=[s.image for s in samples], padding=True, return_tensors="pt")
    torch.save(dict(generation), root / "generation.pt")
    return root


def _train_flags(workspace: Path, output_dir: Path, per_device_batch: int = 2) -> list[str]:
    flags = ["--stage", "2", "--model", str(workspace / "model"), "--data", str(workspace / "data" / "data.json")]
    flags += ["--image-folder", str(workspace / "data"), "--output-dir", str(output_dir), "--max-steps", "4"]
    flags += ["--per-device-train-batch-size", str(per_device_batch), "--learning-rate", "1e-2", "--seed", "7"]
    flags += ["--save-strategy", "steps", "--save-steps", "2", "--logging-steps", "1", "--report-to", "none"]
    return flags + ["--disable-tqdm", "true", "--use-cpu", "true", "--dataloader-num-workers", "0"]


def _worker(workspace: Path, output_dir: Path, *extra: str) -> list[str]:
    return [str(HERE / "distributed_worker.py"), *_train_flags(workspace, output_dir), *extra]


def _probe_env(workspace: Path, name: str, **extra: str) -> tuple[dict[str, str], Path]:
    out = workspace / f"probe_{name}.pt"
    return {"SAISA_PROBE_BATCH": str(workspace / "batch.pt"), "SAISA_PROBE_OUT": str(out), **extra}, out


def _losses(probe: dict) -> list[float]:
    return [entry["loss"] for entry in probe["log_history"] if "loss" in entry]


def _load_probe(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def _reloaded_logits(model_dir: Path, workspace: Path) -> torch.Tensor:
    model = SaisaForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(**torch.load(workspace / "batch.pt")).logits


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == 4, (a, b)
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def one_process(workspace) -> dict:
    """The reference: one process, 4 rows per step, in this process (Trainer on CPU, as `saisa train` runs it)."""
    from distributed_worker import EndOfTrainingProbe

    from modeling_saisa.cli.train import parse
    from modeling_saisa.training.recipes import train_stage

    env, out = _probe_env(workspace, "one")
    training_args, opts = parse(_train_flags(workspace, workspace / "one", per_device_batch=4))
    train_stage(
        stage=opts.stage,
        model_dir=opts.model,
        data=opts.data,
        training_args=training_args,
        image_folder=opts.image_folder,
        callbacks=[EndOfTrainingProbe(env["SAISA_PROBE_BATCH"], str(out))],
    )
    return _load_probe(out)


@pytest.fixture(scope="module")
def ddp(workspace) -> dict:
    """Two processes through `accelerate launch --multi_gpu` (torchrun underneath; gloo, as no GPU is present)."""
    env, out = _probe_env(workspace, "ddp")
    output = _launch(_accelerate("--multi_gpu") + _worker(workspace, workspace / "ddp"), env)
    assert '"world_size": 2' in output
    return _load_probe(out)


def test_ddp_equals_one_process_resumes_across_processes_and_serves(workspace, one_process, ddp):
    from transformers import pipeline

    diff = _max_diff(_losses(ddp), _losses(one_process))
    print(f"DDP vs one process, max loss difference: {diff:.3g}")
    assert diff <= LOSS_ATOL
    assert ddp["log_history"][-1]["epoch"] == 0.5  # 4 steps x 4 rows of 32: both ranks consumed data

    # A new pair of processes resumes from step 2 and ends where the uninterrupted run ended.
    env, out = _probe_env(workspace, "resumed")
    resume = ["--resume-from-checkpoint", str(workspace / "ddp" / "checkpoint-2")]
    _launch(_accelerate("--multi_gpu") + _worker(workspace, workspace / "resumed", *resume), env)
    straight = load_file(workspace / "ddp" / "model.safetensors")
    resumed = load_file(workspace / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    weight_diff = max((straight[k] - resumed[k]).abs().max().item() for k in straight)
    print(f"DDP resumed vs uninterrupted, max weight difference: {weight_diff:.3g}")
    assert weight_diff <= 1e-6
    # The restored log history keeps steps 1-2; steps 3-4 are the resumed run's own.
    assert _losses(_load_probe(out)) == pytest.approx(_losses(ddp), abs=LOSS_ATOL)

    # The saved model is a plain checkpoint: from_pretrained gives the live model's logits, and it answers.
    torch.testing.assert_close(_reloaded_logits(workspace / "ddp", workspace), ddp["logits"], atol=1e-6, rtol=0)
    pipe = pipeline("image-text-to-text", model=str(workspace / "ddp"))
    chat = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (8, 8))}, {"type": "text"}]}]
    chat[0]["content"][1]["text"] = "What color is the shape?"
    assert isinstance(pipe(text=chat, max_new_tokens=2, return_full_text=False)[0]["generated_text"], str)


def _fsdp(state_dict_type: str) -> list[str]:
    return _accelerate(
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_state_dict_type",
        state_dict_type,
        "--fsdp_reshard_after_forward",
        "true",
    )


def test_fsdp2_sharded_checkpoints_match_ddp_and_the_saved_model_gives_the_live_logits(workspace, ddp):
    env, out = _probe_env(workspace, "fsdp", SAISA_CPU_FSDP="1")
    _launch(_fsdp("SHARDED_STATE_DICT") + _worker(workspace, workspace / "fsdp"), env)
    probe = _load_probe(out)
    diff = _max_diff(_losses(probe), _losses(ddp))
    print(f"FSDP2 (sharded state dict) vs DDP, max loss difference: {diff:.3g}")
    assert diff <= LOSS_ATOL

    # Intermediate checkpoints are sharded (one DCP file per rank), and hold the same weights as DDP's at step 2.
    sharded = workspace / "fsdp" / "checkpoint-2" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(sharded, workspace / "fsdp_step2.pt")
    gathered = torch.load(workspace / "fsdp_step2.pt", weights_only=False)
    gathered = gathered.get("model", gathered)
    ddp_step2 = load_file(workspace / "ddp" / "checkpoint-2" / "model.safetensors")
    assert set(ddp_step2) <= set(gathered)
    assert max((gathered[k] - ddp_step2[k]).abs().max().item() for k in ddp_step2) <= 1e-5

    # The final model is saved whole (train_stage gathers it), with SAISA's code, not FSDP's class.
    final = workspace / "fsdp"
    assert json.loads((final / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"] == (
        "modeling_saisa.SaisaForConditionalGeneration"
    )
    assert not list(final.glob("_fsdp*.py"))
    torch.testing.assert_close(_reloaded_logits(final, workspace), probe["logits"], atol=0, rtol=0)


def test_fsdp2_full_state_dict_with_activation_checkpointing_matches_ddp(workspace, ddp):
    env, out = _probe_env(workspace, "fsdp_ac", SAISA_CPU_FSDP="1")
    _launch(_fsdp("FULL_STATE_DICT") + _worker(workspace, workspace / "fsdp_ac", "--activation-checkpointing"), env)
    probe = _load_probe(out)
    diff = _max_diff(_losses(probe), _losses(ddp))
    print(f"FSDP2 (full state dict, activation checkpointing) vs DDP, max loss difference: {diff:.3g}")
    assert diff <= LOSS_ATOL
    checkpoint = workspace / "fsdp_ac" / "checkpoint-2"
    for saved in (checkpoint, workspace / "fsdp_ac"):  # every save carries SAISA's code, never FSDP's class
        auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForImageTextToText"] == "modeling_saisa.SaisaForConditionalGeneration", saved
        assert not list(saved.glob("_fsdp*.py")), saved
    step2 = load_file(checkpoint / "model.safetensors")  # full: a plain checkpoint
    ddp_step2 = load_file(workspace / "ddp" / "checkpoint-2" / "model.safetensors")
    assert max((step2[k] - ddp_step2[k]).abs().max().item() for k in ddp_step2) <= 1e-5
    torch.testing.assert_close(_reloaded_logits(workspace / "fsdp_ac", workspace), probe["logits"], atol=0, rtol=0)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_ddp_and_the_saved_model_gives_the_live_logits(workspace, ddp, stage):
    pytest.importorskip("deepspeed", reason="DeepSpeed is the `deepspeed` extra: pip install modeling-saisa[deepspeed]")
    env, out = _probe_env(workspace, f"zero{stage}")
    extra = ("--deepspeed", config_path(f"zero{stage}.json"))
    _launch(_torchrun() + _worker(workspace, workspace / f"zero{stage}", *extra), env)
    probe = _load_probe(out)
    diff = _max_diff(_losses(probe), _losses(ddp))
    print(f"ZeRO-{stage} vs DDP, max loss difference: {diff:.3g}")
    assert diff <= LOSS_ATOL
    assert (workspace / f"zero{stage}" / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own checkpoint
    logits = _reloaded_logits(workspace / f"zero{stage}", workspace)
    torch.testing.assert_close(logits, probe["logits"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json"])
def test_shipped_deepspeed_configs_pass_deepspeeds_own_parser(name, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is the `deepspeed` extra: pip install modeling-saisa[deepspeed]")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=16, gradient_accumulation_steps=2)
    model = SaisaForConditionalGeneration(tiny_config())  # before the config: a ZeRO-3 config turns on zero.Init
    try:
        hf_config = HfTrainerDeepSpeedConfig(config_path(name))  # registers itself process-wide
        hf_config.trainer_config_process(args)  # fills the "auto" values the way Trainer does
        hf_config.trainer_config_finalize(args, model=model, num_training_steps=10)
        parsed = DeepSpeedConfig(hf_config.config)
    finally:
        unset_hf_deepspeed_config()
    assert parsed.zero_optimization_stage == int(name[4])
    assert parsed.train_micro_batch_size_per_gpu == 16 and parsed.gradient_accumulation_steps == 2


def test_tensor_parallel_logits_and_greedy_tokens_equal_one_process(workspace):
    model = SaisaForConditionalGeneration.from_pretrained(workspace / "model").eval()
    generation = torch.load(workspace / "generation.pt")
    with torch.no_grad():
        expected_logits = model(**generation).logits
        expected_tokens = model.generate(**generation, max_new_tokens=4, do_sample=False)
    out = workspace / "tp.pt"
    command = _torchrun() + [str(HERE / "tp_worker.py"), str(workspace / "model"), str(workspace / "generation.pt")]
    _launch(command + [str(out)], timeout=180)
    result = torch.load(out, weights_only=False)
    diff = (result["logits"] - expected_logits).abs().max().item()
    print(f"TP (2 ranks) vs one process, max logit difference: {diff:.3g}")
    torch.testing.assert_close(result["logits"], expected_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(result["tokens"], expected_tokens)
    # Each rank really held half of k_proj's rows (one of the two KV heads): the visual K/V built from that shard
    # landed in that rank's head, else the logits above would differ.
    assert result["k_proj_local_rows"] == model.model.language_model.layers[0].self_attn.k_proj.weight.shape[0] // 2
    # The plan must shard the per-layer projectors and the LM head too, not only the backbone's own layers.
    plan = result["plan"]
    assert any("multi_modal_projector" in key for key in plan), f"the TP plan leaves the projectors out: {plan}"
    assert any(key.endswith("lm_head") for key in plan), f"the TP plan leaves lm_head out: {plan}"
