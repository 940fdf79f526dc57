"""Readers, validation errors, bucketing and the seeded batch order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_jax import data
from lora_jax.errors import UserError
from lora_jax.synthetic import write_jsonl_gz
from lora_jax.tasks import custom_task, get_task, task_names

ROWS = [{"sentence": "good film", "label": 1}, {"sentence": "bad film", "label": 0}]


@pytest.mark.parametrize("ext", [".jsonl.gz", ".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_readers_agree(tmp_path, ext):
    path = tmp_path / f"train{ext}"
    if ext == ".jsonl.gz":
        write_jsonl_gz(path, ROWS)
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif ext == ".json":
        path.write_text(json.dumps(ROWS))
    elif ext in (".csv", ".tsv"):
        sep = "," if ext == ".csv" else "\t"
        path.write_text(f"sentence{sep}label\n" + "".join(f"{r['sentence']}{sep}{r['label']}\n"
                                                          for r in ROWS))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), path)
    ex = data.examples_from_rows(data.read_rows(str(path)), get_task("sst2"), str(path))
    assert ex.texts == [("good film",), ("bad film",)]
    np.testing.assert_array_equal(ex.labels, [1, 0])


def test_registry_covers_the_paper_tasks():
    for name in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "imdb",
                 "ag_news", "trec"):
        assert name in task_names()
    assert get_task("mnli").eval_splits == ("validation_matched", "validation_mismatched")
    assert get_task("stsb").is_regression and get_task("trec").label_key == "coarse_label"
    assert get_task("cola").main_metric == "matthews" and get_task("trec").num_labels == 6


def test_local_layout_and_missing_split(tmp_path):
    write_jsonl_gz(tmp_path / "glue" / "sst2" / "train.jsonl.gz", ROWS)
    task = get_task("sst2")
    rows, where = data.DataSource("local", str(tmp_path)).load(task, "train")
    assert len(rows) == 2 and where.endswith("glue/sst2/train.jsonl.gz")
    with pytest.raises(UserError, match="no 'validation' split for task 'sst2'"):
        data.DataSource("local", str(tmp_path)).load(task, "validation")
    with pytest.raises(UserError, match="data_dir .* does not exist"):
        data.DataSource("local", str(tmp_path / "nope")).load(task, "train")


def test_user_files_and_custom_task(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("review,stars\nnice,2\nmeh,1\nugh,0\n")
    task = custom_task({"name": "mine", "text_keys": ["review"], "label_key": "stars",
                        "num_labels": 3})
    rows, _ = data.DataSource("files", files={"train": str(path)}).load(task, "train")
    ex = data.examples_from_rows(rows, task, str(path))
    np.testing.assert_array_equal(ex.labels, [2, 1, 0])
    with pytest.raises(UserError, match="missing 'num_labels'"):
        custom_task({"name": "x", "text_keys": ["a"]})


@pytest.mark.parametrize("label,match", [
    (2, "outside the 2 classes 0..1 of task 'sst2'"),
    (-1, "outside the 2 classes"),
    (0.5, "outside the 2 classes"),
    ("pos", "not a number"),
])
def test_bad_labels_name_the_row(label, match):
    rows = [*ROWS, {"sentence": "x", "label": label}]
    with pytest.raises(UserError, match=f"row 2 of f.jsonl .*{match}"):
        data.examples_from_rows(rows, get_task("sst2"), "f.jsonl")


def test_regression_range_and_missing_column_and_empty():
    stsb = get_task("stsb")
    ok = data.examples_from_rows([{"sentence1": "a", "sentence2": "b", "label": 4.2}], stsb, "f")
    assert ok.labels.dtype == np.float32
    with pytest.raises(UserError, match=r"target 7.0, outside \[0.0, 5.0\]"):
        data.examples_from_rows([{"sentence1": "a", "sentence2": "b", "label": 7}], stsb, "f")
    with pytest.raises(UserError, match="no column 'sentence2'"):
        data.examples_from_rows([{"sentence1": "a", "label": 1}], stsb, "f")
    with pytest.raises(UserError, match="has no rows"):
        data.examples_from_rows([], stsb, "f")


def test_hold_out_is_disjoint_and_seeded():
    ex = data.Examples([(str(i),) for i in range(100)], np.arange(100) % 2)
    train, held = data.hold_out(ex, 0.2, seed=0)
    assert len(train) == 80 and len(held) == 20
    assert not set(train.texts) & set(held.texts)
    assert data.hold_out(ex, 0.2, seed=0)[1].texts == held.texts
    assert data.hold_out(ex, 0.2, seed=1)[1].texts != held.texts
    assert len(data.hold_out(ex, 30, seed=0)[1]) == 30
    with pytest.raises(UserError, match="selection_size"):
        data.hold_out(ex, 100, seed=0)


def test_split_sizes_cut_examples_and_t5_pairs_alike():
    from t5_hybrid.data import text_pairs

    n = 100
    ex = data.Examples([(str(i),) for i in range(n)], np.arange(n) % 2)
    pairs = text_pairs([str(i) for i in range(n)], [f"t{i}" for i in range(n)])
    sizes = data.SplitSizes(selection_size=0.2, max_train_examples=50, max_eval_examples=30)
    cuts = []
    for seed in (0, 1):
        a = sizes.cut({"train": ex, "validation": ex}, seed, selection_from_train=True)
        b = sizes.cut({"train": pairs, "validation": pairs}, seed, selection_from_train=True)
        assert {k: len(v) for k, v in a.items()} == {"train": 50, "selection": 20,
                                                    "validation": 30}
        for name in a:  # the same rows, whatever the kind of split
            assert [t[0] for t in a[name].texts] == b[name].sources
        assert not set(a["train"].texts) & set(a["selection"].texts)
        cuts.append(a)
    assert cuts[0]["validation"].texts == cuts[1]["validation"].texts  # every seed: same rows
    assert cuts[0]["train"].texts != cuts[1]["train"].texts  # seeded train rows
    assert cuts[0]["selection"].texts != cuts[1]["selection"].texts
    again = sizes.cut({"train": ex, "validation": ex}, 1, selection_from_train=True)
    assert again["train"].texts == cuts[1]["train"].texts
    few = data.SplitSizes(selection_size=0.25, train_budget=16)
    budget = [few.cut({"train": ex}, seed, selection_from_train=True) for seed in (0, 1)]
    assert [len(b["train"]) for b in budget] == [12, 12] and len(budget[0]["selection"]) == 4
    seen = set(budget[0]["train"].texts) | set(budget[0]["selection"].texts)
    assert len(seen) == 16  # the selection slice comes out of the 16 rows
    assert seen != set(budget[1]["train"].texts) | set(budget[1]["selection"].texts)  # per seed
    with pytest.raises(UserError, match="train_budget=101 is larger than the 100 rows"):
        data.SplitSizes(train_budget=101).cut({"train": ex}, 0, selection_from_train=False)
    no_selection = data.SplitSizes().cut({"train": ex}, 0, selection_from_train=False)
    assert list(no_selection) == ["train"] and no_selection["train"] is ex


def test_data_source_of_a_config_resolves_auto():
    import ml_collections

    def source(**kw):
        c = ml_collections.ConfigDict({"data_source": "auto", "data_dir": "",
                                       "data_files": {"train": "", "validation": ""}})
        c.update(kw)
        return data.DataSource.of(c)

    assert source() == data.DataSource("hub")
    assert source(data_dir="d") == data.DataSource("local", "d")
    assert source(data_files={"train": "t.csv", "validation": ""}) == data.DataSource(
        "files", "", {"train": "t.csv"})
    assert source(data_source="tfds", data_dir="d").kind == "tfds"
    with pytest.raises(UserError, match="unknown data_source 'ftp'"):
        source(data_source="ftp").load(get_task("sst2"), "train")


def test_batches_use_bounded_shapes():
    lengths = np.array([3, 5, 17, 30, 64, 2, 9])
    enc = data.Encoded([np.arange(n, dtype=np.int32) + 1 for n in lengths],
                       [np.zeros(n, np.int32) for n in lengths], np.arange(7) % 2)
    buckets = data.bucket_lengths(64, (16, 32, 64, 128))
    assert buckets == (16, 32, 64)
    b = data.make_batch(enc, np.array([0, 1]), 4, buckets, pad_id=0)
    assert b["input_ids"].shape == (4, 16)
    np.testing.assert_array_equal(b["weights"], [1, 1, 0, 0])
    np.testing.assert_array_equal(b["attention_mask"][1], [1] * 5 + [0] * 11)
    assert data.make_batch(enc, np.array([2, 3]), 4, buckets, 0)["input_ids"].shape == (4, 32)
    assert data.make_batch(enc, np.array([4]), 4, buckets, 0)["input_ids"].shape == (4, 64)


@pytest.mark.parametrize("n, batch, unit, rows", [
    (4, 128, 1, 8), (9, 128, 1, 16), (24, 128, 1, 32), (65, 128, 1, 128), (128, 128, 1, 128),
    (1, 6, 1, 6),  # 3 would be below the smallest short batch
    (4, 96, 3, 12),  # 96, 48, 24, 12 all split over 3 devices; 6 is below 8
    (4, 40, 4, 20),  # 10 rows would not split over 4 devices
    (1, 7, 1, 7)])  # an odd batch size is never halved
def test_a_short_batch_is_padded_to_the_fewest_rows_that_hold_it(n, batch, unit, rows):
    assert data.short_batch_rows(n, batch, unit) == rows


def test_a_batch_larger_than_the_batch_size_is_refused():
    with pytest.raises(ValueError, match="a batch of 9 rows does not fit batch_size 8"):
        data.short_batch_rows(9, 8)


def test_map_encoded_runs_short_batches_shrunk_with_the_outputs_of_full_ones():
    """The last batch of a split (5 of 133 rows) and a 4-row split run as 8-row batches, and
    every row gets the output it gets in a full batch of padding."""
    from lora_jax import distributed

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 30, 133)
    enc = data.Encoded([rng.integers(1, 999, m).astype(np.int32) for m in lengths],
                       [np.zeros(m, np.int32) for m in lengths], rng.integers(0, 3, 133))
    seen = []

    def per_row(batch):  # each row's output depends on that row only
        seen.append(batch["input_ids"].shape[0])
        return (batch["input_ids"] * batch["attention_mask"]).sum(1) + batch["labels"]

    def full(rows=None):
        return distributed.map_batches(
            per_row, len(enc), enc.lengths, 128,
            lambda idx, size, step_rows: data.make_batch(enc, idx, size, (8, 16, 32), 0,
                                                         step_rows), rows=rows)

    for rows, shapes in ((None, [128, 8]), (np.array([3, 70, 5, 131]), [8])):
        seen.clear()
        shrunk = distributed.map_encoded(per_row, enc, 128, (8, 16, 32), 0, rows=rows)
        assert seen == shapes
        np.testing.assert_array_equal(shrunk, full(rows))
        assert set(seen[len(shapes):]) == {128}  # the reference padded every batch to 128


def test_train_order_is_a_seeded_permutation():
    lengths = np.random.default_rng(0).integers(1, 60, 1000)
    a = data.train_order(lengths, 32, seed=0, epoch=0)
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    b = data.train_order(lengths, 32, seed=0, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = data.train_order(lengths, 32, seed=0, epoch=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # grouping by length cuts padding compared with a plain shuffle
    pad = lambda order: sum(lengths[i].max() * len(i) - lengths[i].sum() for i in order)
    assert pad(a) < 0.5 * pad(data.train_order(lengths, 32, 0, 0, length_grouping=False))


def test_encode_pairs_with_token_types(minilm_l3):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_l3))
    ex = data.Examples([("a man plays", "someone plays music " * 20)], np.array([1]))
    enc = data.encode(ex, tok, max_length=16)
    assert len(enc.input_ids[0]) == 16
    assert enc.token_type_ids[0][0] == 0 and enc.token_type_ids[0][-1] == 1


def test_hub_dataset_offline_is_a_one_line_error(monkeypatch):
    import datasets
    import huggingface_hub

    # the libraries read these variables once, at import (an earlier test may have imported
    # them); without the attributes too, the call would wait on network timeouts
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="from the Hugging Face Hub .*--config.data_dir"):
        data.DataSource("hub").load(get_task("rte"), "train")


def test_real_glue_files_validate(data_dir):
    for name in ("sst2", "cola", "mrpc", "rte", "stsb", "wnli"):
        task = get_task(name)
        for split in ("train", "validation"):
            rows, where = data.DataSource("local", str(data_dir)).load(task, split)
            ex = data.examples_from_rows(rows, task, where)
            assert len(ex) == len(rows) > 0
    trec = get_task("trec")
    rows, _ = data.DataSource("local", str(data_dir)).load(trec, "validation")
    ex = data.examples_from_rows(rows, trec, "trec")
    assert set(np.unique(ex.labels)) == set(range(6))
