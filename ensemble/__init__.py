"""AttEns: attention combiner over k frozen LoRA modules (issue 3; not implemented yet)."""
