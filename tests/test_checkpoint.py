"""Checkpoints: Auto classes, save_pretrained -> from_pretrained, and trust_remote_code in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from tiny import make_batch, tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from modeling_saisa import SaisaConfig, SaisaForConditionalGeneration, SaisaModel


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_auto_classes_resolve_saisa(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SaisaConfig)
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is SaisaForConditionalGeneration
    assert type(AutoModel.from_config(model.config)) is SaisaModel


def test_save_and_load_give_identical_logits(tmp_path):
    model = tiny_model()
    ids, mask, px = make_batch([[3, "img", 2], [1, "img", "img", 4]], "left")
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=px)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    keys = json.loads((tmp_path / "config.json").read_text())
    assert keys["model_type"] == "saisa" and keys["auto_map"]["AutoConfig"] == "configuration_saisa.SaisaConfig"
    loaded = SaisaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(_logits(model, batch), _logits(loaded, batch))


def test_checkpoint_keys_follow_the_llava_layout():
    keys = set(tiny_model().state_dict())
    assert "lm_head.weight" in keys
    assert "model.language_model.layers.1.self_attn.q_proj.weight" in keys
    assert "model.multi_modal_projector.1.linear_2.bias" in keys
    assert any(k.startswith("model.vision_tower.") for k in keys)
    assert not any(k.startswith(("model.layers", "vision_tower", "multi_modal_projector")) for k in keys)


def test_trust_remote_code_in_a_fresh_process(tmp_path):
    model = tiny_model()
    ids, mask, px = make_batch([[3, "img", 2]], "left")
    model.save_pretrained(tmp_path / "ckpt")
    torch.save(
        {
            "ids": ids,
            "mask": mask,
            "px": px,
            "logits": _logits(model, dict(input_ids=ids, attention_mask=mask, pixel_values=px)),
        },
        tmp_path / "ref.pt",
    )
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForImageTextToText
        model = AutoModelForImageTextToText.from_pretrained(
            {str(tmp_path / "ckpt")!r}, trust_remote_code=True, attn_implementation="eager"
        ).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=ref["ids"], attention_mask=ref["mask"], pixel_values=ref["px"]).logits
        # another process may run other GEMM kernels / thread counts: equal up to float rounding
        torch.testing.assert_close(logits, ref["logits"], atol=1e-6, rtol=0)
        print("remote-ok")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-ok" in result.stdout
