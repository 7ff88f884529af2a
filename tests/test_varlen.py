"""Varlen (flash-attention style) backends: the packed prefill is exact by construction.

flash-attn needs CUDA; here a pure-torch reference with flash's semantics (bottom-right causal alignment, packed
`cu_seq_lens_*` runs, or a 2-D padding mask on plain steps) is registered through transformers' own
`AttentionInterface` and mask registry, exactly as flash_attention_2 is. The real kernel is tested where it exists.
"""

import pytest
import torch
from oracle import text_positions
from tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, make_batch, tiny_llava, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.utils import is_flash_attn_2_available

NAME = "saisa_varlen_reference"


def _bottom_right_causal(q_len: int, k_len: int, device, causal: bool = True) -> torch.Tensor:
    full = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    return full.tril(diagonal=k_len - q_len) if causal else full


def _attend(q, k, v, mask, scaling):
    empty = ~mask.any(-1, keepdim=True)  # padding queries: flash leaves them out (zeros), sdpa would give NaN
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, scale=scaling)
    return out.masked_fill(empty, 0.0)


def reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))  # the vision tower is bidirectional
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None:
        outs = []
        for i in range(len(cu_q) - 1):
            q = query[:, :, cu_q[i] : cu_q[i + 1]]
            k, v = key[:, :, cu_k[i] : cu_k[i + 1]], value[:, :, cu_k[i] : cu_k[i + 1]]
            outs.append(_attend(q, k, v, _bottom_right_causal(q.shape[2], k.shape[2], q.device, causal), scaling))
        out = torch.cat(outs, dim=2)
    else:
        mask = _bottom_right_causal(query.shape[2], key.shape[2], query.device, causal)[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, None, -key.shape[2] :]
        out = _attend(query, key, value, mask, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, reference_varlen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)

GEN = dict(max_new_tokens=5, suppress_tokens=[IMAGE_TOKEN_ID], pad_token_id=PAD_TOKEN_ID, eos_token_id=None)
ROWS = [[3, "img", 2, "img", 1], [5, "img", 4], [2, 3]]


def _pair(text="llama"):
    return tiny_model(text, attn="sdpa"), tiny_model(text, attn=NAME)


@pytest.mark.parametrize("text", ["llama", "qwen3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_prefill_equals_sdpa(text, padding_side):
    sdpa, varlen = _pair(text)
    ids, mask, px = make_batch(ROWS, padding_side)
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        b = varlen(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    text_rows = text_positions(ids, mask, IMAGE_TOKEN_ID)
    assert (a[text_rows] - b[text_rows]).abs().max().item() <= 1e-5


def test_packed_generate_equals_sdpa_and_uncached():
    sdpa, varlen = _pair()
    ids, mask, px = make_batch(ROWS, "left")
    a = sdpa.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **GEN)
    b = varlen.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **GEN)
    c = varlen.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, use_cache=False, **GEN)
    assert torch.equal(a, b) and torch.equal(b, c)


def test_packed_training_loss_and_grads_equal_sdpa():
    sdpa, varlen = _pair()
    ids, mask, px = make_batch(ROWS, "right")
    labels = ids.masked_fill(~mask.bool() | (ids == IMAGE_TOKEN_ID), -100)
    losses = []
    for model in (sdpa, varlen):
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(*losses, atol=1e-6)
    for (name, p), (_, q) in zip(sdpa.named_parameters(), varlen.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name  # e.g. the tower's last layer feeds nothing (layer -2)
        assert p.grad is None or torch.allclose(p.grad, q.grad, atol=1e-5), name


@pytest.mark.skipif(not (torch.cuda.is_available() and is_flash_attn_2_available()), reason="needs CUDA + flash-attn")
def test_flash_attention_2_matches_sdpa_on_gpu():  # pragma: no cover - runs only where flash-attn is installed
    sdpa = tiny_model(attn="sdpa").to("cuda", torch.bfloat16)
    flash = tiny_model(attn="flash_attention_2").to("cuda", torch.bfloat16)
    ids, mask, px = (t.cuda() for t in make_batch(ROWS, "left"))
    a = sdpa.generate(input_ids=ids, attention_mask=mask, pixel_values=px.bfloat16(), do_sample=False, **GEN)
    b = flash.generate(input_ids=ids, attention_mask=mask, pixel_values=px.bfloat16(), do_sample=False, **GEN)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ visual policies on a Llava (from_llava)
def _policy_pair(attn: str, policy_list):
    from modeling_saisa import SaisaForConditionalGeneration

    reference = SaisaForConditionalGeneration.from_llava(tiny_llava(attn="sdpa"), visual_policy=policy_list)
    llava = tiny_llava(attn=attn)
    return reference, SaisaForConditionalGeneration.from_llava(llava, visual_policy=policy_list), llava


POLICY_LISTS = [["frozen", "dense", "naavit", "composite"], ["dense", "composite_noffn", "frozen", "dense"]]


@pytest.mark.parametrize("policy_list", POLICY_LISTS)
def test_policies_under_the_varlen_backend_equal_sdpa(policy_list):
    """Packed text rows, `dense` layers' visual queries through SDPA beside them: the same logits and tokens."""
    sdpa, varlen, _ = _policy_pair(NAME, policy_list)
    ids, mask, px = make_batch(ROWS, "left")
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        b = varlen(input_ids=ids, attention_mask=mask, pixel_values=px).logits
    text_rows = text_positions(ids, mask, IMAGE_TOKEN_ID)
    assert (a[text_rows] - b[text_rows]).abs().max().item() <= 1e-5
    kw = dict(do_sample=False, **GEN)
    assert torch.equal(
        sdpa.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kw),
        varlen.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kw),
    )


@pytest.mark.skipif(not (torch.cuda.is_available() and is_flash_attn_2_available()), reason="needs CUDA + flash-attn")
@pytest.mark.parametrize("policy_list", POLICY_LISTS)
def test_policies_under_flash_attention_2_match_sdpa_on_gpu(policy_list):  # pragma: no cover - CUDA + flash-attn only
    sdpa, flash, _ = _policy_pair("flash_attention_2", policy_list)
    sdpa, flash = sdpa.to("cuda", torch.bfloat16), flash.to("cuda", torch.bfloat16)
    ids, mask, px = (t.cuda() for t in make_batch(ROWS, "left"))
    kw = dict(do_sample=False, **GEN)
    a = sdpa.generate(input_ids=ids, attention_mask=mask, pixel_values=px.bfloat16(), **kw)
    b = flash.generate(input_ids=ids, attention_mask=mask, pixel_values=px.bfloat16(), **kw)
    assert torch.equal(a, b)
