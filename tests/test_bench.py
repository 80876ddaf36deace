"""The benchmark plumbing, without running a benchmark: RESULT lines and the page run_all writes."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run_all  # noqa: E402


# -- RESULT lines ----------------------------------------------------------------------------------------------
def test_result_line_has_the_issue_keys_in_order_and_round_trips():
    line = common.format_result("train_step_vs_frozen_forward", 2.0, 1.0, 2.5, unit="s")
    assert line.startswith("RESULT name=train_step_vs_frozen_forward value=2 baseline=1 ratio=2 target=2.5 "
                           "status=met ")
    parsed = common.parse_result(line)
    assert parsed == {"name": "train_step_vs_frozen_forward", "value": 2.0, "baseline": 1.0, "ratio": 2.0,
                      "target": 2.5, "status": "met", "on": "ratio", "better": "lower", "unit": "s"}


@pytest.mark.parametrize("value, baseline, target, lower, on, status", [
    (3.0, 1.0, 2.5, True, "ratio", "missed"),      # ratio 3 > 2.5
    (0.5, 1.0, 0.6, True, "ratio", "met"),
    (0.9, 1.0, 0.8, False, "ratio", "met"),        # throughput: higher is better
    (0.7, 1.0, 0.8, False, "ratio", "missed"),
    (0.3, 0.01, 0.5, True, "value", "met"),        # absolute target: ratio 30 does not matter
    (13.7, 0.34, 0.5, True, "value", "missed"),
])
def test_status_follows_the_target_direction_and_what_it_applies_to(value, baseline, target, lower, on, status):
    line = common.format_result("m", value, baseline, target, lower_is_better=lower, on=on)
    assert common.parse_result(line)["status"] == status


def test_zero_baseline_gives_nan_ratio_and_a_missed_ratio_target():
    parsed = common.parse_result(common.format_result("m", 1.0, 0.0, 1.0))
    assert math.isnan(parsed["ratio"]) and parsed["status"] == "missed"


def test_bad_names_and_targets_are_refused():
    with pytest.raises(ValueError):
        common.format_result("two words", 1, 1, 1)
    with pytest.raises(ValueError):
        common.format_result("m", 1, 1, 1, on="baseline")


def test_parse_ignores_other_lines_and_reads_lines_without_the_optional_keys():
    assert common.parse_result("# machine: x") is None
    assert common.parse_result("RESULT name=m value=abc baseline=1 ratio=1 target=1 status=met") is None
    assert common.parse_result("RESULT name=m value=1") is None
    old = common.parse_result("RESULT name=dp_overhead value=1.2 baseline=1 ratio=1.2 target=1.5 status=met")
    assert old["on"] == "ratio" and old["better"] == "lower" and old["unit"] == ""


def test_result_prints_the_line(capsys):
    line = common.result("m", 1.0, 2.0, 1.0, unit="MiB")
    assert capsys.readouterr().out.strip() == line


def test_timed_pairs_alternates_the_arms():
    calls = []
    times = common.timed_pairs([lambda: calls.append("a"), lambda: calls.append("b")], repeats=2, warmup=1)
    assert calls == ["a", "b"] * 3 and [len(t) for t in times] == [2, 2]


def test_tree_sampler_sees_a_child_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50 * 2**20); time.sleep(3)"],
                             start_new_session=True)
    try:
        time.sleep(1.0)
        assert child.pid in common.tree_pids(child.pid)
        sampler = common.TreeMemorySampler(child.pid)
        sampler.sample()
        assert sampler.peak_rss_mib > 40 and sampler.max_processes >= 1
    finally:
        child.kill()
        child.wait()


# -- run_all's page --------------------------------------------------------------------------------------------
FAKE_TRAIN = """# train step: ViT-B-16
# machine: AMD EPYC, 2 cores, 24 GiB RAM; torch 2.14.1; device cpu; threads 2; load average 1.00 1.00 1.00
RESULT name=train_step_vs_frozen_forward_per_image value=3.1 baseline=1.2 ratio=2.583 target=2.5 status=missed on=ratio better=lower unit=s
RESULT name=train_peak_memory_vs_full_finetune_per_image value=1500 baseline=3000 ratio=0.5 target=0.6 status=met on=ratio better=lower unit=MiB
"""
FAKE_AGG = """# machine: AMD EPYC, 2 cores, 24 GiB RAM; torch 2.14.1; device cpu; threads 2; load average 1.00 1.00 1.00
RESULT name=aggregation_100_sites_seconds value=13.69 baseline=0.34 ratio=40.23 target=0.5 status=missed on=value better=lower unit=s
"""
FAKE_INF = """# machine: AMD EPYC, 2 cores, 24 GiB RAM; torch 2.14.1; device cpu; threads 2; load average 1.00 1.00 1.00
RESULT name=inference_shared_vs_zero_shot value=9 baseline=10 ratio=0.9 target=0.8 status=met on=ratio better=higher unit=img/s
"""


def _outcomes():
    by_name = {s.key: s for s in run_all.SCRIPTS}
    return [run_all.parse_output(by_name["train_step"], "python bench/train_step.py", 0, 60.0, FAKE_TRAIN),
            run_all.parse_output(by_name["aggregation"], "python bench/aggregation.py", 0, 60.0, FAKE_AGG),
            run_all.parse_output(by_name["inference"], "python bench/inference.py", 0, 60.0, FAKE_INF),
            run_all.parse_output(by_name["payload"], "python bench/payload.py", 1, 1.0, "Traceback ...")]


def test_table_rows_hide_cpu_times_but_show_absolute_targets_and_memory():
    rows = run_all.table(_outcomes())
    assert rows[0] == "| metric | value | baseline | ratio | target | status | command |"
    by_metric = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in rows[2:]}
    train = by_metric["`train_step_vs_frozen_forward_per_image`"]
    assert train[1:] == ["-", "-", "2.583", "ratio <= 2.5", "**missed**", "`python bench/train_step.py`"]
    mem = by_metric["`train_peak_memory_vs_full_finetune_per_image`"]
    assert mem[1:6] == ["1,500 MiB", "3,000 MiB", "0.5", "ratio <= 0.6", "met"]
    agg = by_metric["`aggregation_100_sites_seconds`"]
    assert agg[1:6] == ["13.69 s", "0.34 s", "40.23", "value <= 0.50 s", "**missed**"]
    assert by_metric["`inference_shared_vs_zero_shot`"][4] == "ratio >= 0.8"
    assert "**failed** (exit 1)" in by_metric["`payload`"][5]


def test_page_has_machine_header_table_verdicts_gpu_section_and_findings():
    page = run_all.render(_outcomes(), quick=True, when="2026-01-01", commits=["abc1234"], findings="Some finding.")
    assert "`python bench/run_all.py --quick`" in page and "commit `abc1234`" in page
    assert "    machine: AMD EPYC, 2 cores, 24 GiB RAM" in page
    assert "| `aggregation_100_sites_seconds` |" in page
    assert ("- met (2): `train_peak_memory_vs_full_finetune_per_image`, `inference_shared_vs_zero_shot`"
            in page)
    assert "- missed (2): `train_step_vs_frozen_forward_per_image`, `aggregation_100_sites_seconds`" in page
    assert "- failed to run: `payload` (exit 1)" in page
    assert "## GPU" in page and "No GPU was available for this run" in page
    assert "## Findings\n\nSome finding." in page


def test_a_gpu_run_names_the_card_and_shows_its_times():
    gpu = FAKE_TRAIN.replace("device cpu", "device cuda, GPU NVIDIA H100")
    gpu = gpu.replace("torch 2.14.1; device cuda, GPU NVIDIA H100", "GPU NVIDIA H100; torch 2.14.1; device cuda")
    o = run_all.parse_output(run_all.SCRIPTS[1], "python bench/train_step.py", 0, 1.0, gpu)
    assert o.device == "cuda"
    page = run_all.render([o], quick=False, when="d", commits=["c"], findings=None)
    assert "No GPU was available" not in page and "NVIDIA H100" in page.split("## GPU")[1]
    assert "| 3.10 s | 1.20 s |" in page


def test_from_logs_rebuilds_the_page(tmp_path):
    (tmp_path / "aggregation.log").write_text("$ python bench/aggregation.py\n# exit 0, 95s\n" + FAKE_AGG)
    out = tmp_path / "benchmarks.md"
    code = run_all.main(["--from-logs", str(tmp_path), "--only", "aggregation", "--out", str(out)])
    assert code == 0
    page = out.read_text()
    assert "`aggregation_100_sites_seconds`" in page and "--quick" not in page.split("\n")[4]


def test_unknown_script_names_are_refused():
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nope", "--from-logs", "."])


def test_a_comparison_without_a_target_is_reported_as_such():
    """bench/methods.py compares each method with NEARL: no target, so neither met nor missed."""
    line = common.format_result("methods_payload_lora_vs_nearl", 2.0, 4.0, None, unit="B")
    assert " target=- status=info " in line
    parsed = common.parse_result(line)
    assert parsed["status"] == "info" and math.isnan(parsed["target"]) and parsed["ratio"] == 0.5
    o = run_all.parse_output({s.name: s for s in run_all.SCRIPTS}["methods"], "python bench/methods.py", 0, 1.0,
                             line + "\n")
    assert run_all.table([o])[2].split("|")[5:7] == [" - ", " comparison "]
    page = run_all.render([o], quick=False, when="d", commits=["c"], findings=None)
    assert "- met (0): none" in page and "- missed (0): none" in page


def test_every_benchmark_run_has_its_own_log_and_only_name():
    keys = [s.key for s in run_all.SCRIPTS]
    assert len(keys) == len(set(keys)), keys
    assert {"train_step", "train_step_checkpoint", "train_step_micro2"} <= set(keys)


def test_a_page_rebuilt_from_logs_names_the_commits_the_scripts_ran_at(tmp_path):
    by_key = {s.key: s for s in run_all.SCRIPTS}
    (tmp_path / "payload.log").write_text(f"$ python bench/payload.py\n# exit 0, 28s, commit aaa1111\n{FAKE_INF}")
    (tmp_path / "inference.log").write_text(f"$ python bench/inference.py\n# exit 0, 82s\n{FAKE_INF}")
    assert run_all.read_log(by_key["payload"], tmp_path).commit == "aaa1111"
    assert run_all.read_log(by_key["inference"], tmp_path).commit == ""  # a log from before commits were kept
    page = run_all.render([run_all.read_log(by_key["payload"], tmp_path)], quick=False, when="d",
                          commits=["aaa1111", "bbb2222"], findings=None)
    assert "commits `aaa1111`, `bbb2222`." in page
