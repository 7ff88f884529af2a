"""Bad input gets a clear ValueError that says what was expected and what came."""

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, make_batch, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_placeholder_count_must_match_images(model):
    ids, mask, px = make_batch([[2, "img", 3]], "left")
    two = torch.cat([px, px])
    with pytest.raises(ValueError, match=r"16 placeholder tokens .*2 images x image_seq_length 16 = 32"):
        model(input_ids=ids, attention_mask=mask, pixel_values=two)


def test_placeholders_without_pixel_values(model):
    ids, mask, _ = make_batch([[2, "img", 3]], "left")
    with pytest.raises(ValueError, match=f"16 image placeholder tokens \\(id {IMAGE_TOKEN_ID}\\) but no pixel_values"):
        model(input_ids=ids, attention_mask=mask)


def test_pixel_values_without_placeholders(model):
    ids, mask, _ = make_batch([[5]], "left")
    with pytest.raises(ValueError, match=r"0 placeholder tokens .*1 images x image_seq_length 16 = 16"):
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (1, 1, 8, 8), (3, 8, 8)])
def test_pixel_values_of_the_wrong_shape(model, shape):
    ids, mask, _ = make_batch([[2, "img", 3]], "left")
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(n_images, 3, 8, 8\); got"):
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(*shape))


def test_image_split_across_rows(model):
    ids, mask, px = make_batch([[2, "img", 3], [6]], "left")
    ids[1, -3:] = IMAGE_TOKEN_ID  # three stray placeholders in row 1, 13 missing in row 0
    row0 = (ids[0] == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    ids[0, row0[:3]] = 5
    with pytest.raises(ValueError, match="not a multiple of image_seq_length 16"):
        model(input_ids=ids, attention_mask=mask, pixel_values=px)


def test_sequence_longer_than_the_backbone(model):
    n = model.config.text_config.max_position_embeddings
    ids = torch.randint(3, 90, (1, n + 1))
    with pytest.raises(ValueError, match=f"position {n} reached, but the backbone has max_position_embeddings={n}"):
        model(input_ids=ids)


def test_exactly_one_of_ids_or_embeds(model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_unsupported_backbone_names_the_supported_ones():
    from tiny import tiny_config

    with pytest.raises(
        ValueError, match=r"\['llama', 'mistral', 'qwen2', 'qwen3'\]; got text_config.model_type='gpt2'"
    ):
        tiny_config(text_config={"model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"vision towers .*got vision_config.model_type='vit'"):
        tiny_config(vision_config={"model_type": "vit"})
