"""Per-layer visual policies (policies.md): each equals its dense-layer oracle on an unmodified transformers Llava."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from modeling_saisa import SaisaForConditionalGeneration
from modeling_saisa.policies import VISUAL_POLICY_PRESETS, resolve_visual_policy, text_independent
from tests.tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, make_batch, tiny_config

N_LAYERS = 4
ROWS = [[3, "img", 4], ["img", 2, "img", 3], [5], [2, "img", 6]]


def tiny_llava(attn: str = "eager", seed: int = 0) -> LlavaForConditionalGeneration:
    saisa = tiny_config()
    text = saisa.text_config.to_dict()
    text["num_hidden_layers"] = N_LAYERS
    config = LlavaConfig(
        vision_config=saisa.vision_config.to_dict(),
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.eval()


def oracle_logits(llava, policy_list, input_ids, attention_mask, pixel_values):
    """The spec's dense-layer oracles, by hooks on the unmodified Llava (never the SAISA code)."""
    is_visual = input_ids == IMAGE_TOKEN_ID
    valid = attention_mask.bool()
    seq = input_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = causal[None] & valid[:, None, :]
    diagonal = torch.eye(seq, dtype=torch.bool)[None].expand_as(allowed)
    composite_rows = torch.where(is_visual[:, :, None], diagonal, allowed) | diagonal
    composite_mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
        ~composite_rows, torch.finfo(torch.float32).min
    )
    handles = []
    for layer, policy in zip(llava.model.language_model.layers, policy_list):
        saved = {}

        def pre(module, args, kwargs, policy=policy, saved=saved):
            hidden = args[0] if args else kwargs["hidden_states"]
            saved["x"] = hidden
            if policy in ("composite", "composite_noffn"):
                kwargs["attention_mask"] = composite_mask[:, None].to(hidden.dtype)
            return args, kwargs

        def post(module, args, kwargs, output, policy=policy, saved=saved):
            hidden = output[0] if isinstance(output, tuple) else output
            if policy == "frozen":
                hidden = torch.where(is_visual[..., None], saved["x"], hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        def zero_attention(module, args, output, policy=policy):
            attn = output[0].masked_fill(is_visual[..., None], 0.0)
            return (attn, *output[1:])

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
        if policy == "naavit":
            handles.append(layer.self_attn.register_forward_hook(zero_attention))
        if policy == "composite_noffn":
            handles.append(
                layer.mlp.register_forward_hook(lambda m, a, out: out.masked_fill(is_visual[..., None], 0.0))
            )
    try:
        with torch.no_grad():
            return llava(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False
            ).logits
    finally:
        for handle in handles:
            handle.remove()


def text_rows(input_ids, attention_mask):
    return attention_mask.bool() & (input_ids != IMAGE_TOKEN_ID)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_dense_equals_llava(padding_side):
    llava = tiny_llava()
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy="dense")
    ids, mask, pixels = make_batch(ROWS, padding_side=padding_side)
    with torch.no_grad():
        expected = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    rows = text_rows(ids, mask)
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=0)
    if padding_side == "left":
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD_TOKEN_ID)
        torch.testing.assert_close(
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw),
            llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw),
        )


MIXED = [
    ["frozen", "dense", "naavit", "composite"],
    ["dense", "composite_noffn", "frozen", "dense"],
    ["naavit", "frozen", "dense", "composite"],
]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("policy_list", MIXED)
def test_mixed_policies_equal_oracle(policy_list, attn):
    llava = tiny_llava(attn)
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=policy_list)
    ids, mask, pixels = make_batch(ROWS)
    llava.set_attn_implementation("eager")
    expected = oracle_logits(llava, policy_list, ids, mask, pixels)
    llava.set_attn_implementation(attn)
    model.config._attn_implementation_internal = attn
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    rows = text_rows(ids, mask)
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=0)


def test_shares_parameters():
    llava = tiny_llava()
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy="frozen")
    ours = {p.data_ptr() for p in model.parameters()}
    theirs = {p.data_ptr() for p in llava.parameters()}
    assert ours == theirs
    assert not any(p.is_meta for p in model.parameters())


def test_resolve_visual_policy(tmp_path):
    assert resolve_visual_policy("naavit", 3) == ["naavit"] * 3
    assert resolve_visual_policy(None, 2) == ["injected"] * 2
    preset = resolve_visual_policy("shortv-llava-1.5-7b", 32)
    assert [i for i, p in enumerate(preset) if p == "frozen"] == [0, 2, 3, 12, *range(17, 32)]
    assert sum(p == "frozen" for p in VISUAL_POLICY_PRESETS["shortv-llava-1.5-13b"]) == 24
    path = tmp_path / "preset.json"
    path.write_text(json.dumps({"visual_policy": ["frozen", "dense"], "lc": [0.0, 1.0]}))
    assert resolve_visual_policy(str(path), 2) == ["frozen", "dense"]
    with pytest.raises(ValueError, match="3 entries"):
        resolve_visual_policy(["dense"] * 3, 2)
    with pytest.raises(ValueError, match="unknown policies"):
        resolve_visual_policy(["dense", "bogus"], 2)
    with pytest.raises(ValueError, match="Unknown visual policy"):
        resolve_visual_policy("bogus", 2)
    with pytest.raises(ValueError, match="one projector per layer"):
        SaisaForConditionalGeneration.from_llava(tiny_llava(), visual_policy="injected")
    assert text_independent(["frozen", "naavit"]) and not text_independent(["frozen", "dense"])
