"""Checkpoint conversion: original SAISA -> ours (exact), llava-hf -> ours, composing from parts, and every error path.

The reference for exactness is written here in plain torch from the ORIGINAL tensors (spec §2 "oracle"): per decoder
layer l, overwrite the hidden states at the visual positions with P_l(f), then run an ordinary Llama layer on the
whole sequence. It shares no code with the converter or the model (the CLIP features come from transformers'
CLIPVisionModel loaded with the original vision tensors, renamed by this file).

Run the peak-memory measurement on a larger synthetic checkpoint with:
    python tests/test_convert.py --rss-mb 600
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 32, 37, 2, 4, 2
VISION = dict(
    hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, image_size=8, patch_size=2
)
N_V = (8 // 2) ** 2  # patches; CLS dropped ("patch" -> "default")
WORDS = (
    "A chat between a curious user and an artificial intelligence assistant . The gives helpful , detailed polite "
    "answers to the ' s questions USER : ASSISTANT What is in this image ? Describe it colour cat dog"
).split()
QUESTIONS = ["What is in this image ?", "Describe it"]
TOL = 1e-5


# ------------------------------------------------------------------------------------------------ builders


def _word_backend(tokens: list[str], special: list[str]) -> Tokenizer:
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return backend


def save_tokenizer(directory: Path, kind: str) -> int:
    """An original-style tokenizer WITHOUT `<image>`; returns its length.

    vicuna: `<unk>`=0, `<s>`=1, `</s>`=2, words; pad = `<unk>` (as LLaVA trains it).
    llama_3: words, then `<|begin_of_text|>`, `<|end_of_text|>`, then an added `<pad>` (saisa-llama3's extra token).
    """
    from transformers import TokenizersBackend

    if kind == "vicuna":
        tokens = ["<unk>", "<s>", "</s>", *WORDS]
        backend = _word_backend(tokens, ["<unk>", "<s>", "</s>"])
        tok = TokenizersBackend(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
        )
    else:
        tokens = ["!", *WORDS, "<|begin_of_text|>", "<|end_of_text|>", "<pad>"]
        backend = _word_backend(tokens, ["<|begin_of_text|>", "<|end_of_text|>", "<pad>"])
        tok = TokenizersBackend(
            tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<pad>"
        )
    tok.add_bos_token = True
    tok.save_pretrained(directory)
    assert "<image>" not in tok.get_vocab()
    return len(tok)


def clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**VISION)


def save_clip(directory: Path, *, full: bool, seed: int, weights: bool = True) -> dict[str, torch.Tensor]:
    """A tiny CLIP saved like the hub's: a full CLIPModel (`vision_model.*` + text half) or a CLIPVisionModel.
    Returns the vision weights in the in-memory naming (no `vision_model.` prefix)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    torch.manual_seed(seed)
    if full:
        config = CLIPConfig(
            vision_config=VISION,
            text_config=dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2),
            projection_dim=8,
        )
        model = CLIPModel(config)
        vision = {k.removeprefix("vision_model."): v for k, v in model.state_dict().items() if k.startswith("vision")}
    else:
        model = CLIPVisionModel(clip_vision_config())
        vision = dict(model.state_dict())
    if weights:
        model.save_pretrained(directory)
    else:
        model.config.save_pretrained(directory)
    return {k: v.clone() for k, v in vision.items()}


def original_config(vocab: int, *, kind: str, mm_vision_tower: str | None) -> dict:
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0 if kind == "vicuna" else 500000.0,
        "rope_scaling": None,
        "max_position_embeddings": 256,
        "vocab_size": vocab,
        "bos_token_id": 1 if kind == "vicuna" else vocab - 3,
        "eos_token_id": 2 if kind == "vicuna" else vocab - 2,
        "pad_token_id": 0 if kind == "vicuna" else vocab - 1,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tune_mm_mlp_adapter": False,
    }
    if mm_vision_tower is not None:
        config["mm_vision_tower"] = mm_vision_tower
    return config


def original_tensors(vocab: int, seed: int, vision: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Random weights in the original key layout (spec §4). Scales keep the logits well away from uniform."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    head_dim = HIDDEN // HEADS
    t = {"model.embed_tokens.weight": rnd(vocab, HIDDEN, std=1.0), "model.norm.weight": 1 + rnd(HIDDEN, std=0.1)}
    t["lm_head.weight"] = rnd(vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rnd(HEADS * head_dim, HIDDEN)
        t[p + "self_attn.k_proj.weight"] = rnd(KV_HEADS * head_dim, HIDDEN)
        t[p + "self_attn.v_proj.weight"] = rnd(KV_HEADS * head_dim, HIDDEN)
        t[p + "self_attn.o_proj.weight"] = rnd(HIDDEN, HEADS * head_dim)
        t[p + "mlp.gate_proj.weight"] = rnd(INTER, HIDDEN)
        t[p + "mlp.up_proj.weight"] = rnd(INTER, HIDDEN)
        t[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTER)
        t[p + "input_layernorm.weight"] = 1 + rnd(HIDDEN, std=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rnd(HIDDEN, std=0.1)
        t[p + "mm_projector.0.weight"] = rnd(HIDDEN, VISION["hidden_size"], std=0.5)
        t[p + "mm_projector.0.bias"] = rnd(HIDDEN)
        t[p + "mm_projector.2.weight"] = rnd(HIDDEN, HIDDEN, std=0.5)
        t[p + "mm_projector.2.bias"] = rnd(HIDDEN)
    t["model.mm_projector.0.weight"] = rnd(HIDDEN, VISION["hidden_size"])
    t["model.mm_projector.0.bias"] = rnd(HIDDEN)
    t["model.mm_projector.2.weight"] = rnd(HIDDEN, HIDDEN)
    t["model.mm_projector.2.bias"] = rnd(HIDDEN)
    if vision is not None:
        # transformers 4.x CLIPVisionModel keys (with `vision_model.`), as LLaVA saved an unfrozen tower.
        for k, v in vision.items():
            t["model.vision_tower.vision_tower.vision_model." + k] = v
        t["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(N_V + 1)[None]
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(head_dim // 2)  # an old persistent buffer
    return t


def save_weights(directory: Path, tensors: dict[str, torch.Tensor], *, shards: int, fmt: str = "safetensors") -> None:
    keys = list(tensors)
    if shards == 1:
        if fmt == "safetensors":
            save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        else:
            torch.save(tensors, directory / "pytorch_model.bin")
        return
    weight_map = {}
    per = math.ceil(len(keys) / shards)
    for s in range(shards):
        part = {k: tensors[k].contiguous() for k in keys[s * per : (s + 1) * per]}
        if fmt == "safetensors":
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, directory / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_original(
    root: Path,
    name: str,
    *,
    kind: str = "vicuna",
    vision_keys: bool = True,
    shards: int = 1,
    fmt: str = "safetensors",
    mm_vision_tower: str | None = "config-only",
    seed: int = 0,
    tamper=None,
) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """An original SAISA checkpoint directory. `mm_vision_tower="config-only"`: a local dir with just a CLIP config
    (so vision weights can only come from SRC)."""
    src = root / name
    src.mkdir()
    vocab = save_tokenizer(src, kind)
    vision = None
    if vision_keys:
        vision = save_clip(root / f"{name}-clipcfg", full=False, seed=seed + 1, weights=False)
    if mm_vision_tower == "config-only":
        mm_vision_tower = str(root / f"{name}-clipcfg") if vision_keys else None
    config = original_config(vocab, kind=kind, mm_vision_tower=mm_vision_tower)
    tensors = original_tensors(vocab, seed, vision)
    if tamper is not None:
        tamper(tensors, config)
    (src / "config.json").write_text(json.dumps(config))
    save_weights(src, tensors, shards=shards, fmt=fmt)
    return src, tensors, config


# ------------------------------------------------------------------------------------------------ the oracle


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def _llama_layer(h, t, i, config):
    p, eps, theta = f"model.layers.{i}.", config["rms_norm_eps"], config["rope_theta"]
    n, d = h.shape[0], HIDDEN // HEADS
    x = _rms(h, t[p + "input_layernorm.weight"], eps)
    q = (x @ t[p + "self_attn.q_proj.weight"].T).view(n, HEADS, d)
    k = (x @ t[p + "self_attn.k_proj.weight"].T).view(n, KV_HEADS, d)
    v = (x @ t[p + "self_attn.v_proj.weight"].T).view(n, KV_HEADS, d)
    pos = torch.arange(n)
    q, k = _rope(q, pos, theta), _rope(k, pos, theta)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, HIDDEN)
    h = h + attn @ t[p + "self_attn.o_proj.weight"].T
    x = _rms(h, t[p + "post_attention_layernorm.weight"], eps)
    mlp = F.silu(x @ t[p + "mlp.gate_proj.weight"].T) * (x @ t[p + "mlp.up_proj.weight"].T)
    return h + mlp @ t[p + "mlp.down_proj.weight"].T


def original_features(pixel_values, vision_weights):
    """f: CLIP hidden state at layer -2, CLS dropped, from the original vision tensors."""
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel(clip_vision_config()).eval()
    clip.load_state_dict(vision_weights, strict=False)
    missing = set(clip.state_dict()) - set(vision_weights)
    assert missing <= {"embeddings.position_ids"}, missing
    with torch.no_grad():
        return clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]


def oracle_logits(t, config, ids, visual, features):
    """One row: `ids` [L], `visual` [L] bool (one image span), `features` [N_V, d_vision]."""
    with torch.no_grad():
        h = t["model.embed_tokens.weight"][ids.clamp(max=t["model.embed_tokens.weight"].shape[0] - 1)].clone()
        for i in range(LAYERS):
            p = f"model.layers.{i}.mm_projector."
            e = F.gelu(features @ t[p + "0.weight"].T + t[p + "0.bias"]) @ t[p + "2.weight"].T + t[p + "2.bias"]
            h[visual] = e
            h = _llama_layer(h, t, i, config)
        return _rms(h, t["model.norm.weight"], config["rms_norm_eps"]) @ t["lm_head.weight"].T


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(10, 6), (7, 12), (8, 8)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


def assert_matches_original(out: Path, tensors: dict, config: dict, vision_weights: dict, *, template: str):
    """Converted model at every text position == the oracle on the original tensors; the added logit is the mean."""
    from transformers import AutoProcessor

    import modeling_saisa  # noqa: F401 - registers the Auto classes
    from modeling_saisa import SaisaForConditionalGeneration

    model, info = SaisaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()
    processor = AutoProcessor.from_pretrained(out)
    old_vocab = tensors["model.embed_tokens.weight"].shape[0]
    assert processor.image_token_id == model.config.image_token_id == old_vocab  # `<image>` appended
    assert model.config.text_config.vocab_size == old_vocab + 1
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    images = _images(2)
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    features = original_features(batch["pixel_values"], vision_weights)
    image_id = model.config.image_token_id
    n_checked = 0
    for row in range(len(prompts)):
        keep = batch["attention_mask"][row].bool()
        ids = batch["input_ids"][row][keep]
        visual = ids == image_id
        assert int(visual.sum()) == N_V
        ref = oracle_logits(tensors, config, ids, visual, features[row])
        got = logits[row][keep]
        text = ~visual
        torch.testing.assert_close(got[text, :old_vocab], ref[text], atol=TOL, rtol=1e-4)
        # the new lm_head row is the mean of the old ones, so its logit is the mean logit
        torch.testing.assert_close(got[text, old_vocab], got[text, :old_vocab].mean(-1), atol=TOL, rtol=1e-4)
        n_checked += int(text.sum())
    assert n_checked > 2 * 20
    assert "USER" in processor.chat_template and (template != "llama_3" or "<|end_of_text|>" in processor.chat_template)
    return model, processor


def written_keys(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        if file.name != "shared_projector.safetensors":
            tensors.update(load_file(file))
    return tensors


def no_leftovers(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]


# ------------------------------------------------------------------------------------------------ tests


@pytest.fixture(autouse=True)
def _offline_empty_cache(tmp_path_factory, monkeypatch):
    """Never reach the hub, and never find a real model in a local cache."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub-cache")))


def test_single_file_with_vision_keys_vicuna(tmp_path, caplog):
    from modeling_saisa.convert import convert_original_checkpoint

    src, tensors, config = make_original(tmp_path, "orig", kind="vicuna", vision_keys=True, shards=1)
    vision = {k.removeprefix("model.vision_tower.vision_tower.vision_model."): v for k, v in tensors.items()}
    vision = {k: v for k, v in vision.items() if not k.startswith("model.") and k != "lm_head.weight"}
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="modeling_saisa"):
        assert convert_original_checkpoint(src, out) == out
    assert "--keep-shared-projector" in caplog.text and "model.mm_projector" in caplog.text
    assert "mean of the old rows" in caplog.text
    model, processor = assert_matches_original(out, tensors, config, vision, template="vicuna_v1")

    cfg = model.config
    assert (cfg.image_seq_length, cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (N_V, -2, "default")
    assert not cfg.shared_projector and len(model.model.multi_modal_projector) == LAYERS
    assert processor.image_processor.do_pad_to_square and processor.image_seq_length == N_V
    assert json.loads((out / "config.json").read_text())["model_type"] == "saisa"
    written = written_keys(out)
    assert not [k for k in written if "mm_projector" in k] and not (out / "shared_projector.safetensors").exists()
    # the contract's names, and the vision tower taken from SRC (the mm_vision_tower dir holds only a config)
    assert "model.multi_modal_projector.1.linear_2.bias" in written
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in written
    key = "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(written[key], vision["encoder.layers.0.mlp.fc1.weight"])
    # the new embedding row is the mean of the old rows
    embed = written["model.language_model.embed_tokens.weight"]
    torch.testing.assert_close(embed[-1], tensors["model.embed_tokens.weight"].mean(0))
    # load -> save_pretrained writes the same names: OUT is a fixed point of transformers' own I/O
    resaved = tmp_path / "resaved"
    model.save_pretrained(resaved)
    assert set(written_keys(resaved)) == set(written)
    assert no_leftovers(tmp_path)


def test_sharded_llama3_without_vision_keys(tmp_path):
    from modeling_saisa.compose import init_projectors_from_shared
    from modeling_saisa.convert import convert_original_checkpoint

    clip_dir = tmp_path / "clip"
    vision = save_clip(clip_dir, full=True, seed=5)
    src, tensors, config = make_original(
        tmp_path, "orig", kind="llama_3", vision_keys=False, shards=3, mm_vision_tower="openai/clip-vit-large-patch14"
    )
    assert not [k for k in tensors if "vision_tower" in k]
    out = tmp_path / "out"
    convert_original_checkpoint(
        str(src),
        str(out),
        vision_tower=str(clip_dir),
        chat_template="llama_3",
        keep_shared_projector=True,
        max_shard_size=30_000,
    )
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 2
    model, processor = assert_matches_original(out, tensors, config, vision, template="llama_3")
    tok = processor.tokenizer
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|end_of_text|>"
    assert tok.convert_tokens_to_ids("<image>") == tensors["model.embed_tokens.weight"].shape[0]
    assert model.config.text_config.rope_parameters["rope_theta"] == 500000.0
    # the kept stage-1 projector, as the state dict of one projector, initialises every per-layer projector
    shared = load_file(out / "shared_projector.safetensors")
    assert torch.equal(shared["linear_1.weight"], tensors["model.mm_projector.0.weight"])
    assert torch.equal(shared["linear_2.bias"], tensors["model.mm_projector.2.bias"])
    init_projectors_from_shared(model, out)
    for projector in model.model.multi_modal_projector:
        assert torch.equal(projector.linear_2.weight, tensors["model.mm_projector.2.weight"])


def test_pickle_needs_allow_pickle(tmp_path):
    from modeling_saisa.convert import convert_original_checkpoint

    clip_dir = tmp_path / "clip"
    vision = save_clip(clip_dir, full=False, seed=3)
    src, tensors, _ = make_original(tmp_path, "orig", vision_keys=False, shards=2, fmt="bin", mm_vision_tower=None)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--allow-pickle") as err:
        convert_original_checkpoint(src, out, vision_tower=clip_dir)
    assert "arbitrary code" in str(err.value)
    assert not out.exists() and no_leftovers(tmp_path)
    convert_original_checkpoint(src, out, vision_tower=clip_dir, allow_pickle=True, dtype="bfloat16")
    written = written_keys(out)
    assert all(v.dtype == torch.bfloat16 for v in written.values() if v.is_floating_point())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for key in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        new = "model.language_model." + key.removeprefix("model.")
        assert torch.equal(written[new], tensors[key].to(torch.bfloat16))
    assert torch.equal(
        written["model.multi_modal_projector.0.linear_1.weight"],
        tensors["model.layers.0.mm_projector.0.weight"].to(torch.bfloat16),
    )
    key = "model.vision_tower.vision_model.post_layernorm.weight"
    assert torch.equal(written[key], vision["post_layernorm.weight"].to(torch.bfloat16))


def test_vision_tower_from_mm_vision_tower_path(tmp_path):
    from modeling_saisa.convert import convert_original_checkpoint

    clip_dir = tmp_path / "clip"
    vision = save_clip(clip_dir, full=False, seed=7)
    src, _, _ = make_original(tmp_path, "orig", vision_keys=False, mm_vision_tower=str(clip_dir))
    convert_original_checkpoint(src, tmp_path / "out")
    written = written_keys(tmp_path / "out")
    for k, v in vision.items():
        if k != "embeddings.position_ids":
            assert torch.equal(written["model.vision_tower.vision_model." + k], v), k


@pytest.mark.parametrize(
    "mm_vision_tower",
    ["openai/clip-vit-large-patch14-336", None],
)
def test_no_vision_tower_anywhere_names_the_option(tmp_path, mm_vision_tower):
    from modeling_saisa.convert import convert_original_checkpoint

    src, _, _ = make_original(tmp_path, "orig", vision_keys=False, mm_vision_tower=mm_vision_tower)
    with pytest.raises(FileNotFoundError, match="--vision-tower"):
        convert_original_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_src_vision_weights_win_over_vision_tower(tmp_path):
    """SRC's own tower weights are used; --vision-tower then only supplies the tower's config (and is required for it
    when the config names no mm_vision_tower)."""
    from modeling_saisa.convert import convert_original_checkpoint

    src, tensors, _ = make_original(tmp_path, "orig", vision_keys=True, mm_vision_tower=None)
    with pytest.raises(FileNotFoundError, match="--vision-tower"):
        convert_original_checkpoint(src, tmp_path / "out")
    other = save_clip(tmp_path / "other-clip", full=False, seed=99)
    convert_original_checkpoint(src, tmp_path / "out", vision_tower=tmp_path / "other-clip")
    written = written_keys(tmp_path / "out")
    key = "encoder.layers.1.self_attn.q_proj.weight"
    mine = tensors["model.vision_tower.vision_tower.vision_model." + key]
    assert torch.equal(written["model.vision_tower.vision_model." + key], mine)
    assert not torch.equal(mine, other[key])


def test_known_tower_config_when_weights_are_in_src(tmp_path):
    """SRC carries the tower, its mm_vision_tower is a hub id that is unreachable: the built-in config is used."""
    from modeling_saisa.convert import KNOWN_VISION_TOWERS, convert_original_checkpoint

    src, _, _ = make_original(tmp_path, "orig", vision_keys=True, mm_vision_tower="openai/clip-vit-large-patch14-336")
    # the tiny tower is not ViT-L: the plan check must refuse it, naming the mismatching tensors
    with pytest.raises(ValueError, match="shape mismatches|projectors take"):
        convert_original_checkpoint(src, tmp_path / "out")
    assert KNOWN_VISION_TOWERS["openai/clip-vit-large-patch14-336"]["image_size"] == 336


def _drop_key(tensors, config):
    del tensors["model.layers.1.self_attn.k_proj.weight"]


def _add_key(tensors, config):
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)


def _bad_shape(tensors, config):
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(INTER + 1, HIDDEN)


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (_drop_key, r"missing from the source \(1\): \['model\.layers\.1\.self_attn\.k_proj\.weight'\]"),
        (_add_key, r"unexpected.*model\.layers\.0\.self_attn\.extra\.weight"),
        (_bad_shape, r"shape mismatches.*up_proj"),
        (lambda t, c: c.update(model_type="llava"), "--from-llava"),
        (lambda t, c: c.update(mm_projector_type="linear"), "mm_projector_type"),
        (lambda t, c: c.update(mm_use_im_start_end=True), "mm_use_im_start_end"),
    ],
)
def test_inconsistent_source_is_refused(tmp_path, tamper, match):
    from modeling_saisa.convert import convert_original_checkpoint

    src, _, _ = make_original(tmp_path, "orig", vision_keys=True, tamper=tamper)
    with pytest.raises(ValueError, match=match):
        convert_original_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def _cli_error(argv: list[str], capsys) -> str:
    from modeling_saisa.cli import main

    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("saisa convert: error: "), lines
    return lines[0]


def test_cli_reports_a_missing_key_by_its_source_name_before_any_progress_log(tmp_path, capsys, caplog):
    src, _, _ = make_original(tmp_path, "orig", vision_keys=True, tamper=_drop_key)
    with caplog.at_level("INFO", logger="modeling_saisa"):
        err = _cli_error(["convert", str(src), str(tmp_path / "out")], capsys)
    assert "nothing was written" in err and "['model.layers.1.self_attn.k_proj.weight']" in err
    assert "language_model" not in err
    assert "Growing embed_tokens" not in caplog.text and "Vision tower weights" not in caplog.text
    _, _, config = make_original(tmp_path, "ok", vision_keys=True)  # the same logs do come once the plan is whole
    with caplog.at_level("INFO", logger="modeling_saisa"):
        from modeling_saisa.cli import main

        assert main(["convert", str(tmp_path / "ok"), str(tmp_path / "out")]) == 0
    assert "Growing embed_tokens" in caplog.text and "Vision tower weights: from SRC" in caplog.text


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{not json", "the safetensors header is not valid JSON"),
        (json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode(), "tensor 'w' in the safetensors header lacks"),
        (json.dumps({"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}).encode(), "expected lists of"),
    ],
)
def test_cli_damaged_safetensors_header_names_the_file(tmp_path, capsys, header, message):
    import struct

    src, _, _ = make_original(tmp_path, "orig", vision_keys=True)
    weights = src / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    err = _cli_error(["convert", str(src), str(tmp_path / "out")], capsys)
    assert f"{weights}: " in err and message in err


def test_converted_directory_has_the_shape_of_a_saved_one(tmp_path):
    """Same files, same auto_map and architectures as save_pretrained; loads with trust_remote_code alone."""
    import subprocess
    import sys

    from transformers import AutoProcessor

    from modeling_saisa import SaisaForConditionalGeneration
    from modeling_saisa.cli import main

    src, _, _ = make_original(tmp_path, "orig", vision_keys=True)
    out, saved = tmp_path / "out", tmp_path / "saved"
    assert main(["convert", str(src), str(out)]) == 0
    SaisaForConditionalGeneration.from_pretrained(out).save_pretrained(saved)
    AutoProcessor.from_pretrained(out).save_pretrained(saved)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in saved.iterdir())
    converted, resaved = (json.loads((d / "config.json").read_text()) for d in (out, saved))
    assert converted["auto_map"] == resaved["auto_map"] and len(converted["auto_map"]) == 2
    assert converted["architectures"] == resaved["architectures"] == ["SaisaForConditionalGeneration"]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(tokenizer_config)
    code = (
        "import sys; from transformers import AutoModelForImageTextToText as A; "
        "m = A.from_pretrained(sys.argv[1], trust_remote_code=True); "
        "print(type(m).__name__)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "SaisaForConditionalGeneration"


def test_source_resolution_errors(tmp_path):
    from modeling_saisa.convert import convert_original_checkpoint

    with pytest.raises(FileNotFoundError, match="not a local directory.*offline"):
        convert_original_checkpoint("yuanqianhao/saisa-vicuna", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        convert_original_checkpoint(str(tmp_path / "nowhere"), tmp_path / "out")
    src, _, _ = make_original(tmp_path, "orig")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        convert_original_checkpoint(src, tmp_path / "taken")
    with pytest.raises(ValueError, match="dtype"):
        convert_original_checkpoint(src, tmp_path / "out", dtype="float8")
    (tmp_path / "empty").mkdir()  # an empty OUT directory is fine
    convert_original_checkpoint(src, tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    from modeling_saisa import checkpoint_io
    from modeling_saisa.convert import convert_original_checkpoint

    src, _, _ = make_original(tmp_path, "orig", shards=2)
    real = checkpoint_io.CheckpointReader.read
    calls = []

    def flaky(self, name, rows=None):
        calls.append(name)
        if len(calls) == 10:
            raise OSError("disk on fire")
        return real(self, name, rows)

    monkeypatch.setattr(checkpoint_io.CheckpointReader, "read", flaky)
    with pytest.raises(OSError, match="disk on fire"):
        convert_original_checkpoint(src, tmp_path / "out", max_shard_size=20_000)
    assert len(calls) == 10
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path)


def test_cli_conversion_answers_through_pipeline(tmp_path, capsys):
    from transformers import pipeline

    import modeling_saisa  # noqa: F401
    from modeling_saisa.cli import main

    clip_dir = tmp_path / "clip"
    save_clip(clip_dir, full=False, seed=2)
    src, _, _ = make_original(tmp_path, "orig", vision_keys=False, mm_vision_tower=None)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--vision-tower", str(clip_dir)]) == 0
    assert str(out) in capsys.readouterr().out
    assert main(["convert", str(src), str(out), "--vision-tower", str(clip_dir)]) == 2  # OUT exists
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(src), str(tmp_path / "o2"), "--from-llava"]) == 2
    assert "'llava'" in capsys.readouterr().err and not (tmp_path / "o2").exists()

    pipe = pipeline("image-text-to-text", model=str(out))
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _images(1)[0]}, {"type": "text", "text": "Describe it"}],
        }
    ]
    image_id = pipe.model.config.image_token_id
    result = pipe(text=messages, max_new_tokens=4, generate_kwargs={"do_sample": False, "suppress_tokens": [image_id]})
    answer = result[0]["generated_text"]
    assert isinstance(answer, list) and answer[-1]["role"] == "assistant" and isinstance(answer[-1]["content"], str)


# ------------------------------------------------------------------------------------------------ llava-hf


def tiny_llava(directory: Path, *, hub_layout: bool):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from modeling_saisa.tokenizers import build_word_tokenizer

    config = LlavaConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=99,
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            pad_token_id=0,
        ),
        vision_config=dict(model_type="clip_vision_model", **VISION),
        image_token_id=98,
        image_seq_length=N_V,
    )
    torch.manual_seed(11)
    llava = LlavaForConditionalGeneration(config).eval()
    llava.save_pretrained(directory)
    build_word_tokenizer(WORDS, vocab_size=99).save_pretrained(directory)
    if hub_layout:  # llava-hf on the hub: `vision_tower.vision_model.*`, `language_model.model.*`
        state = load_file(directory / "model.safetensors")
        renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in state.items()}
        save_file(renamed, directory / "model.safetensors", metadata={"format": "pt"})
    return llava


@pytest.mark.parametrize("hub_layout", [False, True])
def test_from_llava(tmp_path, hub_layout):
    from modeling_saisa import SaisaForConditionalGeneration
    from modeling_saisa.convert import convert_from_llava

    llava = tiny_llava(tmp_path / "llava", hub_layout=hub_layout)
    out = tmp_path / "out"
    convert_from_llava(tmp_path / "llava", out)
    model, info = SaisaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ours, theirs = model.state_dict(), llava.state_dict()
    assert len(model.model.multi_modal_projector) == LAYERS
    for layer in range(LAYERS):
        for part in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"):
            assert torch.equal(
                ours[f"model.multi_modal_projector.{layer}.{part}"], theirs[f"model.multi_modal_projector.{part}"]
            )
    shared = {k for k in theirs if k.startswith("model.multi_modal_projector.")}
    for k in set(theirs) - shared:
        assert torch.equal(ours[k], theirs[k]), k
    assert set(ours) - set(theirs) == {
        f"model.multi_modal_projector.{i}.{p}"
        for i in range(LAYERS)
        for p in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
    }
    assert model.config.image_token_id == 98 and model.config.text_config.vocab_size == 99


def test_from_llava_cli_shared_projector(tmp_path):
    from modeling_saisa.cli import main

    tiny_llava(tmp_path / "llava", hub_layout=False)
    out = tmp_path / "out"
    assert main(["convert", "--from-llava", "--keep-shared-projector", str(tmp_path / "llava"), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["shared_projector"] is True
    assert {k for k in written_keys(out) if "projector" in k} == {
        f"model.multi_modal_projector.0.{p}"
        for p in ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")
    }


# ------------------------------------------------------------------------------------------------ compose


@pytest.mark.parametrize("tied", [False, True])
def test_compose_from_pretrained(tmp_path, tied, capfd):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_saisa import SaisaForConditionalGeneration

    clip_dir, text_dir = tmp_path / "clip", tmp_path / "llm"
    vision = save_clip(clip_dir, full=True, seed=4)
    vocab = save_tokenizer(text_dir, "vicuna")
    torch.manual_seed(9)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=HIDDEN,
            intermediate_size=INTER,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            tie_word_embeddings=tied,
        )
    )
    lm.save_pretrained(text_dir)
    capfd.readouterr()
    model, processor = SaisaForConditionalGeneration.from_vision_text_pretrained(str(clip_dir), str(text_dir))
    report = "".join(capfd.readouterr())
    assert "UNEXPECTED" not in report and "text_model" not in report  # the full CLIP's text half is not news
    from transformers import CLIPVisionModel

    assert "_keys_to_ignore_on_load_unexpected" not in CLIPVisionModel.__dict__  # restored after the load
    assert model.config.shared_projector and len(model.model.multi_modal_projector) == 1
    assert model.config.tie_word_embeddings == tied
    embed = model.get_input_embeddings().weight
    assert (model.lm_head.weight.data_ptr() == embed.data_ptr()) == tied
    assert processor.image_token_id == model.config.image_token_id == vocab
    state = model.state_dict()
    for k, v in lm.state_dict().items():
        new = "lm_head.weight" if k == "lm_head.weight" else "model.language_model." + k.removeprefix("model.")
        grown = k in ("lm_head.weight", "model.embed_tokens.weight")
        assert torch.equal(state[new][: v.shape[0]] if grown else state[new], v), k
        if grown:
            torch.testing.assert_close(state[new][-1], v.mean(0))
    for k, v in vision.items():
        if k != "embeddings.position_ids":
            assert torch.equal(state["model.vision_tower." + k], v), k
    assert state["model.multi_modal_projector.0.linear_1.weight"].std() > 0
    # it runs, and survives a save/load round trip
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it"}]}],
        add_generation_prompt=True,
    )
    batch = processor(images=_images(1), text=[prompt], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path / "composed")
    again = SaisaForConditionalGeneration.from_pretrained(tmp_path / "composed").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits)


# ------------------------------------------------------------------------------------------------ memory


# VmHWM, not getrusage's ru_maxrss: the latter survives exec and would report the (larger) parent's peak.
RSS_SCRIPT = r"""
import json, sys
from modeling_saisa.convert import convert_original_checkpoint
import modeling_saisa.processing, transformers, tokenizers  # import everything before the baseline
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
base = status('VmRSS')
convert_original_checkpoint(sys.argv[1], sys.argv[2], vision_tower=sys.argv[3], max_shard_size=sys.argv[4])
print(json.dumps({"baseline": base, "peak": status('VmHWM')}))
"""


def make_big_original(root: Path, size_mb: float, vocab: int = 32000) -> tuple[Path, Path, int]:
    """A synthetic fp16 original checkpoint of about `size_mb` MB in 4 shards, plus a tiny CLIP."""
    from transformers import TokenizersBackend

    hidden, layers = 512, 8
    per_layer = 2 * (
        4 * hidden * hidden + 3 * hidden * int(2.75 * hidden) + hidden * VISION["hidden_size"] + hidden * hidden
    )
    layers = max(1, round((size_mb * 1e6 - 2 * 2 * vocab * hidden) / per_layer))
    src = root / "big"
    src.mkdir()
    tokens = ["<unk>", "<s>", "</s>", *WORDS] + [f"w{i}" for i in range(vocab - 3 - len(WORDS))]
    TokenizersBackend(
        tokenizer_object=_word_backend(tokens, ["<unk>", "<s>", "</s>"]),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    ).save_pretrained(src)
    config = original_config(vocab, kind="vicuna", mm_vision_tower=None)
    config.update(
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        torch_dtype="float16",
    )
    (src / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        inter = int(2.75 * hidden)
        shapes.update(
            {
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mm_projector.0.weight": (hidden, VISION["hidden_size"]),
                p + "mm_projector.0.bias": (hidden,),
                p + "mm_projector.2.weight": (hidden, hidden),
                p + "mm_projector.2.bias": (hidden,),
            }
        )
    keys = list(shapes)
    per = math.ceil(len(keys) / 4)
    weight_map = {}
    for s in range(4):  # one shard in memory at a time
        part = {k: (torch.randn(shapes[k], generator=g) * 0.02).half() for k in keys[s * per : (s + 1) * per]}
        name = f"model-{s + 1:05d}-of-00004.safetensors"
        save_file(part, src / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        del part
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_clip(root / "clip", full=False, seed=0)
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    return src, root / "clip", total


def measure_peak_rss(root: Path, size_mb: float, vocab: int = 32000, max_shard_size: str = "5GB") -> dict:
    """Peak RSS of a conversion in a fresh interpreter; `baseline` is its RSS after importing everything."""
    src, clip, size = make_big_original(root, size_mb, vocab)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(src), str(root / "out"), str(clip), max_shard_size],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    numbers["checkpoint"] = size
    numbers["peak_over_size"] = numbers["peak"] / size
    numbers["increase_over_size"] = (numbers["peak"] - numbers["baseline"]) / size
    return numbers


@pytest.mark.slow
def test_streaming_memory(tmp_path):
    """Converting needs far less than a second copy of the checkpoint on top of the interpreter."""
    numbers = measure_peak_rss(tmp_path, 160, vocab=8000)
    assert numbers["checkpoint"] > 150e6
    assert numbers["increase_over_size"] < 0.35, numbers


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Measure the converter's peak RSS on a synthetic checkpoint.")
    parser.add_argument("--rss-mb", type=float, default=600)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure_peak_rss(Path(tmp), args.rss_mb, args.vocab), indent=2))
