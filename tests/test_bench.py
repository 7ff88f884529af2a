"""Smoke test of `saisa bench --quick`: every figure is produced and finite (no timing is asserted: CI machines are
noisy; the targets are judged in docs/benchmarks.md from a real run)."""

from __future__ import annotations

import json
import math

import pytest

from modeling_saisa.cli import main as cli_main

RATIO_KEYS = (
    "prefill_llm_ratio",
    "prefill_ratio",
    "decode_ratio",
    "train_step_ratio",
    "peak_memory_ratio",
    "analytic_llm_ratio",
    "analytic_prefill_ratio",
    "analytic_train_ratio",
)


@pytest.mark.slow
def test_quick_bench_produces_finite_figures(tmp_path, capsys) -> None:
    assert cli_main(["bench", "--quick", "--json", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    results = json.loads(capsys.readouterr().out)
    for key in RATIO_KEYS:
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] > 0, key
    # The analytic ratios of this shape: SAISA must be cheaper on paper, in every phase but decode.
    assert results["analytic_llm_ratio"] < results["analytic_prefill_ratio"] < 1
    assert results["analytic_train_ratio"] < 1
    assert results["decode_cache_length"]["saisa"] == results["decode_cache_length"]["llava"]
    assert set(results["targets"]) == {
        "prefill_llm_ratio",
        "prefill_ratio",
        "train_step_ratio",
        "decode_ratio",
        "peak_memory_ratio",
    }
    assert results["targets_apply"] is False  # a --quick shape is not what the targets are set for
    assert all(target["applies"] is False for target in results["targets"].values())
    assert json.loads((tmp_path / "bench_results.json").read_text())["prefill_ratio"] == results["prefill_ratio"]
    assert (tmp_path / "bench_ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profiler_lines_stay_off_stderr(capfd) -> None:
    """The torch profiler's native `USDT: ... profiler_start` lines must not land between the progress lines."""
    import torch

    from modeling_saisa.benchmark import peak_allocated_bytes

    assert peak_allocated_bytes(lambda: torch.ones(4096).sum()) > 0
    out, err = capfd.readouterr()
    assert "profiler_start" not in err and "profiler_stop" not in err, err
    print("still here", file=__import__("sys").stderr)  # and stderr works again afterwards
    assert "still here" in capfd.readouterr().err


def test_quick_table_says_the_targets_are_for_the_default_shape(monkeypatch, capsys) -> None:
    from pathlib import Path

    from modeling_saisa import benchmark

    recorded = json.loads((Path(__file__).parent.parent / "docs" / "bench" / "bench_results.json").read_text())
    seen = {}

    def fake_run(config, repeats=None, threads=None):
        seen["config"] = config
        return {**recorded, "targets_apply": config == benchmark.DEFAULT}

    monkeypatch.setattr(benchmark, "run_benchmark", fake_run)
    assert cli_main(["bench", "--quick"]) == 0
    assert seen["config"] == benchmark.QUICK
    assert benchmark.TARGETS_NOTE in capsys.readouterr().out
    assert cli_main(["bench"]) == 0
    assert benchmark.TARGETS_NOTE not in capsys.readouterr().out


def test_reuse_bench_tiny_shape(tmp_path) -> None:
    from modeling_saisa.benchmark import BenchConfig
    from modeling_saisa.reuse_bench import LAYOUTS, METHODS, format_reuse_table, run_reuse_benchmark

    tiny = BenchConfig(
        image_size=28, vision_hidden=32, vision_intermediate=64, vision_layers=1, vision_heads=2, hidden=32,
        intermediate=64, layers=2, heads=2, kv_heads=2, vocab=64, text_before_image=4, decode_steps=2,
    )  # fmt: skip
    results = run_reuse_benchmark(tiny, images=2, questions=2, question_tokens=3, repeats=1, progress=False)
    for layout in LAYOUTS:
        for method in METHODS:
            figures = results[layout][method]
            assert all(math.isfinite(figures[k]) and figures[k] > 0 for k in ("prefill_s", "end_to_end_s")), method
        analytic = results["analytic_speedup"][layout]
        assert analytic["saisa_store"] > analytic["saisa"] > 1 == analytic["llava_generate"]
    # A prefix cache covers the image only when it comes first.
    assert results["analytic_speedup"]["image_first"]["llava_prefix_reuse"] > 1.2
    assert results["analytic_speedup"]["question_first"]["llava_prefix_reuse"] < 1.2
    table = format_reuse_table(results)
    assert "(d) SAISA + ImageKVStore" in table and table.count("target >=") == 3
    # Every question after the first about an image is a store hit, in both phases' runs.
    for layout in LAYOUTS:
        assert results[layout]["saisa_store"]["store_stats"]["hits"] == 2 * (2 - 1)
        assert results[layout]["saisa_store"]["store_stats"]["misses"] == 2
    from modeling_saisa.reuse_bench import write_reuse_outputs

    paths = write_reuse_outputs(results, str(tmp_path))
    assert len(json.loads(open(paths["json"]).read())["targets"]) == 3
    assert open(paths["png"], "rb").read()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp*"))


TINY_POLICY_SHAPE = dict(
    image_size=28, vision_hidden=32, vision_intermediate=64, vision_layers=1, vision_heads=2, hidden=32,
    intermediate=64, heads=4, kv_heads=2, vocab=64, text_tokens=8, text_before_image=4,
)  # fmt: skip


@pytest.mark.parametrize(
    "policy_list",
    [
        None,  # transformers' Llava
        ["dense"] * 4,
        ["frozen", "dense", "naavit", "composite"],
        ["composite_noffn", "injected", "dense", "frozen"],
        ["injected"] * 4,
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_policy_products_are_exactly_the_counted_flops(policy_list, batch) -> None:
    """The plain-matmul reference times exactly the work the FLOPs formulas count (per policy, per prompt)."""
    from modeling_saisa import flops as F
    from modeling_saisa.benchmark import BenchConfig, bench_shape
    from modeling_saisa.policy_bench import policy_products

    cfg = BenchConfig(layers=4, **TINY_POLICY_SHAPE)
    shape, t, v = bench_shape(cfg), cfg.text_tokens, cfg.visual_tokens
    if policy_list is None:
        counted = F.llava_prefill_flops(shape, t, v)
    else:
        counted = F.policy_prefill_flops(shape, policy_list, t, v)
    products = policy_products(cfg, policy_list, batch)
    total = sum(2 * rows * inner * cols * heads * count for (rows, inner, cols, heads), count in products.items())
    assert total == batch * (counted.llm_and_projector + counted.lm_head)


def test_policy_bench_cli_tiny_shape(monkeypatch, tmp_path, capsys) -> None:
    """`saisa bench --visual-policy` end to end on a tiny shape: both cases, finite figures, outputs written."""
    from modeling_saisa import benchmark
    from modeling_saisa.policy_bench import policy_bench_config

    tiny = benchmark.BenchConfig(layers=2, **TINY_POLICY_SHAPE)
    monkeypatch.setattr(benchmark, "QUICK", tiny)
    argv = ["bench", "--quick", "--visual-policy", "composite", "--visual-policy", "shortv-llava-1.5-7b"]
    argv += ["--visual-policy", "frozen,dense,naavit"]
    assert cli_main([*argv, "--batch", "2", "--repeats", "1", "--json", "--out", str(tmp_path)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["visual_policy"] for r in results] == ["composite", "shortv-llava-1.5-7b", "frozen,dense,naavit"]
    assert [r["config"]["layers"] for r in results] == [2, 32, 3]  # a preset or a list brings its own depth
    assert results[2]["policy_list"] == ["frozen", "dense", "naavit"]
    assert policy_bench_config("naavit", tiny).layers == 2
    for result in results:
        assert [case["prompts"] for case in result["cases"].values()] == [1, 2]
        assert 0 < result["analytic_ratio"] < 1
        for case in result["cases"].values():
            for key in ("ratio", "matmul_only_ratio", "ratio_over_analytic"):
                assert math.isfinite(case[key]) and case[key] > 0, key
        assert set(result["target"]) == {"measured", "limit", "met"}
    assert json.loads((tmp_path / "policy_bench_results.json").read_text())[0]["policy_list"] == ["composite"] * 2
    assert (tmp_path / "policy_bench_ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))
    assert cli_main(["bench", "--visual-policy", "composite", "--batch", "1"]) != 0
    assert "--batch must be at least 2 (the batched case); got 1" in capsys.readouterr().err


def test_results_are_written_whole_or_not_at_all(tmp_path) -> None:
    """A plot that fails leaves the previous results in place and no temporary files behind."""
    from modeling_saisa.benchmark import write_results

    def plot(results, path):
        open(path, "wb").write(b"\x89PNG")

    paths = write_results({"ratio": 0.5}, str(tmp_path), "r.json", "r.png", plot)
    assert json.loads(open(paths["json"]).read()) == {"ratio": 0.5}

    def broken(results, path):
        open(path, "wb").write(b"half")
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError, match="plot failed"):
        write_results({"ratio": 0.7}, str(tmp_path), "r.json", "r.png", broken)
    assert json.loads(open(paths["json"]).read()) == {"ratio": 0.5}
    assert open(paths["png"], "rb").read() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]
