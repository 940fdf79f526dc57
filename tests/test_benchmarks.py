"""The benchmark scripts run and print one JSON line with their figures."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_train_throughput_prints_one_json_line(minilm_l3, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--model",
         str(minilm_l3), "--batch", "4", "--length", "16", "--steps", "1", "--rounds", "1",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line["jax_examples_per_s"] > 0 and line["torch_peft_examples_per_s"] > 0
    assert line["ratio_jax_over_torch"] == pytest.approx(
        line["jax_examples_per_s"] / line["torch_peft_examples_per_s"], rel=0.02)
    assert json.loads(out.read_text()) == line


def test_benchmark_bad_model_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"),
                           "--model", str(tmp_path / "nope")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: model folder")


def test_t5_generate_benchmark_prints_one_json_line(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "gen.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "t5_generate.py"), "--batch", "2",
         "--source", "8", "--new", "4", "--rounds", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(line["tokens_per_s"]) == {"jax_cached", "jax_uncached", "torch_generate"}
    assert line["ratio_cached_over_uncached"] == pytest.approx(
        line["tokens_per_s"]["jax_cached"] / line["tokens_per_s"]["jax_uncached"], rel=0.02)
    assert json.loads(out.read_text()) == line
