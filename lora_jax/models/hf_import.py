"""Read Hugging Face encoder checkpoints into the Flax parameter tree by name mapping.

`resolve_model_dir` turns a local folder or a hub id into a folder; `load_pretrained` reads its
`config.json` and weights (`model.safetensors`, `pytorch_model.bin` when torch is installed, or
either sharded with an ``*.index.json``), maps every tensor name to a Flax path, and reports
missing / unexpected keys the way transformers does. A ``*ForSequenceClassification``
checkpoint also brings its classification head (`hf_head_module_map`). `hf_name_map` is also the
bridge used by the PEFT adapter import/export and the merged export.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from lora_jax.errors import UserError
from lora_jax.models.config import EncoderConfig

log = logging.getLogger(__name__)

# The encoder's attribute in transformers' task models (BertForSequenceClassification.bert ...).
ARCH_PREFIX = {"bert": "bert.", "distilbert": "distilbert.", "electra": "electra."}
# Prefixes stripped from checkpoint names (task models, and "model." of some exports).
_PREFIXES = (*ARCH_PREFIX.values(), "model.")
_IGNORED_SUFFIXES = ("position_ids",)  # buffers, not weights

Path = tuple[str, ...]


def _linear(hf: str, flax: Path) -> dict[str, tuple[Path, str]]:
    return {f"{hf}.weight": ((*flax, "kernel"), "T"), f"{hf}.bias": ((*flax, "bias"), "")}


def _norm(hf: str, flax: Path) -> dict[str, tuple[Path, str]]:
    return {f"{hf}.weight": ((*flax, "scale"), ""), f"{hf}.bias": ((*flax, "bias"), "")}


def hf_module_map(config: EncoderConfig) -> dict[Path, str]:
    """Flax module path (under the encoder) -> Hugging Face module name, for Dense layers.

    Used to export LoRA adapters with PEFT names (``encoder.layer.0.attention.self.query``).
    """
    out: dict[Path, str] = {}
    for i in range(config.num_layers):
        layer = (f"layer_{i}",)
        if config.model_type == "distilbert":
            pre = f"transformer.layer.{i}"
            names = {("attention", "query"): "attention.q_lin", ("attention", "key"): "attention.k_lin",
                     ("attention", "value"): "attention.v_lin",
                     ("attention", "output"): "attention.out_lin",
                     ("intermediate",): "ffn.lin1", ("output",): "ffn.lin2"}
        else:
            pre = f"encoder.layer.{i}"
            names = {("attention", "query"): "attention.self.query",
                     ("attention", "key"): "attention.self.key",
                     ("attention", "value"): "attention.self.value",
                     ("attention", "output"): "attention.output.dense",
                     ("intermediate",): "intermediate.dense", ("output",): "output.dense"}
        for sub, hf in names.items():
            out[layer + sub] = f"{pre}.{hf}"
    if config.embedding_size != config.hidden_size:
        out[("embeddings", "projection")] = "embeddings_project"
    if config.has_pooler:
        out[("pooler",)] = "pooler.dense"
    return out


def hf_head_module_map(model_type: str) -> dict[Path, str]:
    """Flax module path under ``params/head`` -> transformers module name, for the head of
    ``<Model>ForSequenceClassification`` (`lora_jax.models.encoder.HFClassificationHead`)."""
    return {"bert": {("classifier",): "classifier"},
            "distilbert": {("pre_classifier",): "pre_classifier", ("classifier",): "classifier"},
            "electra": {("dense",): "classifier.dense", ("out_proj",): "classifier.out_proj"},
            }[model_type]


def hf_head_name_map(model_type: str) -> dict[str, tuple[Path, str]]:
    """transformers head tensor name -> (Flax path under ``params/head``, transform)."""
    m: dict[str, tuple[Path, str]] = {}
    for path, hf in hf_head_module_map(model_type).items():
        m.update(_linear(hf, path))
    return m


def hf_name_map(config: EncoderConfig) -> dict[str, tuple[Path, str]]:
    """Hugging Face tensor name (prefix stripped) -> (Flax path, transform); "T" = transpose."""
    m: dict[str, tuple[Path, str]] = {}
    emb = ("embeddings",)
    m["embeddings.word_embeddings.weight"] = ((*emb, "word_embeddings", "embedding"), "")
    m["embeddings.position_embeddings.weight"] = ((*emb, "position_embeddings", "embedding"), "")
    if config.type_vocab_size:
        m["embeddings.token_type_embeddings.weight"] = (
            (*emb, "token_type_embeddings", "embedding"), "")
    m.update(_norm("embeddings.LayerNorm", (*emb, "LayerNorm")))
    for flax_path, hf in hf_module_map(config).items():
        m.update(_linear(hf, flax_path))
    for i in range(config.num_layers):
        if config.model_type == "distilbert":
            pre = f"transformer.layer.{i}"
            m.update(_norm(f"{pre}.sa_layer_norm", (f"layer_{i}", "attention_norm")))
            m.update(_norm(f"{pre}.output_layer_norm", (f"layer_{i}", "output_norm")))
        else:
            pre = f"encoder.layer.{i}"
            m.update(_norm(f"{pre}.attention.output.LayerNorm", (f"layer_{i}", "attention_norm")))
            m.update(_norm(f"{pre}.output.LayerNorm", (f"layer_{i}", "output_norm")))
    return m


def _normalise_name(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
            break
    # Old TF-converted checkpoints call LayerNorm weights gamma/beta.
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                       "LayerNorm.bias")


def resolve_model_dir(model: str) -> str:
    """A local Hugging Face folder (``~`` expanded), or a hub id downloaded with
    `snapshot_download`."""
    model = os.path.expanduser(model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UserError(f"model folder {model!r} has no config.json; point --config.model at "
                            "a Hugging Face model folder (config.json + model.safetensors)")
        return model
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1
    if looks_like_path:
        raise UserError(f"model path {model!r} does not exist; pass an existing local folder "
                        "with --config.model=/path/to/model or a hub id such as bert-base-uncased")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=[
            "config.json", "*.safetensors", "tokenizer*", "vocab*", "special_tokens_map.json",
            "merges.txt", "*.model"])
    except Exception as e:  # offline, unknown id, gated repo...
        raise UserError(f"could not get model {model!r} from the Hugging Face Hub "
                        f"({type(e).__name__}); when offline, download it elsewhere and pass the "
                        "local folder with --config.model=/path/to/model") from None


def load_hf_config(model_dir: str) -> tuple[EncoderConfig, dict]:
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    return EncoderConfig.from_hf(hf), hf


def _unreadable(path: str, error: Exception) -> UserError:
    return UserError(f"cannot read the weights file {path!r} ({type(error).__name__}: "
                     f"{str(error).splitlines()[0][:120] if str(error) else 'corrupt'}); it is "
                     "truncated or corrupt, download or copy it again")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        try:
            return load_file(path)
        except (TypeError, ValueError):  # bf16 tensors cannot be read by the numpy backend
            with safe_open(path, framework="flax") as f:
                return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path} is a PyTorch checkpoint; install torch to read it, or convert "
                        "it to model.safetensors") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on a bad file
        raise _unreadable(path, e) from None
    return {k: v.float().numpy() for k, v in sd.items()}


_SINGLE_FILES = (("model.safetensors", _read_safetensors),
                 ("pytorch_model.bin", _read_torch_bin))


def _read_sharded(index_path: str, read) -> dict[str, np.ndarray]:
    """Every tensor of a sharded checkpoint (``*.index.json`` with a ``weight_map``)."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the shard index {index_path!r} ({type(e).__name__}); it "
                        "needs a 'weight_map' of tensor name -> shard file") from None
    folder = os.path.dirname(index_path)
    state: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise UserError(f"{index_path} names the shard {shard!r}, which is not in {folder}; "
                            "download every shard of the checkpoint")
        state.update(read(path))
    lacking = sorted(set(weight_map) - set(state))
    if lacking:
        raise UserError(f"{index_path} maps {len(lacking)} tensors (e.g. {lacking[0]}) to shards "
                        "that do not hold them; the shards do not match the index")
    return state


def read_state_dict(model_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint folder as float32 numpy arrays (names unchanged): one
    ``model.safetensors`` / ``pytorch_model.bin``, or their shards listed in ``*.index.json``."""
    for name, read in _SINGLE_FILES:
        if os.path.isfile(os.path.join(model_dir, name)):
            return read(os.path.join(model_dir, name))
    for name, read in _SINGLE_FILES:
        index = os.path.join(model_dir, name + ".index.json")
        if os.path.isfile(index):
            return _read_sharded(index, read)
    raise UserError(f"no model.safetensors or pytorch_model.bin (or a sharded *.index.json) in "
                    f"{model_dir!r}; point --config.model at a folder holding the weights")


def _set(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def convert_state_dict(state: Mapping[str, np.ndarray], config: EncoderConfig | None,
                       expected: Mapping, name_map: Mapping | None = None
                       ) -> tuple[dict, list[str], list[str]]:
    """Map a Hugging Face state dict onto the encoder's Flax param tree.

    Args:
      state: tensor name -> array, as in the checkpoint.
      config: the encoder architecture.
      expected: the encoder's param tree (arrays or ShapeDtypeStructs), for the shape check.
      name_map: HF name -> (Flax path, transform) for another architecture (e.g. T5); default
        `hf_name_map(config)`.
    Returns:
      (params, missing, unexpected): a nested dict of float32 arrays for every mapped weight,
      the Flax paths ("a/b/c") the checkpoint did not provide, and the checkpoint names that map
      to nothing.
    """
    name_map = hf_name_map(config) if name_map is None else name_map
    params: dict = {}
    unexpected = []
    for raw, value in state.items():
        name = _normalise_name(raw)
        if name not in name_map:
            if not name.endswith(_IGNORED_SUFFIXES):
                unexpected.append(raw)
            continue
        path, transform = name_map[name]
        value = np.asarray(value, np.float32)
        if transform == "T":
            value = value.T
        want = tuple(_get(expected, path).shape)
        if value.shape != want:
            raise UserError(f"checkpoint tensor {raw} has shape {value.shape} but the model "
                            f"expects {want}; the config.json does not match the weights")
        _set(params, path, value)
    loaded = set(_flatten(params))
    missing = ["/".join(p) for p in _flatten(expected) if p not in loaded]
    return params, missing, unexpected


def report_keys(model_dir: str, missing: list[str], unexpected: list[str]) -> None:
    if unexpected:
        log.warning("Some weights of the checkpoint at %s were not used: %s", model_dir,
                    ", ".join(sorted(unexpected)))
    if missing:
        log.warning("Some weights of the model were not initialized from the checkpoint at %s "
                    "and are newly initialized: %s", model_dir, ", ".join(sorted(missing)))


def encoder_shapes(config: EncoderConfig) -> dict:
    """The encoder's param tree as ShapeDtypeStructs (no memory allocated)."""
    import jax
    import jax.numpy as jnp

    from lora_jax.models.encoder import Encoder

    ids = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda: Encoder(config).init(jax.random.PRNGKey(0), ids))["params"]


def place_pretrained(initialised: dict, pretrained: dict) -> dict:
    """`initialised` with every leaf that `pretrained` has replaced by the pretrained array
    (leaves the checkpoint lacks, such as a new head, keep their initial values)."""
    import jax.numpy as jnp
    from flax import traverse_util

    flat = traverse_util.flatten_dict(initialised)
    for path, value in traverse_util.flatten_dict(pretrained).items():
        flat[path] = jnp.asarray(value)
    return traverse_util.unflatten_dict(flat)


def init_around(model, given: dict, rng, *args) -> dict:
    """`model`'s params: every leaf of `given` (a nested subset of the tree, e.g. a checkpoint's
    encoder under its key) as given, only the others initialised from `rng`.

    One jitted ``model.apply(..., mutable="params")``: flax's ``self.param`` returns a leaf it is
    given (checking its shape) and runs the initialiser only where none is, drawing from the
    same per-module streams as ``model.init(rng, *args)``, so those leaves equal a full init's
    bit for bit. A full init would compile an initialiser for every pretrained leaf only to
    overwrite it (seconds per run on CPU). `args`: the example inputs of ``model.init``.
    """
    import jax

    def init(rng, given):
        _, variables = model.apply({"params": given}, *args, rngs={"params": rng},
                                   mutable=["params"])
        return variables["params"]

    return jax.jit(init)(rng, given)


class Pretrained(NamedTuple):
    """What `load_pretrained` read from a checkpoint folder."""

    model_dir: str
    config: EncoderConfig
    encoder: dict  # nested float32 numpy arrays in the Flax layout
    missing: list[str]  # encoder paths the checkpoint lacks (e.g. pooler/kernel), to initialise
    head: dict | None  # a ForSequenceClassification head in the `HFClassificationHead` layout


def split_head(state: Mapping[str, np.ndarray], model_type: str
               ) -> tuple[dict[str, np.ndarray], dict | None]:
    """(the state without its classification-head tensors, the head as a Flax tree or None)."""
    names = hf_head_name_map(model_type)
    head: dict = {}
    rest = {}
    for raw, value in state.items():
        if raw in names:
            path, transform = names[raw]
            value = np.asarray(value, np.float32)
            _set(head, path, value.T if transform == "T" else value)
        else:
            rest[raw] = value
    return rest, head or None


def head_state_dict(head: Mapping, model_type: str, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of `split_head`: an `HFClassificationHead` tree as transformers head tensors
    (float32, torch's (out, in) layout), each name preceded by `prefix`."""
    out = {}
    for name, (path, transform) in hf_head_name_map(model_type).items():
        value = np.asarray(_get(head, path), np.float32)
        out[prefix + name] = np.ascontiguousarray(value.T if transform == "T" else value)
    return out


def load_pretrained(model: str) -> Pretrained:
    """Resolve `model` (folder or hub id) and read its encoder weights and, for a
    ``*ForSequenceClassification`` checkpoint, its classification head."""
    model_dir = resolve_model_dir(model)
    config, _ = load_hf_config(model_dir)
    state, head = split_head(read_state_dict(model_dir), config.model_type)
    params, missing, unexpected = convert_state_dict(state, config, encoder_shapes(config))
    report_keys(model_dir, missing, unexpected)
    return Pretrained(model_dir, config, params, missing, head)


def to_hf_state_dict(encoder_params: Mapping, config: EncoderConfig,
                     prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of `convert_state_dict`: Hugging Face tensor names -> float32 numpy arrays.

    Use it on `lora.merge(...)["encoder"]` to serve a merged model from PyTorch.
    """
    out = {}
    for name, (path, transform) in hf_name_map(config).items():
        try:
            value = np.asarray(_get(encoder_params, path), np.float32)
        except KeyError:
            continue
        out[prefix + name] = np.ascontiguousarray(value.T if transform == "T" else value)
    return out


def hf_config_dict(config: EncoderConfig) -> dict:
    """A transformers `config.json` dict for `config` (BERT, DistilBERT or ELECTRA)."""
    if config.model_type == "distilbert":
        return {"model_type": "distilbert", "vocab_size": config.vocab_size,
                "dim": config.hidden_size, "n_layers": config.num_layers,
                "n_heads": config.num_heads, "hidden_dim": config.intermediate_size,
                "max_position_embeddings": config.max_position_embeddings,
                "activation": config.hidden_act, "dropout": config.hidden_dropout,
                "attention_dropout": config.attention_dropout,
                "pad_token_id": config.pad_token_id, "sinusoidal_pos_embds": False,
                "architectures": ["DistilBertModel"]}
    d = {"model_type": config.model_type, "vocab_size": config.vocab_size,
         "hidden_size": config.hidden_size, "num_hidden_layers": config.num_layers,
         "num_attention_heads": config.num_heads, "intermediate_size": config.intermediate_size,
         "max_position_embeddings": config.max_position_embeddings,
         "type_vocab_size": config.type_vocab_size, "hidden_act": config.hidden_act,
         "layer_norm_eps": config.layer_norm_eps, "hidden_dropout_prob": config.hidden_dropout,
         "attention_probs_dropout_prob": config.attention_dropout,
         "pad_token_id": config.pad_token_id,
         "architectures": ["BertModel" if config.model_type == "bert" else "ElectraModel"]}
    if config.model_type == "electra":
        d["embedding_size"] = config.embedding_size
    return d
