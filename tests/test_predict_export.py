"""predict and export of finished classifier runs, and of PEFT adapters, against transformers."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from lora_jax import export as export_cli
from lora_jax import predict as predict_cli
from lora_jax.classifier import train_and_evaluate
from lora_jax.runs import load_run
from lora_jax.synthetic import make_quickstart_assets
from tests.helpers import override, torch_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_quickstart_assets(str(tmp_path_factory.mktemp("assets")))


def _config(assets, **overrides):
    from lora_jax.experiments import load_config

    _, c = load_config(str(ROOT / "configs" / "quickstart.py"))
    c.model, c.data_dir = assets
    c.progress = False
    c.num_epochs = 1
    c.max_train_examples = 320
    c.max_eval_examples = 150
    return override(c, **overrides)


@pytest.fixture(scope="module")
def hf_head_run(assets, tmp_path_factory):
    """A finished FT_LoRA run with the transformers (BERT pooler) head."""
    workdir = tmp_path_factory.mktemp("run")
    results = train_and_evaluate(_config(assets, head="hf"), str(workdir))
    return workdir, results


def _validation_rows(assets, tmp_path, n=150):
    """The run's reported validation rows (its seeded subset), as a .jsonl input file."""
    from lora_jax import data as data_lib

    rows = data_lib.read_rows(str(pathlib.Path(assets[1]) / "synth/sentiment/validation.jsonl.gz"))
    idx = data_lib.random_subset(len(rows), n, data_lib.EVAL_SUBSET_SEED)
    rows = [rows[i] for i in (range(len(rows)) if idx is None else idx)]
    path = tmp_path / "validation.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _tokens(model_dir, texts):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = tok(texts, padding=True, return_tensors="np", return_token_type_ids=True)
    return enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]


def test_predict_on_the_run_gives_its_reported_metrics(hf_head_run, assets, tmp_path, capsys):
    workdir, results = hf_head_run
    path, rows = _validation_rows(assets, tmp_path)
    out = tmp_path / "p.jsonl"
    assert predict_cli.main(["--workdir", str(workdir), "--input", str(path), "--output",
                             str(out), "--evaluate", "--metrics", str(tmp_path / "m.json"),
                             "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["metrics"] == results["metrics"]["validation"]
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == printed["metrics"]
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(preds) == len(rows)
    assert set(preds[0]) == {"label", "label_id", "probabilities", "logits"}
    np.testing.assert_allclose([sum(p["probabilities"]) for p in preds], 1.0, atol=1e-5)
    assert all(p["label_id"] == int(np.argmax(p["logits"])) for p in preds)


def test_merged_export_loads_in_transformers_with_our_logits(hf_head_run, tmp_path):
    workdir, _ = hf_head_run
    assert export_cli.main(["--workdir", str(workdir), "--format", "merged", "--out",
                            str(tmp_path / "merged")]) == 0
    run = load_run(str(workdir))
    texts = ["the film was wonderful and moving", "a dull , tedious mess", "not bad at all"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    theirs = torch_logits(hf, _tokens(tmp_path / "merged", texts))
    ours = run.logits([(t,) for t in texts])
    assert np.abs(ours).max() > 1e-3
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_peft_export_loads_on_the_base_model_with_our_logits(hf_head_run, assets, tmp_path):
    workdir, _ = hf_head_run
    assert export_cli.main(["--workdir", str(workdir), "--format", "peft", "--out",
                            str(tmp_path / "adapter")]) == 0
    base = transformers.AutoModelForSequenceClassification.from_pretrained(assets[0], num_labels=2)
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    texts = ["a warm and funny story", "boring"]
    ours = load_run(str(workdir)).logits([(t,) for t in texts])
    np.testing.assert_allclose(ours, torch_logits(pm, _tokens(assets[0], texts)), atol=1e-4)


def test_predict_with_a_pytorch_made_adapter_matches_peft(assets, tmp_path):
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(assets[0], num_labels=2)
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                                   target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    texts = ["great fun", "awful and slow", "it was fine"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "p.jsonl"
    assert predict_cli.main(["--model", assets[0], "--adapter", str(tmp_path / "adapter"),
                             "--input", str(tmp_path / "in.txt"), "--output", str(out),
                             "--labels", "neg,pos", "--no-progress"]) == 0
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    theirs = torch_logits(pm, _tokens(assets[0], texts))
    np.testing.assert_allclose([p["logits"] for p in preds], theirs, atol=1e-4)
    assert [p["label"] for p in preds] == [["neg", "pos"][int(i)] for i in theirs.argmax(-1)]


def test_a_mean_pooled_linear_head_exports_adapters_only_and_no_merged_model(assets, tmp_path,
                                                                             caplog):
    workdir = tmp_path / "run"
    train_and_evaluate(_config(assets, max_steps=3, max_train_examples=64), str(workdir))
    with caplog.at_level("WARNING"):
        assert export_cli.main(["--workdir", str(workdir), "--format", "peft", "--out",
                                str(tmp_path / "adapter")]) == 0
    assert "the head is not exported" in caplog.text
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["modules_to_save"] is None and written["task_type"] is None
    with pytest.raises(SystemExit) as e:
        export_cli.main(["--workdir", str(workdir), "--format", "merged", "--out",
                         str(tmp_path / "merged")])
    assert e.value.code == 2


def test_attribute_writes_complete_scores_and_heatmaps(hf_head_run, tmp_path):
    from lora_jax import attribute as attribute_cli

    workdir, _ = hf_head_run
    (tmp_path / "in.txt").write_text("a warm and funny story\nboring , slow and dull\n")
    assert attribute_cli.main(["--workdir", str(workdir), "--input", str(tmp_path / "in.txt"),
                               "--out-dir", str(tmp_path / "ig"), "--steps", "64"]) == 0
    written = json.loads((tmp_path / "ig" / "attributions.json").read_text())
    assert written["git_commit"] and len(written["rows"]) == 2
    for i, row in enumerate(written["rows"]):
        assert row["tokens"][0] == "[CLS]" and len(row["scores"]) == len(row["tokens"])
        assert row["completeness_gap"] < 0.01
        assert abs(sum(row["scores"]) - (row["f_input"] - row["f_baseline"])) < 0.01 * abs(
            row["f_input"] - row["f_baseline"]) + 1e-6
        assert (tmp_path / "ig" / f"row_{i}.png").stat().st_size > 1000
