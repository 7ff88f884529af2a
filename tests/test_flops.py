"""The analytic FLOPs count: published figures, and a cross-check against `torch.utils.flop_counter`.

How `FlopCounterMode` maps onto the papers' convention (also in docs/benchmarks.md):

- Both count 2 x MACs of matrix products only: `aten.mm` / `addmm` / `bmm` / `baddbmm` / `convolution` (bias adds,
  norms, activations, softmax, RoPE, embeddings, gathers are 0 in both).
- Attention: with `attn_implementation="eager"` the two attention products are `matmul`s over the full key range,
  so the counter gives exactly ``4 * q_rows * k_rows * n_heads * head_dim`` - the papers' uncausal-halved term
  (GQA keys are repeated to the query heads before the product, so GQA does not reduce it). On CPU,
  `sdpa` dispatches to `aten._scaled_dot_product_flash_attention_for_cpu`, which the counter has no formula for:
  it counts attention as **0** there (on CUDA it counts the sdpa kernels in full, causal or not). The tests
  therefore run eager attention.
- Backward: each `mm` whose input needs a gradient counts twice its forward (grad-input + grad-weight); a first
  layer reading a frozen tensor (the projectors' `linear_1` on frozen vision features) counts once; eager
  attention's products count twice. That is the "3 x forward for trained parts, forward only for the frozen
  tower" estimate of `llava_train_flops` / `saisa_train_flops`, exactly. (The counter's per-module split of
  backward FLOPs is unreliable - backward of one module is charged to modules that are still "open" - so the
  tests compare the global total and only use per-module counts of forward passes.)
- The counter counts everything that runs: vision tower and `lm_head` too. The tests subtract the forward-only
  per-module counts of `vision_tower` and `lm_head` (both checked against their own formulas) to isolate the
  papers' quantity (decoder + projectors).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_llava
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, LlavaConfig, LlavaForConditionalGeneration

from modeling_saisa import flops as F
from modeling_saisa.cli import main as cli_main

T, V = 64, 576


# ------------------------------------------------------------------ published figures (spec §5)
def test_llava_15_7b_dense() -> None:
    assert round(F.flops_report("llava-1.5-7b", T, V)["dense"] / 1e12, 2) == 8.50


def test_saisa_7b_with_and_without_projectors() -> None:
    r = F.flops_report("llava-1.5-7b", T, V)
    assert round(r["saisa"] / 1e12, 2) == 2.86
    assert round(r["saisa_llm_only"] / 1e12, 2) == 2.09
    assert round(100 * r["saisa_reduction"], 1) == 66.4


def test_llava_15_13b_dense() -> None:
    assert round(F.flops_report("llava-1.5-13b", T, V)["dense"] / 1e12, 1) == 16.6


def test_shortv_19_layers_on_7b() -> None:
    r = F.flops_report("llava-1.5-7b", T, V, shortv_layers=19)
    assert round(r["shortv"] / 1e12, 1) == 4.7


def test_llava_next_counts_2880_visual_tokens() -> None:
    r = F.flops_report("llava-next-7b")
    assert r["visual_tokens"] == 2880 and r["shape"]["images"] == 5
    assert r["dense"] == 32 * (2 * 2944 * (4 * 4096 + 3 * 11008) * 4096 + 4 * 2944**2 * 4096)


def test_mha_reduces_to_the_papers_formulas() -> None:
    s, h, m = F.PRESETS["llava-1.5-7b"].text, 4096, 11008
    assert F.dense_layer_flops(s, T, V) == 2 * (T + V) * (4 * h + 3 * m) * h + 4 * (T + V) ** 2 * h
    assert F.kv_only_layer_flops(s, T, V) == 2 * T * (4 * h + 3 * m) * h + 4 * V * h * h + 4 * T * (T + V) * h
    assert F.projector_flops(1024, h, V) == 2 * V * (1024 * h + h * h)


def test_gqa_scales_every_kv_projection() -> None:
    mha = F.TextShape(hidden=4096, intermediate=14336, layers=32, n_heads=32, n_kv_heads=32, head_dim=128)
    gqa = F.TextShape(hidden=4096, intermediate=14336, layers=32, n_heads=32, n_kv_heads=8, head_dim=128)
    h, kv_ratio = 4096, 8 / 32
    # the visual k/v term 4vh^2 scales by n_kv/n_heads ...
    visual_kv = 4 * V * h * h
    text_kv = 2 * T * 2 * h * h  # ... and so do the text rows' k/v projections (2 of the "4h")
    assert F.kv_only_layer_flops(mha, T, V) - F.kv_only_layer_flops(gqa, T, V) == (visual_kv + text_kv) * (1 - kv_ratio)
    assert F.dense_layer_flops(mha, T, V) - F.dense_layer_flops(gqa, T, V) == 2 * (T + V) * 2 * h * h * (1 - kv_ratio)


def test_report_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        F.model_shape("llava-9b")
    with pytest.raises(ValueError, match="KV-only layers"):
        F.flops_report("llava-1.5-7b", shortv_layers=33)


# ------------------------------------------------------------------ shapes from configs
def test_shape_from_llava_config_and_json(tmp_path) -> None:
    cfg = LlavaConfig()  # llava-1.5-7b defaults: CLIP-L/336 + Llama-7B shape
    assert F.model_shape(cfg) == F.PRESETS["llava-1.5-7b"]
    cfg.save_pretrained(tmp_path)
    assert F.model_shape(str(tmp_path)) == F.PRESETS["llava-1.5-7b"]
    assert F.model_shape(tmp_path / "config.json") == F.PRESETS["llava-1.5-7b"]


def test_shape_from_original_saisa_checkpoint_config(tmp_path) -> None:
    raw = dict(
        model_type="llava_llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        mm_hidden_size=1024,
        mm_vision_tower="openai/clip-vit-large-patch14-336",
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert F.model_shape(str(tmp_path)) == F.PRESETS["llava-1.5-7b"]


def test_cli_json(capsys) -> None:
    assert cli_main(["flops", "--json", "--preset", "llava-1.5-7b", "--shortv-layers", "19"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"dense", "saisa", "saisa_llm_only", "shortv"} <= set(out)
    assert all(isinstance(out[k], int | float) for k in ("dense", "saisa", "saisa_llm_only"))
    assert round(out["saisa"] / 1e12, 2) == 2.86


def test_cli_table_and_errors(capsys) -> None:
    assert cli_main(["flops", "--text-tokens", "128"]) == 0
    assert "SAISA (LLM + projectors)" in capsys.readouterr().out
    assert cli_main(["flops", "--model", "/nonexistent/dir"]) == 2
    err = capsys.readouterr().err
    assert "--model '/nonexistent/dir': no such model directory or config.json" in err and "preset" not in err


@pytest.mark.parametrize("full_clip", [False, True])
def test_cli_original_config_reads_a_local_tower_config(tmp_path, capsys, full_clip) -> None:
    """`mm_vision_tower` naming a local directory: its config decides the patch count, not the name."""
    from transformers import CLIPConfig, CLIPVisionConfig

    tower = tmp_path / "my-clip-vit-large-patch14-336"  # the name says 576 patches; the config says 16
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    vision.update(image_size=8, patch_size=2)
    (CLIPConfig(vision_config=vision) if full_clip else CLIPVisionConfig(**vision)).save_pretrained(tower)
    raw = dict(
        model_type="llava_llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=99,
        mm_hidden_size=32,
        mm_vision_tower=str(tower),
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert cli_main(["flops", "--model", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == 16
    assert out["shape"]["vision"]["patch_size"] == 2 and out["shape"]["vision"]["image_size"] == 8


# ------------------------------------------------------------------ FlopCounterMode cross-checks
def _count(fn) -> tuple[int, dict[str, int]]:
    with FlopCounterMode(display=False) as counter:
        fn()
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def _text_config(**overrides) -> dict:
    base = dict(
        model_type="llama",
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return {**base, **overrides}


@pytest.mark.parametrize(
    "text_kw",
    [dict(num_key_value_heads=4), dict(), dict(model_type="qwen3", head_dim=16)],  # MHA, GQA, q_dim != hidden
    ids=["mha", "gqa", "qwen3-head-dim"],
)
def test_dense_formula_matches_flop_counter_on_a_plain_decoder(text_kw: dict) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**_text_config(**text_kw))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg).eval()
    n = 23
    with torch.no_grad():
        counted, _ = _count(lambda: model(input_ids=torch.randint(3, 90, (1, n))))
    shape = F.model_shape(cfg).text
    # dense layer on n rows == kv-only formula with every row a text row
    assert counted == cfg.num_hidden_layers * F.dense_layer_flops(shape, n, 0)
    assert F.dense_layer_flops(shape, 7, 16) == F.dense_layer_flops(shape, 23, 0)


def _llava() -> LlavaForConditionalGeneration:
    # A vision width (24) other than the text width (32): the projector formula cannot confuse d_vision with h.
    return tiny_llava(layers=3, vision_overrides=dict(hidden_size=24, intermediate_size=40))


def _prompt(image_token_id: int = 98, n_v: int = 16) -> torch.Tensor:
    return torch.tensor([[1, 5, 6] + [image_token_id] * n_v + [7, 8, 9, 10]])  # t = 7 text tokens


def test_llava_prefill_and_train_step_match_flop_counter() -> None:
    model = _llava().eval()
    ids, px = _prompt(), torch.randn(1, 3, 8, 8)
    shape = F.model_shape(model.config)
    t, v = 7, 16
    with torch.no_grad():
        total, per = _count(lambda: model(input_ids=ids, pixel_values=px))
    expected = F.llava_prefill_flops(shape, t, v, lm_head_rows=t + v)  # a plain forward computes every logit
    assert per["LlavaForConditionalGeneration.model.vision_tower"] == expected.vision
    assert per["LlavaForConditionalGeneration.model.multi_modal_projector"] == expected.projector
    assert per["LlavaForConditionalGeneration.model.language_model"] == expected.llm
    assert per["LlavaForConditionalGeneration.lm_head"] == expected.lm_head
    assert total == expected.total

    model.train()
    model.model.vision_tower.requires_grad_(False)
    total, _ = _count(lambda: model(input_ids=ids, pixel_values=px, labels=ids).loss.backward())
    assert total == F.llava_train_flops(shape, t, v).total


def _saisa_model():
    tiny = pytest.importorskip("tiny", reason="tests/tiny.py needs the SAISA model")
    return tiny, tiny.tiny_model(attn="eager")


def test_saisa_prefill_matches_flop_counter() -> None:
    """The real SAISA model executes exactly the papers' KV-only count: no visual q/o/FFN/attention rows."""
    tiny, model = _saisa_model()
    cfg = model.config
    v = cfg.image_seq_length
    ids = _prompt(tiny.IMAGE_TOKEN_ID, v)
    t = ids.shape[1] - v
    px = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    shape = F.model_shape(cfg)
    with torch.no_grad():
        total, per = _count(lambda: model(input_ids=ids, pixel_values=px, logits_to_keep=1))
    expected = F.saisa_prefill_flops(shape, t, v, lm_head_rows=1)
    vision = per["SaisaForConditionalGeneration.model.vision_tower"]
    lm_head = per["SaisaForConditionalGeneration.lm_head"]
    assert vision == expected.vision
    assert lm_head == expected.lm_head
    assert total - vision - lm_head == expected.llm_and_projector


def test_saisa_train_step_matches_flop_counter() -> None:
    tiny, model = _saisa_model()
    cfg = model.config
    v = cfg.image_seq_length
    ids = _prompt(tiny.IMAGE_TOKEN_ID, v)
    t = ids.shape[1] - v
    px = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    model.train()
    model.model.vision_tower.requires_grad_(False)
    labels = ids.masked_fill(ids == tiny.IMAGE_TOKEN_ID, -100)
    rows: list[int] = []  # lm_head's input rows: an implementation choice (text rows only is the ideal, `t`)
    hook = model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0][..., 0].numel()))
    total, _ = _count(lambda: model(input_ids=ids, pixel_values=px, labels=labels).loss.backward())
    hook.remove()
    shape = F.model_shape(cfg)
    expected = F.saisa_train_flops(shape, t, v)
    assert total == expected.vision + expected.llm + expected.projector + 3 * F.lm_head_flops(shape.text, rows[0])
    assert rows == [t], "SAISA should compute logits at the text rows only"


# ------------------------------------------------------------------ per-layer visual policies (policies.md)
SHORTV_7B = [31, 29, 30, 28, 0, 26, 27, 25, 24, 22, 23, 21, 2, 3, 20, 18, 17, 12, 19]
SHORTV_13B = [39, 32, 28, 36, 27, 37, 29, 30, 1, 38, 25, 31, 2, 26, 23, 34, 0, 33, 35, 22, 24, 21, 20, 17]
POLICIES = ("dense", "frozen", "naavit", "composite", "composite_noffn", "injected")


def _shortv(layers: int, frozen: list[int]) -> list[str]:
    return ["frozen" if i in frozen else "dense" for i in range(layers)]


@pytest.mark.parametrize(
    ("preset", "frozen", "tflops"), [("llava-1.5-7b", SHORTV_7B, 4.7), ("llava-1.5-13b", SHORTV_13B, 9.1)]
)
def test_shortv_published_lists_reproduce_the_papers_tflops(preset: str, frozen: list[int], tflops: float) -> None:
    shape = F.model_shape(preset)
    r = F.flops_report(preset, T, V, visual_policy=_shortv(shape.text.layers, frozen))
    assert round(r["policy"] / 1e12, 1) == tflops
    assert r["policy"] == F.flops_report(preset, T, V, shortv_layers=len(frozen))["shortv"]


def test_uniform_policies_reduce_to_llava_and_saisa() -> None:
    shape = F.model_shape("llava-1.5-7b")
    layers = shape.text.layers
    assert F.policy_prefill_flops(shape, ["dense"] * layers, T, V, skip_last_visual_update=False) == (
        F.llava_prefill_flops(shape, T, V)
    )
    assert F.policy_prefill_flops(shape, ["injected"] * layers, T, V) == F.saisa_prefill_flops(shape, T, V)
    r = F.flops_report(shape, T, V, visual_policy=["injected"] * layers)
    assert r["policy"] == r["saisa"]
    # ordering of the per-layer costs: what each policy keeps for the visual rows
    cost = {p: F.policy_layer_flops(shape.text, p, T, V) for p in POLICIES}
    assert cost["frozen"] == cost["injected"] < cost["composite_noffn"] < cost["naavit"] < cost["composite"]
    assert cost["composite"] < cost["dense"]


def test_policy_errors() -> None:
    shape = F.model_shape("llava-1.5-7b")
    with pytest.raises(ValueError, match="unknown visual policy 'sparse'"):
        F.policy_layer_flops(shape.text, "sparse", T, V)
    with pytest.raises(ValueError, match=r"one entry per decoder layer \(32\), got 3"):
        F.policy_prefill_flops(shape, ["dense"] * 3, T, V)


def _policy_layer_by_hand(layer, cfg, x: torch.Tensor, is_visual: torch.Tensor, policy: str) -> None:
    """What one decoder layer must compute under `policy`, written from the spec with the layer's own modules:
    text rows get everything; visual rows k/v only, plus what the policy keeps (no rotary: no FLOPs)."""
    attn, heads, kv = layer.self_attn, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = attn.head_dim
    h = layer.input_layernorm(x)
    text, vis = h[~is_visual], h[is_visual]
    q = attn.q_proj(text).view(-1, heads, hd).transpose(0, 1)
    k = attn.k_proj(h).view(-1, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, 0)
    val = attn.v_proj(h).view(-1, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, 0)
    out = torch.matmul(torch.matmul(q, k.transpose(1, 2)).softmax(-1), val).transpose(0, 1).reshape(len(text), -1)
    layer.mlp(layer.post_attention_layernorm(x[~is_visual] + attn.o_proj(out)))
    v_rows = val[:, is_visual].transpose(0, 1).reshape(int(is_visual.sum()), -1)  # self-only attention: its value
    if policy in ("composite", "composite_noffn"):
        vis = vis + attn.o_proj(v_rows)
    if policy in ("naavit", "composite"):
        layer.mlp(layer.post_attention_layernorm(vis))


@pytest.mark.parametrize("policy", ["frozen", "naavit", "composite", "composite_noffn"])
@pytest.mark.parametrize(
    "text_kw",
    [dict(num_key_value_heads=4), dict(), dict(model_type="qwen3", head_dim=16)],
    ids=["mha", "gqa", "qwen3-head-dim"],
)
def test_policy_layer_formula_matches_flop_counter(policy: str, text_kw: dict) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**_text_config(**text_kw))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    layer = AutoModel.from_config(cfg).layers[0]
    t, v = 7, 16
    is_visual = torch.zeros(t + v, dtype=torch.bool)
    is_visual[3 : 3 + v] = True
    x = torch.randn(t + v, cfg.hidden_size)
    with torch.no_grad():
        counted, _ = _count(lambda: _policy_layer_by_hand(layer, cfg, x, is_visual, policy))
    assert counted == F.policy_layer_flops(F.model_shape(cfg).text, policy, t, v)


@pytest.mark.parametrize(
    "policy",
    [["dense", "frozen"], ["frozen", "dense"], ["naavit", "composite"], ["composite_noffn", "dense"]],
    ids=lambda p: "-".join(p),
)
def test_from_llava_policies_match_flop_counter(policy: list[str]) -> None:
    """The real model runs exactly the per-policy count: no visual q/o/attention rows/FFN where removed."""
    pytest.importorskip("modeling_saisa.policies", reason="needs the per-layer policy core (issue 10)")
    from modeling_saisa import SaisaForConditionalGeneration

    llava = _llava().eval()
    policy = [*policy, "dense"]  # the tiny model's 3 layers
    model = SaisaForConditionalGeneration.from_llava(llava, visual_policy=policy)
    model.set_attn_implementation("eager")
    ids, px = _prompt(), torch.randn(1, 3, 8, 8)
    t, v = 7, 16
    with torch.no_grad():
        total, per = _count(lambda: model(input_ids=ids, pixel_values=px, logits_to_keep=1))
    expected = F.policy_prefill_flops(F.model_shape(llava.config), policy, t, v, lm_head_rows=1)
    assert total == expected.total


def test_cli_visual_policy(capsys) -> None:
    pytest.importorskip("modeling_saisa.policies", reason="needs the per-layer policy core (issue 10)")
    assert cli_main(["flops", "--json", "--visual-policy", "shortv-llava-1.5-7b"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(out["policy"] / 1e12, 1) == 4.7
    assert out["visual_policy"] == _shortv(32, SHORTV_7B)
    assert cli_main(["flops", "--visual-policy", "composite"]) == 0
    assert "--visual-policy composite" in capsys.readouterr().out


def test_saisa_mixed_policies_match_flop_counter() -> None:
    """A SAISA model whose list mixes `injected` with carried-state policies runs exactly the per-policy count."""
    pytest.importorskip("modeling_saisa.policies", reason="needs the per-layer policy core (issue 10)")
    tiny, model = _saisa_model()
    cfg = model.config
    layers = cfg.text_config.num_hidden_layers
    policy = (["injected", "composite", "dense", "naavit", "frozen"] * layers)[:layers]
    cfg.visual_policy = policy
    v = cfg.image_seq_length
    ids = _prompt(tiny.IMAGE_TOKEN_ID, v)
    t = ids.shape[1] - v
    px = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with torch.no_grad():
        total, _ = _count(lambda: model(input_ids=ids, pixel_values=px, logits_to_keep=1))
    assert total == F.policy_prefill_flops(F.model_shape(cfg), policy, t, v, lm_head_rows=1).total
