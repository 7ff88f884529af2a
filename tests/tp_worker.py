"""What the tensor-parallel test launches under `torchrun --nproc-per-node 2`: load with `tp_plan="auto"`, run.

    python tp_worker.py MODEL_DIR BATCH_PT OUT_PT

Loads the checkpoint with transformers' tensor parallelism (the model's own `tp_plan`), computes the logits of the
batch and greedy-decodes a few tokens on every rank (both are collectives), and rank 0 writes
`{"logits", "tokens", "plan", "k_proj_local_rows"}` to OUT_PT for the test to compare with one unsharded process.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from modeling_saisa import SaisaForConditionalGeneration


def main(model_dir: str, batch_path: str, out_path: str) -> int:
    model = SaisaForConditionalGeneration.from_pretrained(model_dir, tp_plan="auto").eval()
    batch = torch.load(batch_path)
    with torch.no_grad():
        logits = model(**batch).logits
        tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
    if dist.get_rank() == 0:
        plan = dict(getattr(model, "tp_plan", None) or getattr(model, "_tp_plan", None) or {})
        k_proj = model.model.language_model.layers[0].self_attn.k_proj.weight
        local = k_proj.to_local() if hasattr(k_proj, "to_local") else k_proj  # a DTensor when the plan shards it
        result = {"logits": logits.cpu(), "tokens": tokens.cpu(), "plan": plan, "k_proj_local_rows": local.shape[0]}
        torch.save(result, out_path)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
