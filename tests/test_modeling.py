"""SAISA forward == the overwrite-then-dense oracle at every text position, for every layout a user can give."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import oracle_logits, text_positions
from tiny import IMAGE_TOKEN_ID, make_batch, tiny_model

from modeling_saisa import SaisaConfig, SaisaForConditionalGeneration, SaisaModel

TOL = 1e-5

segment = st.one_of(st.integers(1, 5), st.just("img"))
row = st.lists(segment, min_size=0, max_size=5)
batch_layout = st.tuples(st.lists(row, min_size=1, max_size=3), st.sampled_from(["left", "right"]))


def _max_text_error(model, input_ids, attention_mask, pixel_values):
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=False)
    ref = oracle_logits(model, input_ids, pixel_values, attention_mask)
    text = text_positions(input_ids, attention_mask, IMAGE_TOKEN_ID)
    return (out.logits[text] - ref[text]).abs().max().item()


@pytest.fixture(scope="module")
def models():
    return {attn: tiny_model(attn=attn) for attn in ("eager", "sdpa")}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=batch_layout, attn=st.sampled_from(["eager", "sdpa"]))
def test_oracle_equality_over_layouts(models, layout, attn):
    rows, padding_side = layout
    input_ids, attention_mask, pixel_values = make_batch(rows, padding_side)
    assert _max_text_error(models[attn], input_ids, attention_mask, pixel_values) <= TOL


@pytest.mark.parametrize("text", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_backbones_pass_the_oracle(text, vision):
    model = tiny_model(text, vision, attn="sdpa")
    rows = [[3, "img", 2, "img", 1], [5, "img", 4], [2]]
    for padding_side in ("left", "right"):
        input_ids, attention_mask, pixel_values = make_batch(rows, padding_side)
        assert _max_text_error(model, input_ids, attention_mask, pixel_values) <= TOL


def test_mistral_sliding_window_in_prefill_mask():
    """A window shorter than the prompt must hold for visual keys too (the oracle's backbone applies it)."""
    from tiny import tiny_config

    config = tiny_config("mistral")
    config.text_config.sliding_window = 12
    torch.manual_seed(0)
    model = SaisaForConditionalGeneration(config).eval()
    input_ids, attention_mask, pixel_values = make_batch([[4, "img", 6, "img", 3]], "left")
    assert _max_text_error(model, input_ids, attention_mask, pixel_values) <= TOL


@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_backends_agree_with_eager(attn):
    eager = tiny_model(attn="eager")
    other = tiny_model(attn="eager")
    try:
        other.set_attn_implementation(attn)
    except (ImportError, ValueError) as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"{attn} unavailable: {err}")
    input_ids, attention_mask, pixel_values = make_batch([[3, "img", 4], [1, "img", "img", 2], [6]], "left")
    with torch.no_grad():
        a = eager(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        b = other(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    text = text_positions(input_ids, attention_mask, IMAGE_TOKEN_ID)
    assert (a[text] - b[text]).abs().max().item() <= TOL


def test_text_only_batch_is_the_plain_backbone():
    model = tiny_model(attn="sdpa")
    input_ids, attention_mask, pixel_values = make_batch([[5], [2]], "left")
    assert pixel_values is None
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.model.language_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
    text = attention_mask.bool()
    assert torch.equal(out.logits[text], model.lm_head(hidden)[text])


def test_base_model_returns_sequence_layout():
    model = tiny_model()
    input_ids, attention_mask, pixel_values = make_batch([[2, "img", 3]], "left")
    out = model.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert out.last_hidden_state.shape == (1, input_ids.shape[1], model.config.text_config.hidden_size)
    assert torch.all(out.last_hidden_state[input_ids == IMAGE_TOKEN_ID] == 0)
    assert isinstance(model.model, SaisaModel)


def test_visual_rows_get_no_queries_outputs_or_ffn():
    """Speed is part of correctness: q_proj, o_proj and the FFN see text rows only; k/v see every row once."""
    model = tiny_model(attn="sdpa")
    rows = [[3, "img", 2, "img", 1], [4, "img", 4]]
    input_ids, attention_mask, pixel_values = make_batch(rows, "left")
    n_text = int(((input_ids != IMAGE_TOKEN_ID) & attention_mask.bool()).sum(1).max()) * len(rows)
    n_visual = int((input_ids == IMAGE_TOKEN_ID).sum())
    seen: dict[str, int] = {}

    def counter(name):
        def hook(module, args):
            seen[name] = seen.get(name, 0) + args[0].shape[:-1].numel()

        return hook

    layer = model.model.language_model.layers[0]
    modules = {"q": layer.self_attn.q_proj, "o": layer.self_attn.o_proj, "mlp": layer.mlp, "k": layer.self_attn.k_proj}
    handles = [m.register_forward_pre_hook(counter(name)) for name, m in modules.items()]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    for handle in handles:
        handle.remove()
    assert seen["q"] == seen["o"] == seen["mlp"] == n_text  # query slots only: no visual or padding rows
    assert seen["k"] == n_text + n_visual  # text K once + visual K once


def test_shared_projector_feeds_every_layer():
    from tiny import tiny_config

    torch.manual_seed(0)
    model = SaisaForConditionalGeneration(tiny_config(shared_projector=True)).eval()
    assert len(model.model.multi_modal_projector) == 1
    input_ids, attention_mask, pixel_values = make_batch([[2, "img", 3]], "left")
    assert _max_text_error(model, input_ids, attention_mask, pixel_values) <= TOL


def test_config_validation_messages():
    from tiny import tiny_config

    with pytest.raises(ValueError, match="supports text backbones"):
        tiny_config(text_config={"model_type": "gpt2"})
    with pytest.raises(ValueError, match="image_seq_length=10 does not match"):
        tiny_config(image_seq_length=10)
    with pytest.raises(ValueError, match="image_token_index=500"):
        tiny_config(image_token_id=500)
    default = SaisaConfig()
    assert default.image_seq_length == 576 and default.text_config.hidden_size == 4096
    assert default.vision_config.image_size == 336 and default.vision_feature_layer == -2
