"""An offline text-to-text task for tests and smoke runs of the T5 hybrid.

`make_keyword_task` writes ``<data_dir>/synth/keyword/{train,validation}.jsonl.gz`` with fields
``sentence`` and ``label``: 3-9 filler words, and in half of the rows (label 1) the word "zebra"
at a random position. The task `synth_keyword` maps label 0/1 to the target words "no"/"yes";
no filler contains a "z", so a byte-level model can learn it from one character.
"""

from __future__ import annotations

import os

import numpy as np

from lora_jax.synthetic import write_jsonl_gz

FILLERS = ("the", "a", "cat", "dog", "sat", "on", "mat", "ran", "home", "red", "blue", "big",
           "small", "tree", "house", "bird", "fish", "sun", "moon", "rain")
KEYWORD = "zebra"


def _row(rng: np.random.Generator) -> dict:
    words = [str(w) for w in rng.choice(FILLERS, rng.integers(3, 10))]
    label = int(rng.random() < 0.5)
    if label:
        words.insert(int(rng.integers(0, len(words) + 1)), KEYWORD)
    return {"sentence": " ".join(words), "label": label}


def make_keyword_task(data_dir: str, n_train: int = 2000, n_validation: int = 200,
                      seed: int = 0) -> str:
    """Write the splits; returns the task folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(data_dir, "synth", "keyword")
    for split, n in (("train", n_train), ("validation", n_validation)):
        write_jsonl_gz(os.path.join(folder, f"{split}.jsonl.gz"), [_row(rng) for _ in range(n)])
    return folder
