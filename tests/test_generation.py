"""Cached generation == uncached recomputation, for every decoding mode; a batch == its rows alone."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB, make_batch, tiny_model
from transformers import PreTrainedTokenizerFast, TextStreamer

from modeling_saisa import SaisaForConditionalGeneration

# Random tiny models can emit the image id; generated ids are text to SAISA, but an uncached recomputation would
# read them as placeholders, so tests keep them out.
GEN = dict(max_new_tokens=6, suppress_tokens=[IMAGE_TOKEN_ID], pad_token_id=PAD_TOKEN_ID, eos_token_id=None)
ROWS = [[3, "img", 2, "img", 1], [5, "img", 4], [2, 3]]


@pytest.fixture(scope="module")
def model() -> SaisaForConditionalGeneration:
    return tiny_model(attn="sdpa")


def _new(out, inputs):
    return out[:, inputs.shape[1] :]


def test_greedy_cached_equals_uncached(model):
    ids, mask, px = make_batch(ROWS, "left")
    cached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **GEN)
    uncached = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, use_cache=False, **GEN
    )
    assert torch.equal(cached, uncached)


def test_sampling_cached_equals_uncached(model):
    ids, mask, px = make_batch(ROWS, "left")
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        outs.append(
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                pixel_values=px,
                do_sample=True,
                top_k=20,
                num_return_sequences=2,
                use_cache=use_cache,
                **GEN,
            )
        )
    assert torch.equal(*outs)


def test_beam_search_cached_equals_uncached_with_multi_image_rows(model):
    ids, mask, px = make_batch(ROWS, "left")
    kw = dict(num_beams=3, num_return_sequences=2, do_sample=False, **GEN)
    cached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **kw)
    uncached = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    # Each returned sequence belongs to its own row's images: recompute row 0's beams alone.
    alone = model.generate(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=px[:2], **kw)
    assert torch.equal(_new(cached[:2], ids), _new(alone, ids))


def test_static_cache_equals_dynamic(model):
    ids, mask, px = make_batch(ROWS, "left")
    dynamic = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **GEN)
    static = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, cache_implementation="static", **GEN
    )
    assert torch.equal(dynamic, static)


def test_prompt_lookup_equals_greedy(model):
    ids, mask, px = make_batch([[4, "img", 3, 2, 3, 2, 3]], "left")
    greedy = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **GEN)
    lookup = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, prompt_lookup_num_tokens=3, **GEN
    )
    assert torch.equal(greedy, lookup)


def test_returned_cache_continues_like_a_fresh_prompt(model):
    ids, mask, px = make_batch([[3, "img", 2]], "left")
    first = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, return_dict_in_generate=True, **GEN
    )
    follow_up = torch.tensor([[5, 6, 7]])
    full = torch.cat([first.sequences, follow_up], dim=1)
    full_mask = torch.ones_like(full)
    continued = model.generate(input_ids=full, attention_mask=full_mask, cache=first.cache, do_sample=False, **GEN)
    fresh = model.generate(input_ids=full, attention_mask=full_mask, pixel_values=px, do_sample=False, **GEN)
    assert torch.equal(continued, fresh)


def test_batch_equals_rows_alone(model):
    ids, mask, px = make_batch(ROWS, "left")
    batched = _new(model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **GEN), ids)
    image_start = 0
    for row, recipe in enumerate(ROWS):
        n_images = recipe.count("img")
        row_ids = ids[row : row + 1, mask[row].bool()]  # the same tokens, without padding
        row_px = px[image_start : image_start + n_images] if n_images else None
        image_start += n_images
        alone = model.generate(
            input_ids=row_ids, attention_mask=torch.ones_like(row_ids), pixel_values=row_px, do_sample=False, **GEN
        )
        assert torch.equal(batched[row], _new(alone, row_ids)[0])


def test_decode_steps_are_plain_decoder_steps(model):
    """The vision tower and the projectors run once per prompt (prefill); decode steps never touch them."""
    calls = {"vision": 0, "projector": 0}
    hooks = [
        model.model.vision_tower.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    ]
    for projector in model.model.multi_modal_projector:
        hooks.append(projector.register_forward_hook(lambda *a: calls.__setitem__("projector", calls["projector"] + 1)))
    ids, mask, px = make_batch(ROWS, "left")
    state_before = {name: dict(vars(module)).keys() for name, module in model.named_modules()}
    model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **GEN)
    for hook in hooks:
        hook.remove()
    assert calls == {"vision": 1, "projector": model.config.text_config.num_hidden_layers}
    state_after = {name: dict(vars(module)).keys() for name, module in model.named_modules()}
    assert state_before == state_after  # no state left on the model between calls


def test_text_streamer_streams_the_generated_text(model, capsys):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0")
    ids, mask, px = make_batch([[3, "img", 2]], "left")
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, streamer=streamer, **GEN)
    printed = capsys.readouterr().out.strip()
    assert printed == tokenizer.decode(_new(out, ids)[0]).strip()
    assert printed  # something was streamed


def test_prompt_ending_in_placeholders_is_rejected(model):
    ids, mask, px = make_batch([[3, "img"]], "left")
    with pytest.raises(ValueError, match="ends in image placeholders"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, **GEN)


def test_inputs_embeds_prompt_equals_input_ids(model):
    """Placeholders are found by their embedding when only `inputs_embeds` is given (as in Llava)."""
    ids, mask, px = make_batch([[3, "img", 2]], "left")
    embeds = model.get_input_embeddings()(ids).detach()
    by_ids = model.generate(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **GEN)
    by_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, pixel_values=px, do_sample=False, **GEN)
    assert torch.equal(_new(by_ids, ids), by_embeds)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.lists(st.one_of(st.integers(1, 4), st.just("img")), min_size=0, max_size=4).map(lambda r: r + [2]),
        min_size=1,
        max_size=3,
    )
)
def test_cached_equals_uncached_over_layouts(model, rows):
    """Greedy generation with the cache equals uncached recomputation for any left-padded layout."""
    ids, mask, px = make_batch(rows, "left")
    kw = dict(input_ids=ids, attention_mask=mask, pixel_values=px, do_sample=False, **GEN)
    assert torch.equal(model.generate(**kw), model.generate(use_cache=False, **kw))


def test_beam_search_from_inputs_embeds_keeps_each_rows_images(model):
    ids, mask, px = make_batch(ROWS, "left")
    embeds = model.get_input_embeddings()(ids).detach()
    kw = dict(attention_mask=mask, pixel_values=px, num_beams=2, do_sample=False, **GEN)
    by_ids = model.generate(input_ids=ids, **kw)
    by_embeds = model.generate(inputs_embeds=embeds, **kw)
    assert torch.equal(_new(by_ids, ids), by_embeds)
