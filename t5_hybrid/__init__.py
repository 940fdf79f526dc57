"""FLAN-T5 prompt tuning + LoRA (issue 4; not implemented yet)."""
