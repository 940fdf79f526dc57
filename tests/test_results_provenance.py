"""What a results file records about how it was made: the command as a user types it, a commit
that names the code, and the refusal to write results/ from uncommitted code."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from lora_jax import results
from lora_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_command_is_what_a_user_types_from_the_project_root(monkeypatch):
    monkeypatch.delenv(results.ENV_COMMAND, raising=False)
    shared = ROOT.parent / "shared" / "models" / "m"
    argv = [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "ft_lora.py"),
            f"--config.model={shared}", "--config.note=two words", "--workdir=/elsewhere/w"]
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None, raising=False)
    assert results.command_line(argv) == (
        "python train.py --config configs/ft_lora.py --config.model=../shared/models/m "
        "'--config.note=two words' --workdir=/elsewhere/w")  # outside the project: as typed

    class Spec:
        name = "lora_jax.sweep"

    monkeypatch.setattr(sys.modules["__main__"], "__spec__", Spec())
    assert results.command_line([str(ROOT / "lora_jax" / "sweep.py"), "--out",
                                 str(ROOT / "results" / "x")]) == (
        "python -m lora_jax.sweep --out results/x")
    monkeypatch.setenv(results.ENV_COMMAND, "python -m lora_jax.launch --processes 2 -- train.py")
    assert results.command_line() == "python -m lora_jax.launch --processes 2 -- train.py"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A throwaway git repository standing in for the project (results.ROOT)."""
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "old.json").write_text("{}\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    monkeypatch.setattr(results, "ROOT", str(tmp_path))
    return tmp_path


def test_a_dirty_tree_is_refused_for_results_and_its_diff_is_hashed(repo):
    out = str(repo / "results" / "table.json")
    clean = results.git_commit()
    assert len(clean) == 40 and not clean.endswith("+dirty")
    assert results.code_state(out, allow_dirty=False) == {}
    (repo / "results" / "old.json").write_text('{"new": 1}\n')  # results/ is not code
    assert results.uncommitted_changes() == [] and results.git_commit() == clean
    (repo / "code.py").write_text("x = 2\n")
    assert results.git_commit() == clean + "+dirty"
    with pytest.raises(UserError, match=r"uncommitted changes \(code.py\): commit them before "
                                        r"writing results/table.json.* --allow-dirty"):
        results.code_state(out, allow_dirty=False)
    first = results.code_state(out, allow_dirty=True)["diff_sha256"]
    (repo / "new.py").write_text("y = 1\n")  # an untracked file is a change too
    second = results.code_state(out, allow_dirty=True)["diff_sha256"]
    assert len(first) == len(second) == 16 and first != second
    # outside results/ nothing is refused, and the diff is still recorded
    assert results.code_state(str(repo.parent / "runs" / "t.json"), False) == {
        "diff_sha256": second}


def test_the_sweep_refuses_to_write_results_from_a_dirty_tree(tmp_path, monkeypatch, capsys):
    from lora_jax import sweep

    monkeypatch.setattr(results, "uncommitted_changes", lambda: [" M lora_jax/trainer.py"])
    out = ROOT / "results" / "never_written_by_a_test"
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--config", str(ROOT / "configs" / "quickstart_sweep.py"), "--workdir",
                    str(tmp_path / "w"), "--out", str(out)])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: the working tree has uncommitted changes "
                           "(lora_jax/trainer.py)") and "--allow-dirty" in line
    assert not out.with_suffix(".json").exists() and not (tmp_path / "w").exists()


def _fields(tree, name: str):
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == name and isinstance(value, str):
                yield value
            yield from _fields(value, name)
    elif isinstance(tree, list):
        for value in tree:
            yield from _fields(value, name)


def replay_problems(record: dict) -> list[str]:
    """What keeps a results record from replaying: commands not typed from the project root
    (an interpreter or absolute path, a machine's folder) and commits that are not clean."""
    problems = []
    for command in _fields(record, "command"):
        if not command.startswith("python ") or any(
                token.partition("=")[2].startswith("/") or token.startswith("/")
                for token in command.split()):
            problems.append(f"command {command[:80]!r}")
    for commit in _fields(record, "git_commit"):
        if not (len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)):
            problems.append(f"git_commit {commit!r}")
    return problems


def test_the_replay_check_catches_machine_paths_and_dirty_commits():
    good = {"command": "python -m lora_jax.sweep --config configs/x.py --out results/x",
            "git_commit": "0" * 40, "results": [{"command": "python train.py --workdir=runs/a",
                                                 "git_commit": "a" * 40}]}
    assert replay_problems(good) == []
    bad = json.loads(json.dumps(good))
    bad["results"][0]["command"] = "/work/x/lora_jax/sweep.py --config configs/x.py"
    bad["results"][0]["git_commit"] = "a" * 40 + "+dirty"
    bad["command"] += " --config.model=/work/shared/m"
    assert len(replay_problems(bad)) == 3


COMMITTED = sorted((ROOT / "results").rglob("*.json"))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT / "results")))
def test_every_committed_result_replays(path):
    """Each results/ file records commands a user types from the project root and clean commits."""
    record = json.loads(path.read_text())
    assert list(_fields(record, "command")), f"{path.name} records no command"
    assert replay_problems(record) == []
