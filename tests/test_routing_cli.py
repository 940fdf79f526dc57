"""``python -m lora_jax.predict --adapters``: rows routed over a finished run, a PEFT adapter
made in PyTorch and a module set, each row as its adapter alone predicts it; bad input gives
one error line, exit 2, and no output file."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lora_jax import predict as predict_cli
from lora_jax.synthetic import make_quickstart_assets
from tests.helpers import override, torch_base, torch_classifier

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXTS = ["a fine film", "dull and slow", "not bad at all", "the plot is great", "bad", "fine"]


def _peft_adapter(base_dir: str, out: pathlib.Path, seed: int) -> str:
    """A SEQ_CLS adapter of the base in `base_dir`, randomised as after training, saved."""
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir,
                                                                           num_labels=3)
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=6,
                          target_modules=["query", "value", "intermediate.dense"])
    pm = peft.get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    pm.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A finished FT_LoRA run, the same run exported as a one-module set, two PEFT adapters of
    the same base, and one PEFT adapter of another base."""
    from ensemble.modules import export_module, write_moduleset_index
    from lora_jax.classifier import train_and_evaluate
    from lora_jax.experiments import load_config

    root = tmp_path_factory.mktemp("routing")
    model, _data = make_quickstart_assets(str(root / "assets"))
    _, c = load_config(str(ROOT / "configs" / "quickstart.py"))
    c.model, c.data_dir = model, _data
    c.progress, c.num_epochs, c.max_train_examples, c.max_eval_examples = False, 1, 320, 64
    train_and_evaluate(override(c), str(root / "run"))
    meta = export_module(str(root / "run"), str(root / "set" / "synth_sentiment"))
    write_moduleset_index(str(root / "set"), [meta])
    hf = torch_classifier("bert")
    torch_base(hf).save_pretrained(root / "other_base")
    other = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                    target_modules=["query"]))
    other.save_pretrained(root / "foreign")
    rows = [{"text": t, "adapter": name} for t, name in zip(
        TEXTS * 2, ["run", "p1", "synth_sentiment", "p2", "p1", "run"] * 2, strict=True)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "model": model, "run": str(root / "run"), "set": str(root / "set"),
            "p1": _peft_adapter(model, root / "p1", 1), "p2": _peft_adapter(model, root / "p2", 2),
            "foreign": str(root / "foreign"), "rows": rows}


def _read(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _alone(args: list[str], rows: list[dict], tmp_path, name: str) -> list[dict]:
    """`predict` with one adapter over the rows routed to it."""
    inp = tmp_path / f"{name}.jsonl"
    inp.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    out = tmp_path / f"{name}_out.jsonl"
    assert predict_cli.main([*args, "--input", str(inp), "--output", str(out),
                             "--no-progress"]) == 0
    return _read(out)


def test_rows_routed_over_a_run_peft_adapters_and_a_module_set_predict_as_each_alone(
        adapters, tmp_path):
    a = adapters
    out = tmp_path / "routed.jsonl"
    spec = f"run={a['run']},p1={a['p1']},p2={a['p2']},{a['set']}"
    assert predict_cli.main(["--model", a["model"], "--adapters", spec, "--input",
                             str(a["root"] / "rows.jsonl"), "--output", str(out),
                             "--batch-size", "4", "--no-progress"]) == 0
    routed = _read(out)
    assert [r["adapter"] for r in routed] == [r["adapter"] for r in a["rows"]]
    sources = {"run": ["--workdir", a["run"]],
               "synth_sentiment": ["--workdir", a["run"]],  # the module is the run's checkpoint
               "p1": ["--model", a["model"], "--adapter", a["p1"]],
               "p2": ["--model", a["model"], "--adapter", a["p2"]]}
    for name, args in sources.items():
        mine = [i for i, r in enumerate(a["rows"]) if r["adapter"] == name]
        alone = _alone(args, [a["rows"][i] for i in mine], tmp_path, name)
        for i, one in zip(mine, alone, strict=True):
            np.testing.assert_allclose(routed[i]["logits"], one["logits"], atol=1e-5, rtol=1e-5)
            assert routed[i]["label"] == one["label"]
    # a 2-class run and 3-class adapters: each row keeps its own head's label count
    assert {len(r["logits"]) for r in routed} == {2, 3}
    assert not np.allclose(routed[1]["logits"], routed[3]["logits"])  # p1 and p2 differ


def _fails(command: list[str], message: str, out: pathlib.Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lora_jax.predict", *command, "--output",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("case", ["unknown adapter in a row", "adapter for another base",
                                  "missing adapter-key column"])
def test_bad_routing_input_is_one_error_line(adapters, case, tmp_path):
    a = adapters
    rows = a["root"] / "rows.jsonl"
    base = ["--model", a["model"], "--input", str(rows)]
    if case == "unknown adapter in a row":
        _fails([*base, "--adapters", f"run={a['run']},p1={a['p1']},{a['set']}"],
               "row 4 of " + str(rows) + " names adapter 'p2', which is not among --adapters",
               tmp_path / "p.jsonl")
    elif case == "adapter for another base":
        _fails([*base, "--adapters", f"p1={a['p1']},foreign={a['foreign']}"],
               "adapter 'foreign'", tmp_path / "p.jsonl")
    else:
        _fails([*base, "--adapters", f"p1={a['p1']}", "--adapter-key", "task"],
               "row 1 of " + str(rows) + " has no 'task' column", tmp_path / "p.jsonl")
