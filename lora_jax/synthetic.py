"""Offline assets for the quickstart and the tests: a synthetic task and a tiny random BERT.

`make_sentiment_task` writes ``<data_dir>/synth/sentiment/{train,validation}.jsonl.gz``:
short sentences whose label (0 negative, 1 positive) is the majority sentiment of their
adjectives, with "not" flipping the adjective after it. `make_tiny_bert` trains a WordPiece
vocabulary on those texts and saves a randomly initialised BERT in Hugging Face layout
(config.json, model.safetensors, tokenizer.json, vocab.txt). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np

POSITIVE = ("good", "great", "lovely", "superb", "fine", "brilliant", "pleasant", "charming",
            "moving", "delightful", "clever", "warm")
NEGATIVE = ("bad", "awful", "dull", "poor", "boring", "terrible", "weak", "clumsy", "tedious",
            "bland", "messy", "cold")
NOUNS = ("film", "plot", "cast", "script", "ending", "music", "story", "acting", "pace",
         "dialogue", "camera", "finale")
FILLERS = ("the", "a", "this", "that", "honestly", "really", "quite", "and", "but", "so",
           "overall", "frankly")


def _sentence(rng: np.random.Generator) -> tuple[str, int]:
    words, score = [], 0
    for _ in range(rng.integers(1, 4)):
        positive = rng.random() < 0.5
        negated = rng.random() < 0.25
        adj = rng.choice(POSITIVE if positive else NEGATIVE)
        words += [rng.choice(FILLERS), rng.choice(NOUNS), "was"]
        words += ["not", adj] if negated else [adj]
        score += 1 if positive != negated else -1
    if score == 0:  # break ties with one more clear adjective
        adj = rng.choice(POSITIVE + NEGATIVE)
        words += ["and", str(adj)]
        score = 1 if adj in POSITIVE else -1
    return " ".join(words), int(score > 0)


def write_jsonl_gz(path: str | os.PathLike, rows: list[dict]) -> None:
    """One JSON object per line, gzip-compressed: the `../shared/data` split format."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


TOPIC_NOUNS = ("music", "camera", "acting", "dialogue")


def make_sentiment_task(data_dir: str, n_train: int = 2000, n_validation: int = 400,
                        seed: int = 0) -> list[str]:
    """Write the synthetic tasks over one set of sentences; returns all texts (for the tokenizer).

    synth/sentiment: label = majority sentiment. synth/topic: label 1 when the sentence
    mentions a craft noun (music, camera, acting, dialogue), else 0. synth/negation: label 1
    when the sentence negates an adjective ("not").
    """
    rng = np.random.default_rng(seed)
    texts = []
    labellers = {"sentiment": lambda text, label: label,
                 "topic": lambda text, _: int(any(w in text.split() for w in TOPIC_NOUNS)),
                 "negation": lambda text, _: int("not" in text.split())}
    for split, n in (("train", n_train), ("validation", n_validation)):
        rows = {name: [] for name in labellers}
        for i in range(n):
            text, label = _sentence(rng)
            for name, labeller in labellers.items():
                rows[name].append({"sentence": text, "label": labeller(text, label), "idx": i})
            texts.append(text)
        for name, task_rows in rows.items():
            write_jsonl_gz(os.path.join(data_dir, "synth", name, f"{split}.jsonl.gz"), task_rows)
    return texts


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_wordpiece(texts: list[str], out_dir: str) -> int:
    """Write a deterministic uncased WordPiece tokenizer for `texts`; returns the vocab size.

    The vocabulary is counted on the fly: special tokens, every single character and its
    ``##`` continuation (so any word can still be spelled), then whole words by descending
    count (ties alphabetical). `tokenizers`' own trainer is not used because its output order
    changes from run to run.
    """
    from collections import Counter

    from tokenizers import BertWordPieceTokenizer

    words = Counter(w for t in texts for w in t.lower().split())
    chars = sorted({c for w in words for c in w})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    vocab += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
              if w not in vocab]
    tok = BertWordPieceTokenizer({w: i for i, w in enumerate(vocab)}, lowercase=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                   "model_max_length": 64}, f)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                   "sep_token": "[SEP]", "mask_token": "[MASK]"}, f)
    return len(vocab)


def make_tiny_bert(out_dir: str, texts: list[str], hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, seed: int = 0) -> str:
    """A randomly initialised BERT (Flax init, saved with Hugging Face names) plus tokenizer."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from lora_jax.models import Encoder, EncoderConfig
    from lora_jax.models.hf_import import hf_config_dict, to_hf_state_dict

    vocab = build_wordpiece(texts, out_dir)
    config = EncoderConfig(model_type="bert", vocab_size=vocab, hidden_size=hidden_size,
                           num_layers=num_layers, num_heads=num_heads,
                           intermediate_size=4 * hidden_size, max_position_embeddings=64,
                           embedding_size=hidden_size)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = Encoder(config).init(jax.random.PRNGKey(seed), ids)["params"]
    # LayerNorm/bias init as in BERT: scales 1, biases 0 (already so in Flax).
    save_file(to_hf_state_dict(jax.device_get(params), config), os.path.join(out_dir,
                                                                               "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(config), f, indent=2)
    return out_dir


def make_quickstart_assets(root: str, seed: int = 0) -> tuple[str, str]:
    """(model_dir, data_dir) under `root`, created once and reused."""
    model_dir, data_dir = os.path.join(root, "tiny-bert"), os.path.join(root, "data")
    if not os.path.isfile(os.path.join(data_dir, "synth", "negation", "validation.jsonl.gz")):
        texts = make_sentiment_task(data_dir, seed=seed)
        make_tiny_bert(model_dir, texts, seed=seed)
    return model_dir, data_dir
