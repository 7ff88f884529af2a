"""Training readiness of the core model: loss, gradients, activation checkpointing, frozen vision."""

import torch
from oracle import oracle_logits
from tiny import IMAGE_TOKEN_ID, make_batch, tiny_model

ROWS = [[3, "img", 4, "img", 2], [6, "img", 3]]


def _labels(input_ids, attention_mask):
    labels = input_ids.masked_fill(~attention_mask.bool() | (input_ids == IMAGE_TOKEN_ID), -100)
    return labels


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_loss_equals_oracle_cross_entropy():
    """The loss is the mean next-token CE over labels that follow a text row, computed from the oracle's logits."""
    model = tiny_model(attn="sdpa")
    ids, mask, px = make_batch(ROWS, "right")
    labels = _labels(ids, mask)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels)
    ref = oracle_logits(model, ids, px, mask)
    prev_is_text = torch.zeros_like(mask, dtype=torch.bool)
    prev_is_text[:, 1:] = (mask.bool() & (ids != IMAGE_TOKEN_ID))[:, :-1]
    target = labels.masked_fill(~prev_is_text, -100)[:, 1:]
    expected = torch.nn.functional.cross_entropy(ref[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_gradients_reach_projectors_and_llm_and_checkpointing_matches():
    model = tiny_model(attn="sdpa").train()
    ids, mask, px = make_batch(ROWS, "left")
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=px, labels=_labels(ids, mask))
    loss, grads = _loss_and_grads(model, batch)
    for i in range(model.config.text_config.num_hidden_layers):
        assert grads[f"model.multi_modal_projector.{i}.linear_1.weight"].abs().sum() > 0
        assert grads[f"model.language_model.layers.{i}.self_attn.k_proj.weight"].abs().sum() > 0
        assert grads[f"model.language_model.layers.{i}.mlp.down_proj.weight"].abs().sum() > 0
    assert grads["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"].abs().sum() > 0

    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.language_model.is_activation_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(model, batch)
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-5), name


def test_checkpointing_does_not_recompute_visual_work():
    model = tiny_model(attn="sdpa").train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    calls = []
    for projector in model.model.multi_modal_projector:
        projector.register_forward_hook(lambda *a: calls.append(1))
    ids, mask, px = make_batch(ROWS, "left")
    model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=_labels(ids, mask)).loss.backward()
    assert len(calls) == model.config.text_config.num_hidden_layers


def test_frozen_vision_tower_gets_no_gradients():
    model = tiny_model(attn="sdpa").train()
    model.model.vision_tower.requires_grad_(False)
    ids, mask, px = make_batch(ROWS, "left")
    _, grads = _loss_and_grads(
        model, dict(input_ids=ids, attention_mask=mask, pixel_values=px, labels=_labels(ids, mask))
    )
    assert not any(name.startswith("model.vision_tower") for name in grads)
    assert "model.multi_modal_projector.0.linear_2.weight" in grads


def test_num_items_in_batch_is_honoured():
    model = tiny_model(attn="sdpa")
    ids, mask, px = make_batch(ROWS, "left")
    labels = _labels(ids, mask)
    mean = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss
    total = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels, num_items_in_batch=1).loss
    _, text_rows = model.model.forward_text_rows(input_ids=ids, attention_mask=mask, pixel_values=px)
    n = int((text_rows.layout.shift_labels(labels) != -100).sum())
    assert torch.allclose(total, mean * n, rtol=1e-5)
