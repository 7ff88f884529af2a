"""Every config shipped in `modeling_saisa/training/configs/` loads through the path a user gives it to.

- Training YAMLs (`stage*.yaml`): `saisa train --config FILE` parsing, into `TrainingArguments` + SAISA's options.
- accelerate YAMLs (`accelerate_*.yaml`): accelerate's own config-file loader (what `accelerate launch
  --config_file FILE` calls).
- `fsdp_config.json`: `TrainingArguments(fsdp=True, fsdp_config=FILE)` (Trainer's `--fsdp --fsdp-config FILE`).
- DeepSpeed JSONs (`zero*.json`): accelerate's `HfDeepSpeedConfig` (the parser Trainer's DeepSpeed config builds on;
  DeepSpeed itself is not installed here), plus a check that every `"auto"` sits at a key Trainer fills in.

Why: transformers 5 dropped `warmup_ratio` and the shipped YAMLs kept it for a release, unnoticed because no test
read them. A new file in the folder is picked up by the globs below and fails here until it has a loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling_saisa.cli import main
from modeling_saisa.cli.train import parse
from modeling_saisa.training import config_path

CONFIGS = Path(config_path())
TRAIN_YAMLS = sorted(CONFIGS.glob("stage*.yaml"))
ACCELERATE_YAMLS = sorted(CONFIGS.glob("accelerate_*.yaml"))
DEEPSPEED_JSONS = sorted(CONFIGS.glob("zero*.json"))
FSDP_JSONS = [CONFIGS / "fsdp_config.json"]

# The "auto" placeholders Trainer replaces (transformers.integrations.deepspeed.HfTrainerDeepSpeedConfig's
# trainer_config_process / trainer_config_finalize); an "auto" anywhere else reaches DeepSpeed unfilled.
DEEPSPEED_AUTO_KEYS = {
    "train_micro_batch_size_per_gpu",
    "train_batch_size",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "fp16.enabled",
    "bf16.enabled",
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
    "scheduler.params.warmup_min_lr",
    "scheduler.params.warmup_max_lr",
    "scheduler.params.warmup_num_steps",
    "scheduler.params.total_num_steps",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
}


def test_every_shipped_config_has_a_loader_here():
    covered = {*TRAIN_YAMLS, *ACCELERATE_YAMLS, *DEEPSPEED_JSONS, *FSDP_JSONS}
    shipped = {p for p in CONFIGS.iterdir() if p.suffix in (".yaml", ".yml", ".json")}
    assert shipped == covered, f"configs without a test: {sorted(p.name for p in shipped - covered)}"
    assert len(TRAIN_YAMLS) == 3 and len(ACCELERATE_YAMLS) == 3 and len(DEEPSPEED_JSONS) == 2


@pytest.mark.parametrize("path", TRAIN_YAMLS, ids=lambda p: p.name)
def test_training_yaml_parses_into_training_arguments(path):
    import yaml

    values = yaml.safe_load(path.read_text())
    training_args, opts = parse(["--config", str(path), "--model", "m", "--data", "d.json"])
    assert opts.stage == values["stage"] and opts.lora == values.get("lora", False)
    assert training_args.learning_rate == values["learning_rate"]
    assert training_args.warmup_steps == values["warmup_steps"] == 0.03  # 3 % of the steps, as LLaVA-1.5
    assert training_args.get_warmup_steps(1000) == 30
    assert training_args.lr_scheduler_type == "cosine"
    assert training_args.output_dir == values["output_dir"]


def test_removed_warmup_ratio_gets_a_one_line_replacement(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text("stage: 1\nwarmup_ratio: 0.03\n")
    with pytest.raises(ValueError, match="--warmup-ratio no longer exists.*--warmup-steps 0.03"):
        parse(["--config", str(config), "--model", "m", "--data", "d", "--output-dir", "o"])
    argv = ["train", "--stage", "1", "--model", "m", "--data", "d", "--output-dir", "o", "--warmup-ratio", "0.03"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("saisa train: error: --warmup-ratio no longer exists") and err.count("\n") == 1


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_accelerate_yaml_loads_with_accelerates_loader(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    expected = {"accelerate_cpu.yaml": "NO", "accelerate_ddp.yaml": "MULTI_GPU", "accelerate_fsdp.yaml": "FSDP"}
    assert config.distributed_type.value == expected[path.name]
    if config.distributed_type.value == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2


@pytest.mark.parametrize("path", FSDP_JSONS, ids=lambda p: p.name)
def test_fsdp_json_loads_into_training_arguments(path):
    from transformers import TrainingArguments

    args = TrainingArguments("out", fsdp=True, fsdp_config=str(path), use_cpu=True, report_to="none")
    assert args.fsdp_config["version"] == 2
    assert args.fsdp_config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_leaves(value, name + "."))
        else:
            out[name] = value
    return out


@pytest.mark.parametrize("path", DEEPSPEED_JSONS, ids=lambda p: p.name)
def test_deepspeed_json_parses_and_autos_are_filled_by_trainer(path):
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    config = HfDeepSpeedConfig(str(path))
    stage = int(path.stem.removeprefix("zero"))
    assert config.get_value("zero_optimization.stage") == stage
    assert config.is_zero3() == (stage == 3)
    autos = {key for key, value in _leaves(json.loads(path.read_text())).items() if value == "auto"}
    assert autos <= DEEPSPEED_AUTO_KEYS, f"'auto' where Trainer fills nothing: {sorted(autos - DEEPSPEED_AUTO_KEYS)}"
    if stage == 3:  # the final save must gather whole weights, or Trainer writes empty shards
        assert config.get_value("zero_optimization.stage3_gather_16bit_weights_on_model_save") is True
