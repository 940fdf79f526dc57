"""Small shared builders for tests (no ../shared needed)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax import lora
from lora_jax.models import EncoderConfig, SequenceClassifier

TINY = EncoderConfig(model_type="bert", vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                     intermediate_size=32, max_position_embeddings=32, embedding_size=16)


def tiny_model(config: EncoderConfig = TINY, num_labels: int = 3, **kw) -> SequenceClassifier:
    return SequenceClassifier(config, num_labels, **kw)


def tiny_batch(batch: int = 4, length: int = 9, vocab: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, vocab, (batch, length)), jnp.int32)
    mask = np.ones((batch, length), np.int32)
    mask[1, 5:] = 0
    return ids, jnp.asarray(mask), jnp.zeros_like(ids)


def tiny_variables(model: SequenceClassifier, spec: lora.LoRASpec, seed: int = 0) -> dict:
    ids, mask, types = tiny_batch()
    params = model.init(jax.random.PRNGKey(seed), ids, mask, types)["params"]
    return {"params": params, "lora": lora.init_lora(jax.random.PRNGKey(seed + 1), params, spec)}


def override(config, **dotted):
    """Set ``override(c, **{"optimizer.learning_rate": 1e-3})`` style keys on a ConfigDict."""
    for key, value in dotted.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


def adamw(learning_rate: float, **kw) -> optax.GradientTransformation:
    """AdamW on the trainable leaves, nothing on adapter alphas (as `trainer.make_optimizer`)."""
    return optax.multi_transform({"trainable": optax.adamw(learning_rate, **kw),
                                  "frozen": optax.set_to_zero()}, lora.optimizer_labels)


def dot_dtypes(fn, *args) -> list[str]:
    """The result dtypes of every matmul (dot_general) in fn's jaxpr, nested calls included."""
    return [out for _, out in primitive_dtypes(fn, ("dot_general",), *args)]


def primitive_dtypes(fn, names: tuple[str, ...], *args) -> list[tuple[str, str]]:
    """(operand dtype, result dtype) of every equation of the primitives `names` in fn's
    jaxpr, nested calls included."""
    return [(str(eqn.invars[0].aval.dtype), str(eqn.outvars[0].aval.dtype))
            for eqn, _ in jaxpr_equations(jax.make_jaxpr(fn)(*args).jaxpr)
            if eqn.primitive.name in names]


def jaxpr_equations(jaxpr, times: int = 1):
    """(equation, how many times it runs) for every equation of `jaxpr` and of the jaxprs nested
    in it (calls, custom rules, loop bodies; a scan's body runs `length` times)."""
    for eqn in jaxpr.eqns:
        yield eqn, times
        repeat = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                if hasattr(sub, "jaxpr"):
                    yield from jaxpr_equations(
                        sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr, repeat)
                elif hasattr(sub, "eqns"):
                    yield from jaxpr_equations(sub, repeat)


# Small transformers classifiers for parity tests; "electra_proj" has embedding_size != hidden.
HF_KINDS = ("bert", "distilbert", "electra", "electra_proj")
HF_TARGETS = {"bert": ["query", "value", "intermediate.dense"],
              "distilbert": ["q_lin", "v_lin", "lin1"],
              "electra": ["query", "key", "output.dense"],
              "electra_proj": ["query", "value"]}
HF_HEAD_MODULES = {"distilbert": ["pre_classifier", "classifier"]}  # PEFT's default: classifier


def torch_classifier(kind: str, num_labels: int = 3, seed: int = 0):
    """A seeded random transformers ``<Model>ForSequenceClassification`` (vocab 120, d 32)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    sizes = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=40, num_labels=num_labels)
    if kind == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(**sizes))
    if kind in ("electra", "electra_proj"):
        return transformers.ElectraForSequenceClassification(transformers.ElectraConfig(
            **sizes, embedding_size=16 if kind == "electra_proj" else 32))
    if kind == "distilbert":
        return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
            max_position_embeddings=40, num_labels=num_labels))
    raise ValueError(kind)


def torch_base(model):
    """The bare encoder of a transformers sequence classifier (bert / distilbert / electra)."""
    return getattr(model, model.config.model_type)


def hf_inputs(batch: int = 3, length: int = 11, vocab: int = 120, seed: int = 0):
    """(input_ids, attention_mask, token_type_ids) int numpy arrays; row 1 is padded."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, 7:] = 0
    types = np.zeros_like(ids)
    types[:, length // 2:] = 1
    return ids, mask, types


def torch_logits(model, inputs) -> np.ndarray:
    """Eval-mode logits of a transformers (or PEFT) classifier on `hf_inputs`."""
    import torch

    ids, mask, types = (torch.tensor(x) for x in inputs)
    kw = {} if model.config.model_type == "distilbert" else {"token_type_ids": types}
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits.float().numpy()


# ----------------------------------------------------------------------------- several processes


def train_py(args: list[str], workdir, processes: int = 1, devices: int = 2,
             timeout: int = 600, wait: bool = True):
    """train.py with `args`: in one process on `devices` CPU devices, or in `processes`
    processes started by ``python -m lora_jax.launch`` (one CPU device each). wait=False
    returns the Popen (output discarded)."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if processes == 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        cmd = [sys.executable, str(root / "train.py"), *args]
    else:
        cmd = [sys.executable, "-m", "lora_jax.launch", "--processes", str(processes), "--",
               str(root / "train.py"), *args]
    cmd.append(f"--workdir={workdir}")
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True,
                          timeout=timeout)


def _launched_children(pid: int) -> dict[int, int]:
    """{process id (LORA_JAX_PROCESS_ID): pid} of a launcher's children (Linux /proc)."""
    import pathlib

    out = {}
    for child in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        environ = pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        ids = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"LORA_JAX_PROCESS_ID=")]
        if ids:
            out[int(ids[0])] = int(child)
    return out


def run_until_killed(args: list[str], workdir, at: int, processes: int = 1):
    """Start train.py as `train_py` does and SIGKILL it (with several processes: process 1 of
    them) as soon as the checkpoint of step `at` or a later one exists.

    Kill early in a run (`at` a few checkpoints before its end): the rest of the run must
    outlast the 10 ms poll on any machine. Returns (returncode, output, pids still to be
    stopped: the surviving processes of a launched run)."""
    import os
    import pathlib
    import signal
    import time

    launcher = train_py(args, workdir, processes=processes, wait=False)
    ckpts, deadline, survivors = pathlib.Path(workdir) / "checkpoints", time.time() + 600, None
    while time.time() < deadline and launcher.poll() is None:
        steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if (
            ckpts.is_dir()) else []
        if steps and max(steps) >= at:
            children = _launched_children(launcher.pid) if processes > 1 else {}
            victim = children.pop(1) if processes > 1 else launcher.pid
            os.kill(victim, signal.SIGKILL)
            survivors = list(children.values())
            break
        time.sleep(0.01)
    assert survivors is not None, "the run ended before it could be killed"
    output, _ = launcher.communicate(timeout=120)  # no hang: a launcher stops the survivors
    if processes == 1:
        assert launcher.returncode == -signal.SIGKILL
    assert not (pathlib.Path(workdir) / "results.json").exists()
    return launcher.returncode, output, survivors


def assert_kill9_resume_is_exact(args: list[str], finished, workdir, at: int) -> None:
    """train.py with `args` in one process (two CPU devices) killed with SIGKILL once the
    checkpoint of step `at` exists, then resumed: the same run as the uninterrupted `finished`
    workdir of the same arguments (`assert_same_run`: selection, metrics, metrics.jsonl lines
    without duplicates, trees bit for bit)."""
    run_until_killed(args, workdir, at)
    resumed = train_py([*args, "--config.resume=True"], workdir)
    assert resumed.returncode == 0, failure_excerpt(resumed.stdout + resumed.stderr)
    assert_same_run(finished, workdir)


def failure_excerpt(output: str, limit: int = 4000) -> str:
    """The part of a failed command's output that says why: from the first traceback or fatal
    error on (a crash's list of loaded extension modules cut), else the end."""
    marks = [i for i in (output.find("Traceback"), output.find("Fatal Python error"),
                         output.find("error:")) if i >= 0]
    start = min(marks) if marks else max(len(output) - limit, 0)
    text = output[start:]
    cut = text.find("Extension modules:")
    if cut >= 0:
        text = text[:cut] + text[text.find("\n", cut) + 1:]
    return text[:limit]


def logged_metrics(workdir) -> list[dict]:
    """metrics.jsonl lines without the wall-clock field."""
    import pathlib

    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "train/examples_per_s"}
            for x in lines]


def assert_same_run(one, two, atol: float = 0.0, log_rtol: float = 0.0) -> None:
    """Two finished train.py workdirs selected the same step, report the same metrics, logged
    the same lines (values within log_rtol) and hold the same trainable trees (within atol)."""
    from lora_jax.checkpoint import restore_trainable

    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    keys = ("metrics", "selection_metrics", "best_step", "last_step", "total_steps")
    assert [a.get(k) for k in keys] == [b.get(k) for k in keys], (
        f"{[a.get(k) for k in keys]} != {[b.get(k) for k in keys]}")
    logs = logged_metrics(one), logged_metrics(two)
    if log_rtol:
        assert [sorted(x) for x in logs[0]] == [sorted(x) for x in logs[1]], "logged keys differ"
        for x, y in zip(*logs, strict=True):
            np.testing.assert_allclose([x[k] for k in sorted(x)], [y[k] for k in sorted(x)],
                                       rtol=log_rtol, err_msg=f"metrics.jsonl step {x['step']}")
    else:
        assert logs[0] == logs[1], "metrics.jsonl lines differ"
    for which in ("trainable", "best_trainable"):
        x, _ = restore_trainable(str(one), which)
        y, _ = restore_trainable(str(two), which)
        for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y), strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=atol)



def assert_short_train_batches_shrink(train: Callable, workdir, monkeypatch, batch_module,
                                      rows: int, shrunk: int, padded: int,
                                      atol: float = 1e-6) -> None:
    """``train(workdir)`` on a train split of `rows` rows builds its train batches
    (``batch_module.make_batch``, whose first two arguments are the split and its indices, the
    third the batch size) with `shrunk` rows, and selects, scores and ends as the same run with
    every train batch padded to `padded` rows (`lora_jax.trainer.train_batch_rows` turned off;
    evaluation batches as before):
    `assert_same_run` with parameters within `atol` and logged values (losses, gradient norms:
    sums in another order) within 1e-6 of each other."""
    import pathlib

    from lora_jax import trainer

    sizes, make_batch = [], batch_module.make_batch

    def recording(split, idx, batch_size, *args, **kw):
        sizes.append((len(split), batch_size))
        return make_batch(split, idx, batch_size, *args, **kw)

    monkeypatch.setattr(batch_module, "make_batch", recording)
    one, two = pathlib.Path(workdir) / "shrunk", pathlib.Path(workdir) / "padded"
    train(str(one))
    steps = [size for n, size in sizes if n == rows]
    assert steps and set(steps) == {shrunk}, steps
    sizes.clear()
    monkeypatch.setattr(trainer, "train_batch_rows", lambda rows, batch_size, *a: batch_size)
    train(str(two))
    assert [size for n, size in sizes if n == rows] == [padded] * len(steps)
    assert_same_run(one, two, atol=atol, log_rtol=1e-6)

def assert_two_processes_equal_one(args: list[str], tmp_path, one_args: Sequence[str] = (),
                                   two_args: Callable[[Any], list[str]] | None = None) -> tuple:
    """The same run in one process on two devices, then in two processes (``lora_jax.launch``)
    with no other setting: the same selection, metrics, logged lines and trained trees, and the
    same files written.
    one_args: more arguments of the one-process run; two_args(one-process workdir): more
    arguments of the two-process run. Returns the workdirs (one process, two processes)."""
    one, two = tmp_path / "one", tmp_path / "two"
    for workdir, processes, extra in ((one, 1, lambda: list(one_args)),
                                      (two, 2, lambda: two_args(one) if two_args else [])):
        proc = train_py([*args, *extra()], workdir, processes)
        assert proc.returncode == 0, failure_excerpt(proc.stdout + proc.stderr)
    assert_same_run(one, two)
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert (a["processes"], b["processes"], a["mesh"], b["mesh"]) == (
        1, 2, {"data": 2, "fsdp": 1}, {"data": 2, "fsdp": 1})
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    return one, two
