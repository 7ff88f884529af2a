"""What the multi-process tests launch (under `accelerate launch` / `torchrun`): `saisa train`, plus two probes.

    python distributed_worker.py [saisa train flags]

The run is exactly the `saisa train` command (`modeling_saisa.cli.train.parse` + `train_stage`); the worker only adds
a callback that, at the end of training, writes Trainer's log history (the loss curve) and the *live* model's logits
on a fixed batch (`SAISA_PROBE_BATCH`, a `torch.save`d dict of model inputs) to `SAISA_PROBE_OUT` (rank 0). Under
FSDP every rank runs that forward: it is a collective, and it is what the saved checkpoint must reproduce in one
process.

`SAISA_CPU_FSDP=1`: accelerate maps several CPU processes to `MULTI_CPU` and never to FSDP (its `AcceleratorState`
only turns FSDP on for GPU-like device types), so on CPU the worker flips the state to FSDP once accelerate has
built it, with accelerate's own plugin. Everything after that (wrapping, sharded forward/backward, state-dict saving
and loading) is accelerate's and torch's FSDP code, unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
from transformers import TrainerCallback


class EndOfTrainingProbe(TrainerCallback):
    """Record the loss curve and the live model's logits when training ends (every rank runs the forward)."""

    def __init__(self, batch_path: str | None, out_path: str) -> None:
        self.batch_path = batch_path
        self.out_path = out_path

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        logits = None
        if self.batch_path:
            batch = torch.load(self.batch_path)
            was_training = model.training
            model.eval()
            with torch.no_grad():
                logits = model(**batch).logits
            model.train(was_training)
        if state.is_world_process_zero:
            torch.save({"log_history": state.log_history, "logits": logits}, self.out_path)


def _force_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP plugin run on CPU processes (gloo): see the module docstring."""
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    original_init = accelerate_state.AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Every later `AcceleratorState()` copies PartialState's fields over its own: flip both.
            accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate_state.AcceleratorState.__init__ = init


def main(argv: list[str]) -> int:
    import logging

    from modeling_saisa.cli.train import parse
    from modeling_saisa.training.recipes import train_stage

    if os.environ.get("SAISA_CPU_FSDP") == "1":
        _force_fsdp_on_cpu()
    training_args, opts = parse(argv)
    if training_args.deepspeed and training_args.use_cpu:
        # On GPUs TrainingArguments starts DeepSpeed's communication backend; with use_cpu it only starts torch's
        # (gloo), and ZeRO-3's zero.Init, which runs inside from_pretrained, would see a world of one process.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    logging.basicConfig(level=logging.WARNING)
    probe = EndOfTrainingProbe(os.environ.get("SAISA_PROBE_BATCH"), os.environ["SAISA_PROBE_OUT"])
    metrics = train_stage(
        stage=opts.stage,
        model_dir=opts.model,
        data=opts.data,
        training_args=training_args,
        image_folder=opts.image_folder,
        callbacks=[probe],
        resume_from_checkpoint=training_args.resume_from_checkpoint,
    )
    if training_args.process_index == 0:
        print(json.dumps({"world_size": training_args.world_size, "train_loss": metrics.get("train_loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
