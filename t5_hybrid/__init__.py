"""FLAN-T5 prompt tuning + LoRA: a Flax T5 (v1.0 / v1.1), jit generation with a KV cache,
text-to-text tasks (SST-2, SAMSum, WikiSQL) and the paper's ablation (see `t5_hybrid.train`)."""
