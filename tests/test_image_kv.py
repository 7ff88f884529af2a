"""ImageKVStore: stored per-image visual K/V give the outputs of a fresh computation, and skip the vision work."""

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, make_batch, tiny_model

from modeling_saisa import ImageKVStore
from modeling_saisa.backbones import rotate_keys, rotated_keys
from modeling_saisa.image_kv import image_digest

GEN = dict(max_new_tokens=5, suppress_tokens=[IMAGE_TOKEN_ID], pad_token_id=PAD_TOKEN_ID, eos_token_id=None)
BIG = 1 << 30


@pytest.fixture(scope="module")
def model():
    return tiny_model(attn="sdpa")


def _logits(model, ids, mask, px, store=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=px, image_kv=store).logits


def _count_vision(model):
    """Forward hooks counting vision-tower and projector calls."""
    calls = {"tower": 0, "projector": 0}
    hooks = [model.model.vision_tower.register_forward_hook(lambda *a: calls.__setitem__("tower", calls["tower"] + 1))]
    for projector in model.model.multi_modal_projector:
        hooks.append(projector.register_forward_hook(lambda *a: calls.__setitem__("projector", calls["projector"] + 1)))
    return calls, hooks


# ------------------------------------------------------------------ the store alone
def test_lru_eviction_by_exact_bytes_and_stats():
    store = ImageKVStore(max_bytes=3 * 2 * 64 * 4)  # room for three entries of 2 x 64 fp32 values
    entries = {name: (torch.randn(2, 4, 2, 4), torch.randn(2, 4, 2, 4)) for name in "abcd"}
    for name in "abc":
        store.put(name, *entries[name])
    assert store.stats()["bytes"] == 3 * 2 * 64 * 4 and len(store) == 3
    store.get("a")  # a is now the most recent: b is the oldest
    store.put("d", *entries["d"])
    assert "b" not in store and {"a", "c", "d"} <= {k for k in "abcd" if k in store}
    assert store.stats()["evictions"] == 1
    with pytest.raises(ValueError, match="max_bytes"):
        ImageKVStore(max_bytes=0)
    with pytest.raises(ValueError, match="n_layers"):
        store.put("e", torch.randn(4, 2, 4), torch.randn(4, 2, 4))


def test_image_digest_is_content_shape_and_dtype():
    image = torch.randn(3, 8, 8)
    assert image_digest(image) == image_digest(image.clone())
    assert image_digest(image) != image_digest(image.double())
    assert image_digest(image) != image_digest(image.reshape(3, 4, 16))
    changed = image.clone()
    changed[0, 0, 0] += 1
    assert image_digest(image) != image_digest(changed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_keys_rotate_exactly_as_fresh_ones_and_stay_unrotated(dtype):
    """`rotated_keys` (a hit's out-of-place RoPE) gives `rotate_keys`' (the fresh path's in-place RoPE) bits."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(7, 3, 16, generator=gen).to(dtype)  # [n_v, H, D]
    angles = torch.randn(7, 8, generator=gen) * 30
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    stored = keys.clone()
    rotated = rotated_keys(stored, cos, sin)
    assert torch.equal(stored, keys)  # the entry is untouched
    assert torch.equal(rotated, rotate_keys(keys.clone()[None], cos[None], sin[None])[0])


# ------------------------------------------------------------------ equality with the fresh computation
def test_logits_equal_at_other_positions_orders_neighbours_and_with_misses(model):
    store = ImageKVStore(max_bytes=BIG)
    ids, mask, px = make_batch([[3, "img", 2, "img", 1], [5, "img", 4]], "left")
    assert torch.allclose(_logits(model, ids, mask, px, store), _logits(model, ids, mask, px), atol=1e-6)
    assert store.stats()["misses"] == 3 and store.stats()["hits"] == 0
    # The same images at other positions, other orders, beside a new image, in one batch with a miss.
    ids2, mask2, _ = make_batch([[7, "img", "img", 3], [1, "img", 9, "img", 2]], "right", seed=5)
    px2 = torch.stack([px[2], px[0], px[1], torch.randn(3, 8, 8)])
    fresh = _logits(model, ids2, mask2, px2)
    assert torch.allclose(_logits(model, ids2, mask2, px2, store), fresh, atol=1e-6)
    assert store.stats()["hits"] == 3 and store.stats()["misses"] == 4


def test_in_batch_duplicates_are_computed_once(model):
    store = ImageKVStore(max_bytes=BIG)
    ids, mask, px = make_batch([[3, "img", 2], [5, "img", 4]], "left")
    px = torch.stack([px[0], px[0]])
    calls, hooks = _count_vision(model)
    try:
        out = _logits(model, ids, mask, px, store)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.allclose(out, _logits(model, ids, mask, px), atol=1e-6)
    assert calls["tower"] == 1 and store.stats()["misses"] == 1 and len(store) == 1


@pytest.mark.slow
def test_generate_equal_with_beams_and_return_sequences(model):
    ids, mask, px = make_batch([[3, "img", 2], [5, "img", 4, "img", 1]], "left")
    for extra in (dict(), dict(num_beams=2), dict(do_sample=False, num_return_sequences=2, num_beams=2)):
        store = ImageKVStore(max_bytes=BIG)
        plain = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **GEN, **extra)
        for _ in range(2):  # first call: misses (and in-batch duplicates from the expansion); second: all hits
            stored = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_kv=store, **GEN, **extra)
            assert torch.equal(plain, stored)
        assert len(store) == 3


@pytest.mark.parametrize("attn", ["eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_other_attention_backends(attn):
    model = tiny_model(attn=attn)
    store = ImageKVStore(max_bytes=BIG)
    ids, mask, px = make_batch([[3, "img", 2], [5, "img", 4, "img"], [2]], "left")
    ids = torch.cat([ids, torch.full((3, 1), 7)], 1)
    mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    fresh = _logits(model, ids, mask, px)
    for _ in range(2):
        assert torch.allclose(_logits(model, ids, mask, px, store), fresh, atol=1e-6)


def test_save_load_round_trip_and_refusal(model, tmp_path):
    store = ImageKVStore(max_bytes=BIG)
    ids, mask, px = make_batch([[3, "img", 2, "img", 1]], "left")
    fresh = _logits(model, ids, mask, px, store)
    store.save(tmp_path / "kv")
    loaded = ImageKVStore.load(tmp_path / "kv", model=model)
    assert loaded.stats()["bytes"] == store.stats()["bytes"] and len(loaded) == 2
    calls, hooks = _count_vision(model)
    try:
        assert torch.allclose(_logits(model, ids, mask, px, loaded), fresh, atol=1e-6)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"tower": 0, "projector": 0} and loaded.stats()["hits"] == 2
    other = tiny_model(attn="sdpa", seed=1)
    with pytest.raises(ValueError, match="another model: weights"):
        ImageKVStore.load(tmp_path / "kv", model=other)
    with pytest.raises(ValueError, match="another model"):
        _logits(other, ids, mask, px, ImageKVStore.load(tmp_path / "kv"))


def test_weight_update_invalidates_entries():
    model = tiny_model(attn="sdpa")
    store = ImageKVStore(max_bytes=BIG)
    ids, mask, px = make_batch([[3, "img", 2]], "left")
    _logits(model, ids, mask, px, store)
    with torch.no_grad():
        model.model.multi_modal_projector[1].linear_2.weight.mul_(1.5)
    assert torch.allclose(_logits(model, ids, mask, px, store), _logits(model, ids, mask, px), atol=1e-6)
    assert store.stats()["misses"] == 2


# ------------------------------------------------------------------ a hit does no vision work
def test_hit_runs_no_tower_no_projector_and_text_only_flops(model):
    from torch.utils.flop_counter import FlopCounterMode

    store = ImageKVStore(max_bytes=BIG)
    ids, mask, px = make_batch([[3, "img", 2, "img", 1]], "left")
    _logits(model, ids, mask, px, store)
    calls, hooks = _count_vision(model)
    try:
        with FlopCounterMode(display=False) as hit:
            _logits(model, ids, mask, px, store)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"tower": 0, "projector": 0}
    # Text-only accounting: the same number of text rows with no visual work at all; attention scores still see the
    # visual keys, so compare matmul (linear) FLOPs, where every visual projection (tower, P_l, k/v) would show.
    text_ids = ids[:, ~(ids[0] == IMAGE_TOKEN_ID)]
    with FlopCounterMode(display=False) as text_only:
        _logits(model, text_ids, torch.ones_like(text_ids), None)
    linear = (torch.ops.aten.mm, torch.ops.aten.addmm)
    counts = [sum(c.get_flop_counts()["Global"].get(op, 0) for op in linear) for c in (hit, text_only)]
    assert counts[0] == counts[1] > 0


def test_dense_policy_refuses_the_store():
    model = tiny_model(attn="sdpa")
    model.config.visual_policy = ["dense", "injected"]  # layer 0's visual rows attend over the text
    ids, mask, px = make_batch([[3, "img", 2]], "left")
    with pytest.raises(ValueError, match=r"layers \[0\] are `dense`.*depend on the text"):
        model(input_ids=ids, attention_mask=mask, pixel_values=px, image_kv=ImageKVStore(max_bytes=BIG))


@pytest.mark.parametrize("policy", [["injected", "naavit"], ["frozen", "frozen"], ["composite", "injected"]])
def test_carried_state_policies(policy):
    model = tiny_model(attn="sdpa", visual_policy=policy)
    store = ImageKVStore(max_bytes=BIG)
    ids, mask, px = make_batch([[3, "img", 2, "img", 1], [5, "img", 4]], "left")
    fresh = _logits(model, ids, mask, px)
    calls, hooks = _count_vision(model)
    try:
        assert torch.allclose(_logits(model, ids, mask, px, store), fresh, atol=1e-6)  # misses
        after_misses = dict(calls)
        assert torch.allclose(_logits(model, ids, mask, px, store), fresh, atol=1e-6)  # all hits
        assert calls == after_misses and after_misses["projector"] > 0
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["tower"] == 1 and store.stats()["hits"] == 3


def test_fingerprint_sums_only_changed_weights(monkeypatch):
    """Unchanged weights are not summed again on every call; a one-element in-place write, which strided samples
    alone can miss, or a replaced tensor, is still seen."""
    from modeling_saisa import image_kv

    model = tiny_model(attn="sdpa").model
    sums = image_kv.WeightSums()
    first = image_kv.model_fingerprint(model, sums)
    assert first == image_kv.model_fingerprint(model)  # the cache changes nothing in the result
    summed = []
    real_sum = torch.Tensor.sum

    def recording_sum(self, *args, **kwargs):
        if kwargs.get("dtype") == torch.float64:  # a weight's (chunked) float64 sum
            summed.append(self.numel())
        return real_sum(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", recording_sum)
    assert image_kv.model_fingerprint(model, sums) == first
    assert summed == []
    weight = model.language_model.layers[1].self_attn.k_proj.weight
    with torch.no_grad():
        weight[1, 3] += 0.5  # row 1 is not on the 64-sample stride of this weight
    changed = image_kv.model_fingerprint(model, sums)
    assert sum(summed) == weight.numel() and changed["weights"] != first["weights"]  # that weight only
    with torch.no_grad():
        model.language_model.layers[1].self_attn.v_proj.weight.data = weight.detach().clone()
    replaced = image_kv.model_fingerprint(model, sums)
    assert replaced["weights"] != changed["weights"]
    # A dense write through `.data` bypasses torch's version counter; the strided samples still see it.
    model.multi_modal_projector[0].linear_1.weight.data.mul_(1.5)
    assert image_kv.model_fingerprint(model, sums)["weights"] != replaced["weights"]


def test_weights_digest_is_the_per_parameter_digest():
    """Gathering all samples in one `cat` and summing in float64 chunks changes no digest: the same bytes as sampling,
    summing and hashing one parameter at a time, also when parameters have different dtypes (widening is exact)."""
    import hashlib

    from modeling_saisa import image_kv

    model = tiny_model(attn="sdpa").model
    model.multi_modal_projector.to(torch.bfloat16)
    model.language_model.layers[0].to(torch.float64)
    named = image_kv.fingerprint_parameters(model)
    # A weight of several float64 chunks (the tiny model's fit in one).
    named.append(("large", torch.randn(5 * (1 << 16) + 3, generator=torch.Generator().manual_seed(0))))
    assert len({p.dtype for _, p in named}) == 3
    reference = hashlib.sha256()
    for name, tensor in named:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        sample = torch.cat([flat[::step], tensor.detach().sum(dtype=torch.float64).reshape(1).to(flat.dtype)])
        reference.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        reference.update(sample.float().numpy().tobytes())
    assert image_kv.weights_digest(named) == reference.hexdigest()
