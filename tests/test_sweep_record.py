"""A sweep's record on disk: one small file per cell listed by <out>.json, read back whole by the
sweep's --reuse and the report; records from before (cells inline) still read."""

from __future__ import annotations

import json
import pathlib

import pytest

from lora_jax.errors import UserError
from lora_jax.sweep_record import read_record, write_record


def _cell(row, task, seed, budget="", value=0.5):
    return {"sweep_row": row, "task": task, "seed": seed, **({"sweep_budget": budget}
                                                              if budget else {}),
            "experiment": row, "metrics": {"validation": {"accuracy": value}},
            "git_commit": "0" * 40, "command": f"python -m lora_jax.sweep --only {task}"}


def test_cells_are_one_file_each_and_read_back_in_order(tmp_path):
    results = [_cell("ffn", "rte", 0, "n16", 0.6), _cell("attens", "sst2", 1, value=0.9)]
    header = {"name": "s", "note": "", "command": "python -m lora_jax.sweep ..."}
    write_record(str(tmp_path / "out" / "grid"), header, results)
    record = json.loads((tmp_path / "out" / "grid.json").read_text())
    assert record["cells"] == ["grid/ffn_rte_n16_s0.json", "grid/attens_sst2_s1.json"]
    assert "results" not in record and record["name"] == "s"
    assert json.loads((tmp_path / "out" / "grid" / "attens_sst2_s1.json").read_text()) == (
        results[1])
    assert read_record(str(tmp_path / "out" / "grid.json")) == {**record, "results": results}


def test_a_rewrite_removes_only_the_cells_its_previous_record_listed(tmp_path):
    out = str(tmp_path / "grid")
    write_record(out, {}, [_cell("ffn", "rte", 0), _cell("ffn", "rte", 1)])
    (tmp_path / "grid" / "mine.json").write_text("{}")  # not the record's: left alone
    write_record(out, {}, [_cell("ffn", "rte", 1)])
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["ffn_rte_s1.json",
                                                                     "mine.json"]
    assert [r["seed"] for r in read_record(out + ".json")["results"]] == [1]
    with pytest.raises(ValueError, match="same cell"):
        write_record(out, {}, [_cell("ffn", "rte", 1), _cell("ffn", "rte", 1)])


def test_a_record_with_its_cells_inline_still_reads_and_bad_records_name_themselves(tmp_path):
    inline = {"name": "old", "results": [_cell("ffn", "rte", 0)]}
    (tmp_path / "old.json").write_text(json.dumps(inline))
    assert read_record(str(tmp_path / "old.json")) == inline
    (tmp_path / "other.json").write_text('{"name": "x"}')
    with pytest.raises(UserError, match="other.json is not a sweep record"):
        read_record(str(tmp_path / "other.json"))
    with pytest.raises(UserError, match="nowhere.json does not exist"):
        read_record(str(tmp_path / "nowhere.json"))
    write_record(str(tmp_path / "grid"), {}, [_cell("ffn", "rte", 0)])
    (tmp_path / "grid" / "ffn_rte_s0.json").unlink()
    with pytest.raises(UserError, match="lists the cell grid/ffn_rte_s0.json, which does not "
                                        "exist"):
        read_record(str(tmp_path / "grid.json"))


def test_the_report_reads_a_record_and_a_missing_cell_is_one_error_line(tmp_path, capsys):
    from ensemble import report

    write_record(str(tmp_path / "grid"), {}, [_cell("ffn", "rte", 0)])
    (tmp_path / "grid" / "ffn_rte_s0.json").unlink()
    with pytest.raises(SystemExit) as exit_:
        report.main(["--sweep", str(tmp_path / "grid.json"), "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "grid/ffn_rte_s0.json" in line
    assert not pathlib.Path(tmp_path / "r.md").exists()
