"""The communication calculator: parameter counts, byte counts, the 1006x assumptions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from bench import comm_calc as cc
from bench.comm_calc import MODELS, PAPER_SCENARIO, Scenario, TextTraffic, compare, lora_param_count
from schemas.codec import decode_generation, decode_reply, encode

SMOL = MODELS["SmolLM2-135M"]
LLAMA_405B = MODELS["Llama-3.1-405B"]


def test_smollm2_lora_r16_on_all_linear_layers_is_about_4_9_million_parameters() -> None:
    assert lora_param_count(SMOL, 16, "all") == pytest.approx(4.9e6, rel=0.02)


def test_lora_counts_follow_the_projection_shapes() -> None:
    # q: 576 -> 576, v: 576 -> 192 (3 KV heads of 64): r * (in + out) each, 30 layers.
    assert lora_param_count(SMOL, 8, "qv") == 30 * 8 * ((576 + 576) + (576 + 192))
    assert lora_param_count(SMOL, 8, ["q_proj", "v_proj"]) == lora_param_count(SMOL, 8, "qv")
    with pytest.raises(ValueError, match="lm_head"):
        lora_param_count(SMOL, 8, ["lm_head"])


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("SmolLM2-135M", 134_515_008),
        ("Llama-3.1-8B", 8_030_261_248),
        ("Llama-3.1-70B", 70_553_706_496),
        ("Llama-3.1-405B", 405_853_388_800),
    ],
)
def test_parameter_totals_match_the_published_checkpoints(name: str, published: int) -> None:
    assert MODELS[name].total_params() == published


@pytest.mark.parametrize(("dtype", "size"), [("bf16", 2), ("fp32", 4)])
def test_full_weight_bytes_are_params_times_dtype_size_each_way(dtype: cc.Dtype, size: int) -> None:
    row = compare(LLAMA_405B, Scenario(full_dtype=dtype))
    assert row.full_bytes == 2 * LLAMA_405B.total_params() * size


def test_lora_bytes_are_adapter_params_times_dtype_size_each_way() -> None:
    row = compare(SMOL, Scenario(lora_rank=16, lora_targets="all", lora_dtype="fp32"))
    assert row.lora_bytes == 2 * 4_884_480 * 4


def test_consensus_bytes_do_not_depend_on_model_size() -> None:
    rows = [compare(config, Scenario()) for config in MODELS.values()]
    assert len({row.consensus_bytes for row in rows}) == 1
    assert rows[-1].lora_ratio > rows[0].lora_ratio * 50


def test_consensus_bytes_scale_with_prompts_and_answer_length() -> None:
    base = TextTraffic(prompts=1_000, answer_tokens=64)
    one = sum(cc.consensus_bytes(base))
    assert sum(cc.consensus_bytes(replace(base, prompts=2_000))) == pytest.approx(2 * one, rel=0.01)
    assert sum(cc.consensus_bytes(replace(base, answer_tokens=128))) > 1.5 * one
    assert one > cc.raw_text_bytes(base)


def test_consensus_bytes_come_from_real_messages_the_codec_accepts() -> None:
    traffic = TextTraffic(prompts=3, answer_tokens=10, shards=1)
    batch, labels = cc.sample_generation_batch(traffic, 3), cc.sample_pseudo_labels(traffic, 3)
    assert decode_generation(encode(batch)) == batch
    assert decode_reply(encode(labels)) == labels
    assert cc.consensus_bytes(traffic) == (len(encode(batch)), len(encode(labels)))
    answer_framing, label_framing = cc.framing_per_answer(traffic)
    # The keys "prompt_id", "text", "prompt_tokens", "completion_tokens" alone take 44 bytes.
    assert 44 < answer_framing < 200 and 44 < label_framing < 200


def test_large_prompt_budgets_split_into_messages_the_schema_accepts() -> None:
    traffic = TextTraffic(prompts=20_000, answer_tokens=8, shards=1)
    sizes = traffic.shard_sizes()
    assert sum(sizes) == 20_000 and max(sizes) <= cc.MAX_PROMPTS_PER_MESSAGE
    biggest = cc.sample_generation_batch(traffic, max(sizes))
    assert decode_generation(encode(biggest)) == biggest


def test_the_1006x_assumptions_reproduce_the_paper_figure_within_one_percent() -> None:
    row = compare(LLAMA_405B, PAPER_SCENARIO)
    assert row.lora_ratio == pytest.approx(cc.PAPER_RATIO, rel=0.01)


def test_the_text_only_reading_of_1006x_is_also_within_one_percent() -> None:
    traffic = TextTraffic(prompts=1_000, answer_tokens=100)
    lora_bytes = 2 * lora_param_count(LLAMA_405B, 16, "qv") * 4
    assert lora_bytes / cc.raw_text_bytes(traffic) == pytest.approx(cc.PAPER_RATIO, rel=0.01)


def test_cli_prints_a_markdown_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "comm.json"
    argv = ["--prompts", "500", "--answer-tokens", "32", "--lora-rank", "8", "--targets", "qv"]
    assert cc.main([*argv, "--dtype", "bf16", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| model |") and "Llama-3.1-405B" in printed and "Assumptions" in printed
    report = json.loads(out.read_text())
    assert report["scenario"]["traffic"]["prompts"] == 500 and report["scenario"]["lora_dtype"] == "bf16"
    assert [row["model"] for row in report["rows"]] == list(MODELS)
