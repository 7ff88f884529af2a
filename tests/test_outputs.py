"""Outputs as transformers >= 5.24 users and tools expect them: Llava's output classes, `cache` names, sequence layout.

Hidden states and attentions are checked against the overwrite-then-dense oracle (the unmodified backbone on the full
sequence, visual rows overwritten with `P_l(f)` before every layer): at text rows they must be equal, at visual and
padding rows SAISA has nothing and returns zeros.
"""

import re

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, make_batch, tiny_model
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_saisa import SaisaModel

ROWS = [[3, "img", 2, "img", 1], [5, "img", 4], [2]]


@pytest.fixture(scope="module")
def batch():
    return make_batch(ROWS, "left")


def _oracle_states(model, input_ids, attention_mask, pixel_values):
    """The oracle's hidden states (every layer) and attentions, from the unmodified backbone (eager)."""
    saisa, backbone = model.model, model.model.language_model
    is_visual = input_ids == IMAGE_TOKEN_ID
    features = saisa.get_image_features(pixel_values).pooler_output
    handles = []
    for idx, layer in enumerate(backbone.layers):

        def overwrite(module, args, kwargs, idx=idx):
            hidden = args[0].clone()
            hidden[is_visual] = saisa.project(features, idx).flatten(0, 1)
            return (hidden, *args[1:]), kwargs

        handles.append(layer.register_forward_pre_hook(overwrite, with_kwargs=True))
    try:
        return backbone(
            inputs_embeds=backbone.embed_tokens(input_ids),
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=False,
            output_hidden_states=True,
            output_attentions=True,
        )
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def test_hidden_states_and_attentions_are_in_sequence_layout(batch):
    model = tiny_model(attn="eager")
    input_ids, attention_mask, pixel_values = batch
    out = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        output_hidden_states=True,
        output_attentions=True,
    )
    ref = _oracle_states(model, input_ids, attention_mask, pixel_values)
    text = attention_mask.bool() & (input_ids != IMAGE_TOKEN_ID)
    batch_size, seq = input_ids.shape
    n_layers = model.config.text_config.num_hidden_layers
    assert len(out.hidden_states) == n_layers + 1 and len(out.attentions) == n_layers
    # Layer 0's input at visual rows is P_0(f) in the oracle, but SAISA never forms it as a row: compare text rows.
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert ours.shape == (batch_size, seq, model.config.text_config.hidden_size)
        assert torch.allclose(ours[text], theirs[text], atol=1e-5)
        assert ours[~text].abs().max() == 0
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    for ours, theirs in zip(out.attentions, ref.attentions, strict=True):
        assert ours.shape == theirs.shape == (batch_size, model.config.text_config.num_attention_heads, seq, seq)
        rows = text[:, None, :, None].expand_as(ours)
        assert torch.allclose(ours[rows], theirs[rows], atol=1e-6)
        assert ours[~rows].abs().max() == 0


@torch.no_grad()
def test_return_dict_false_returns_tuples(batch):
    model = tiny_model(attn="sdpa")
    input_ids, attention_mask, pixel_values = batch
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    as_dict = model(**kwargs)
    as_tuple = model(**kwargs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.logits)
    base = model.model(**kwargs, return_dict=False, use_cache=False)
    assert isinstance(base, tuple) and torch.equal(base[0], model.model(**kwargs, use_cache=False).last_hidden_state)
    features = model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(features, tuple)


@torch.no_grad()
def test_get_image_features_is_a_model_output(batch):
    model = tiny_model(attn="eager")  # attention weights exist under eager only
    pixel_values = batch[2]
    config = model.config
    out = model.get_image_features(pixel_values)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out.pooler_output.shape == (len(pixel_values), config.image_seq_length, config.vision_config.hidden_size)
    assert out.hidden_states is None  # only the selected layer was captured, and not handed back
    full = model.get_image_features(pixel_values, output_hidden_states=True, output_attentions=True)
    n_tower_layers = config.vision_config.num_hidden_layers
    assert len(full.hidden_states) == n_tower_layers + 1 and len(full.attentions) == n_tower_layers
    assert torch.equal(full.pooler_output, full.hidden_states[config.vision_feature_layer][:, 1:])
    assert torch.equal(full.pooler_output, out.pooler_output)
    # The forward hands the same features back as `image_outputs`.
    input_ids, attention_mask, _ = batch
    forward = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert torch.equal(forward.image_outputs.pooler_output, out.pooler_output)


@torch.no_grad()
def test_cache_is_the_name_and_the_old_one_still_works_with_a_warning(batch):
    model = tiny_model(attn="sdpa")
    input_ids, attention_mask, pixel_values = batch
    prefill = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=True)
    assert prefill.cache is not None and prefill.cache.get_seq_length() == input_ids.shape[1]
    step = torch.full((input_ids.shape[0], 1), 7)
    step_mask = torch.cat([attention_mask, torch.ones_like(step)], dim=1)
    new = model(input_ids=step, attention_mask=step_mask, cache=prefill.cache).logits
    prefill.cache.crop(-1)  # back to the prompt
    with pytest.warns(FutureWarning, match="past_key_values"):
        old = model(input_ids=step, attention_mask=step_mask, past_key_values=prefill.cache).logits
    assert torch.equal(new, old)


def test_tensor_parallel_plan_covers_llm_projectors_and_head():
    """`tp_plan="auto"` shards every linear of the decoder, every per-layer projector and the (tied) lm_head."""
    model = tiny_model()
    plan = model.tp_plan
    assert plan["lm_head"] == "colwise_gather_output"
    assert isinstance(model.model, SaisaModel)
    uncovered = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.startswith("model.vision_tower"):
            continue
        generic = re.sub(r"\.\d+\.", ".*.", name)
        if generic not in plan:
            uncovered.append(name)
    assert not uncovered, f"linears without a TP rule: {uncovered}"
    assert plan["model.multi_modal_projector.*.linear_1"] == "colwise"
    assert plan["model.multi_modal_projector.*.linear_2"] == "rowwise"
