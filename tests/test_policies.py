"""Per-layer visual policies (policies.md): each equals its dense-layer oracle on an unmodified transformers Llava."""

from __future__ import annotations

import copy
import json

import PIL.Image
import pytest
import tiny
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, make_batch, tiny_config

from modeling_saisa import SaisaForConditionalGeneration
from modeling_saisa.policies import VISUAL_POLICY_PRESETS, resolve_visual_policy, text_independent

N_LAYERS = 4
ROWS = [[3, "img", 4], ["img", 2, "img", 3], [5], [2, "img", 6]]


def tiny_llava(attn: str = "eager", seed: int = 0, text_type: str = "llama", **text_overrides):
    return tiny.tiny_llava(N_LAYERS, attn, seed, text_type, **text_overrides)


def oracle_logits(llava, policy_list, input_ids, attention_mask, pixel_values, injected_rows=None):
    """The spec's dense-layer oracles, by hooks on the unmodified Llava (never the SAISA code).

    `injected_rows(l)`: the visual rows `P_l(f)` an `injected` layer l is overwritten with (then frozen).
    """
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
    for layer_idx, (layer, policy) in enumerate(zip(llava.model.language_model.layers, policy_list)):
        saved = {}

        def pre(module, args, kwargs, policy=policy, saved=saved, layer_idx=layer_idx):
            hidden = args[0] if args else kwargs["hidden_states"]
            if policy == "injected":
                hidden = hidden.clone()
                hidden[is_visual] = injected_rows(layer_idx).flatten(0, 1).to(hidden.dtype)
                args, kwargs = ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            saved["x"] = hidden
            if policy in ("composite", "composite_noffn"):
                kwargs["attention_mask"] = composite_mask[:, None].to(hidden.dtype)
            return args, kwargs

        def post(module, args, kwargs, output, policy=policy, saved=saved):
            hidden = output[0] if isinstance(output, tuple) else output
            if policy in ("frozen", "injected"):
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


def assert_text_rows_close(got, expected, input_ids, attention_mask):
    """The oracle comparison: logits at text rows (the only rows SAISA-family models output) within 1e-5."""
    rows = text_rows(input_ids, attention_mask)
    torch.testing.assert_close(got[rows], expected[rows], atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_dense_equals_llava(padding_side):
    llava = tiny_llava()
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy="dense")
    ids, mask, pixels = make_batch(ROWS, padding_side=padding_side)
    with torch.no_grad():
        expected = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert_text_rows_close(got, expected, ids, mask)
    if padding_side == "left":
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD_TOKEN_ID)
        torch.testing.assert_close(
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw),
            llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw),
        )


# Windows of 6 keys: every visual query (16 per image) loses the start of its row, text rows too.
SLIDING = {
    "mistral": dict(sliding_window=6),
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=2),  # layers 2, 3 sliding
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("text_type", sorted(SLIDING))
def test_dense_equals_llava_with_sliding_windows(text_type, attn):
    """`dense` layers give visual queries the layer's sliding window, as LLaVA does (Mistral, Qwen2)."""
    llava = tiny_llava(attn, text_type=text_type, **SLIDING[text_type])
    text_config = llava.config.text_config
    assert text_config.sliding_window == 6
    if text_type == "qwen2":
        assert text_config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy="dense")
    ids, mask, pixels = make_batch(ROWS, padding_side="left")
    with torch.no_grad():
        expected = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        full = tiny_llava(attn, text_type=text_type)  # the same weights without a window: it must matter here
        full.load_state_dict(llava.state_dict())
        unwindowed = full(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    rows = text_rows(ids, mask)
    assert (unwindowed[rows] - expected[rows]).abs().max() > 1e-3
    assert_text_rows_close(got, expected, ids, mask)


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
    assert_text_rows_close(got, expected, ids, mask)


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


def test_injected_mixed_with_carried_policies():
    """SAISA layers (`injected`, per-layer projectors) interleaved with carried ones; layer 0 is P(f) either way."""
    llava = tiny_llava()
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy="frozen")
    torch.manual_seed(1)
    extra = [copy.deepcopy(llava.model.multi_modal_projector) for _ in range(N_LAYERS - 1)]
    for projector in extra:
        for parameter in projector.parameters():
            torch.nn.init.normal_(parameter, std=0.2)
    model.model.multi_modal_projector = torch.nn.ModuleList([llava.model.multi_modal_projector, *extra])
    model.config.shared_projector = False
    policy_list = ["frozen", "injected", "dense", "injected"]
    model.config.visual_policy = policy_list
    ids, mask, pixels = make_batch(ROWS)
    with torch.no_grad():
        features = model.model.get_image_features(pixels).pooler_output
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    expected = oracle_logits(llava, policy_list, ids, mask, pixels, lambda idx: model.model.project(features, idx))
    assert_text_rows_close(got, expected, ids, mask)


@pytest.mark.parametrize("policy_list", [MIXED[0], ["composite"] * N_LAYERS])
def test_cached_generate_and_rows_alone(policy_list):
    llava = tiny_llava("sdpa")
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=policy_list)
    ids, mask, pixels = make_batch(ROWS)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD_TOKEN_ID)
    cached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **kw)
    uncached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=False, **kw)
    torch.testing.assert_close(cached, uncached)
    with torch.no_grad():
        batch_logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        per_row = ((ids == IMAGE_TOKEN_ID).sum(1) // 16).tolist()
        for row in range(len(ROWS)):
            width = int(mask[row].sum())  # left padding: the row's tokens are its last `width`
            first = sum(per_row[:row])
            r_ids, r_mask = ids[row : row + 1, -width:], mask[row : row + 1, -width:]
            r_pixels = pixels[first : first + per_row[row]] if per_row[row] else None
            alone = model(input_ids=r_ids, attention_mask=r_mask, pixel_values=r_pixels).logits[0]
            keep = text_rows(r_ids, r_mask)[0]
            torch.testing.assert_close(batch_logits[row, -width:][keep], alone[keep], atol=1e-5, rtol=0)


def test_flex_forward_equals_eager():
    llava = tiny_llava("eager")
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=MIXED[0])
    ids, mask, pixels = make_batch(ROWS)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        model.set_attn_implementation("flex_attention")
        flex = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    rows = text_rows(ids, mask)
    torch.testing.assert_close(flex[rows], eager[rows], atol=1e-4, rtol=0)


def test_no_visual_queries_outside_dense_layers():
    """Counting hooks: q_proj / o_proj / FFN see visual rows only where the policy gives them those."""
    llava = tiny_llava()
    policy_list = ["frozen", "dense", "naavit", "composite"]
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=policy_list)
    ids, mask, pixels = make_batch(ROWS)
    rows: dict[tuple[str, int], int] = {}
    handles = []
    for idx, layer in enumerate(llava.model.language_model.layers):
        for name in ("q_proj", "o_proj"):
            module = getattr(layer.self_attn, name)
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, k=(name, idx): rows.__setitem__(k, rows.get(k, 0) + a[0].shape[:-1].numel())
                )
            )
        handles.append(
            layer.mlp.register_forward_hook(
                lambda m, a, o, k=("mlp", idx): rows.__setitem__(k, rows.get(k, 0) + a[0].shape[:-1].numel())
            )
        )
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    for handle in handles:
        handle.remove()
    n_images, n_v = pixels.shape[0], 16
    text_slots = ids.shape[0] * int(text_rows(ids, mask).sum(1).max())
    visual = n_images * n_v
    # Layer 3 is the last: its visual update feeds nothing and is skipped.
    expected_visual = {
        0: {"q_proj": 0, "o_proj": 0, "mlp": 0},
        1: {"q_proj": visual, "o_proj": visual, "mlp": visual},
        2: {"q_proj": 0, "o_proj": 0, "mlp": visual},
        3: {"q_proj": 0, "o_proj": 0, "mlp": 0},
    }
    for idx, counts in expected_visual.items():
        for name, count in counts.items():
            assert rows[(name, idx)] == text_slots + count, (name, idx)


@pytest.mark.parametrize("policy_list", [MIXED[0], ["naavit", "composite", "frozen", "naavit"]])
def test_loss_and_grads_with_checkpointing(policy_list):
    llava = tiny_llava()
    llava.train()
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=policy_list)
    ids, mask, pixels = make_batch(ROWS)
    labels = ids.masked_fill(~text_rows(ids, mask), -100)

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    assert grads["model.multi_modal_projector.0.linear_1.weight"].abs().sum() > 0
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ck_loss, ck_grads = loss_and_grads()
    torch.testing.assert_close(ck_loss, loss)
    assert ck_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(ck_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


@settings(max_examples=6, deadline=None)
@given(
    policy_list=st.lists(
        st.sampled_from(["dense", "frozen", "naavit", "composite", "composite_noffn"]),
        min_size=N_LAYERS,
        max_size=N_LAYERS,
    ),
    padding_side=st.sampled_from(["left", "right"]),
)
def test_drawn_lists_equal_oracle(policy_list, padding_side):
    llava = tiny_llava()
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=policy_list)
    ids, mask, pixels = make_batch([["img", 3], [2, "img", 1, "img", 2]], padding_side=padding_side)
    expected = oracle_logits(llava, policy_list, ids, mask, pixels)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert_text_rows_close(got, expected, ids, mask)


def test_llava_processor_drives_pipeline():
    """llava-hf's LlavaProcessor (image token, image_seq_length from the Llava config) through the pipeline."""
    from transformers import CLIPImageProcessor, LlavaProcessor, pipeline

    from modeling_saisa.tokenizers import build_word_tokenizer

    llava = tiny_llava()
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=MIXED[0])
    tokenizer = build_word_tokenizer("USER : ASSISTANT describe the picture".split(), vocab_size=99)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    image_processor = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    image = PIL.Image.new("RGB", (12, 7), (200, 30, 30))
    inputs = processor(images=image, text="USER : <image> describe the picture ASSISTANT :", return_tensors="pt")
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 16
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    out = pipe(
        images=image,
        text="USER : <image> describe the picture ASSISTANT :",
        max_new_tokens=4,
        do_sample=False,
        return_full_text=False,
    )
    new_tokens = expected[0, inputs["input_ids"].shape[1] :]
    assert out[0]["generated_text"].strip() == tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_visual_policy_saved_in_config(tmp_path):
    model = SaisaForConditionalGeneration.from_llava(tiny_llava(), visual_policy=MIXED[1])
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["visual_policy"] == MIXED[1]
    loaded = SaisaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.visual_policy == MIXED[1]
    ids, mask, pixels = make_batch(ROWS)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        b = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="unknown policies"):
        tiny_config(visual_policy=["dense", "nope"])


def test_from_llava_directory(tmp_path):
    llava = tiny_llava()
    llava.save_pretrained(tmp_path)
    from_dir = SaisaForConditionalGeneration.from_llava(str(tmp_path), visual_policy="naavit").eval()
    from_model = SaisaForConditionalGeneration.from_llava(llava, visual_policy="naavit")
    ids, mask, pixels = make_batch(ROWS)
    with torch.no_grad():
        a = from_dir(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        b = from_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        SaisaForConditionalGeneration.from_llava(3)
