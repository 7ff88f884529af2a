"""ShortV's Layer Contribution tool: LC 0 for a layer that leaves visual rows unchanged, equality with a
brute-force loop (full prefill per layer, frozen layer written here), batching/padding, the preset file."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, tiny_llava
from transformers import LlavaForConditionalGeneration

from modeling_saisa import layer_contribution as LC

IMAGE = IMAGE_TOKEN_ID


def _llava(layers: int = 4) -> LlavaForConditionalGeneration:
    return tiny_llava(layers=layers, vision_overrides=dict(hidden_size=24, intermediate_size=40))


torch.manual_seed(1)
PIXELS = torch.randn(2, 3, 8, 8)


def _batch(rows: list[list[int]], pixels: torch.Tensor = PIXELS) -> dict[str, torch.Tensor]:
    """Left-padded rows; every row holds one 16-token image."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels[: len(rows)]}


ROWS = [[1, 5, *[IMAGE] * 16, 7, 8, 9], [1, 6, 4, *[IMAGE] * 16, 11, 12, 13, 14, 3]]


@torch.no_grad()
def _brute_force(model, batch) -> torch.Tensor:
    """For each layer: a full prefill with that layer's visual rows reset to its input after it runs."""
    is_visual = batch["input_ids"] == IMAGE
    rows = torch.arange(len(is_visual))
    last = batch["attention_mask"].shape[1] - 1  # left padding: every prompt ends at the last column
    batch = {**batch, "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    z_orig = model(**batch).logits[:, last]
    out = []
    for layer in model.model.language_model.layers:

        def hook(_m, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            return torch.where(is_visual[..., None], x, output)

        handle = layer.register_forward_hook(hook, with_kwargs=True)
        z_i = model(**batch).logits[rows, last]
        handle.remove()
        p_i = torch.softmax(z_i.float(), -1)
        kl = torch.nn.functional.kl_div(torch.log_softmax(z_orig.float(), -1), p_i, reduction="batchmean")
        out.append(float(kl))
    return torch.tensor(out)


def test_lc_equals_brute_force_and_batching() -> None:
    model = _llava()
    batch = _batch(ROWS)
    lc = LC.layer_contributions(model, [batch], progress=False)
    torch.testing.assert_close(lc, _brute_force(model, batch), rtol=1e-4, atol=1e-7)
    assert (lc[:-1] > 0).all()
    assert lc[-1] == 0  # the last layer's visual outputs feed no later layer: frozen there changes nothing
    # one prompt per batch (no padding) gives the same mean
    singles = [_batch([r], PIXELS[i : i + 1]) for i, r in enumerate(ROWS)]
    torch.testing.assert_close(LC.layer_contributions(model, singles, progress=False), lc, rtol=1e-3, atol=1e-6)


def test_layer_leaving_visual_rows_unchanged_has_lc_zero() -> None:
    model = _llava()
    layer = model.model.language_model.layers[2]
    with torch.no_grad():  # attention output and FFN output both zero: every row passes through unchanged
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    lc = LC.layer_contributions(model, [_batch(ROWS)], progress=False)
    assert lc[2] == 0
    assert (lc[[0, 1]] > 0).all()
    assert LC.lc_order(lc)[:2] == [2, 3]


def test_last_positions_left_and_right_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert LC.last_positions(mask).tolist() == [3, 2, 3]
    with pytest.raises(ValueError, match="batch, seq"):
        LC.last_positions(torch.ones(4))


def test_preset_file_and_plot(tmp_path) -> None:
    lc = torch.tensor([0.3, 0.01, 0.2, 0.0, 0.5])
    path = tmp_path / "p" / "visual_policy.json"
    policy = LC.write_policy_preset(str(path), lc, 2, source="tiny")
    assert policy == ["dense", "frozen", "dense", "frozen", "dense"]
    data = json.loads(path.read_text())
    assert data["visual_policy"] == policy
    assert data["lc_order"] == [3, 1, 2, 0, 4]
    assert data["replaced_layers_in_lc_order"] == [3, 1]
    with pytest.raises(ValueError, match=r"within 0\.\.5"):
        LC.write_policy_preset(str(path), lc, 6)
    png = tmp_path / "lc.png"
    LC.plot_layer_contributions(str(png), lc, 2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lc.png", "p"]  # no temp files left


def test_preset_round_trips_into_from_llava(tmp_path) -> None:
    policies = pytest.importorskip("modeling_saisa.policies", reason="needs the per-layer policy core (issue 10)")
    from modeling_saisa import SaisaForConditionalGeneration

    model = _llava()
    lc = LC.layer_contributions(model, [_batch(ROWS)], progress=False)
    path = str(tmp_path / "visual_policy.json")
    policy = LC.write_policy_preset(path, lc, 2)
    assert policies.resolve_visual_policy(path, 4) == policy
    saisa = SaisaForConditionalGeneration.from_llava(model, visual_policy=path)
    assert list(saisa.config.visual_policy) == policy


def test_rejects_models_without_layers() -> None:
    with pytest.raises(TypeError, match="language_model.layers"):
        LC.layer_contributions(torch.nn.Linear(2, 2), [], progress=False)


TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }} : {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


@pytest.mark.slow
def test_cli_writes_order_preset_and_plot(tmp_path, capsys) -> None:
    import PIL.Image
    from transformers import CLIPImageProcessor, LlavaProcessor

    from modeling_saisa.cli import main
    from modeling_saisa.tokenizers import build_word_tokenizer

    model_dir = tmp_path / "llava"
    model = _llava()
    model.save_pretrained(model_dir)
    tok = build_word_tokenizer("USER ASSISTANT : what color is it a red cat".split(), vocab_size=99)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy: 16 tokens per image
        chat_template=TEMPLATE,
    ).save_pretrained(model_dir)
    PIL.Image.new("RGB", (9, 7), (200, 30, 30)).save(tmp_path / "red.png")
    rows = [
        {
            "id": str(i),
            "image": "red.png",
            "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": "a red cat"}],
        }
        for i, q in enumerate(["what color is it", "what is it", "color"])
    ]
    (tmp_path / "calib.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    argv = ["lc", str(model_dir), "--data", str(tmp_path / "calib.json"), "--layers", "2", "--out", str(out)]
    assert main([*argv, "--batch-size", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "visual_policy.json").read_text())
    assert data["visual_policy"].count("frozen") == 2
    assert f"order: {','.join(map(str, data['lc_order']))}" in printed
    assert (out / "lc.png").read_bytes()[:4] == b"\x89PNG"
    # batch size does not change the values (padding handled)
    assert main([*argv, "--batch-size", "1", "--no-progress", "--out", str(tmp_path / "b1")]) == 0
    again = json.loads((tmp_path / "b1" / "visual_policy.json").read_text())
    torch.testing.assert_close(
        torch.tensor(again["layer_contribution"]), torch.tensor(data["layer_contribution"]), rtol=1e-3, atol=1e-6
    )
    assert main(["lc", str(tmp_path), "--data", str(tmp_path / "calib.json")]) == 2  # not a model dir
    # the preset drives `saisa generate` on the llava-hf directory (loaded through from_llava)
    gen = ["generate", "--model", str(model_dir), "--image", str(tmp_path / "red.png"), "--prompt", "what color is it"]
    assert main([*gen, "--visual-policy", str(out / "visual_policy.json"), "--max-new-tokens", "2"]) == 0
