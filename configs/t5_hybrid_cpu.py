"""Offline smoke run of the FLAN-T5 hybrid: a small random T5 (ByT5 bytes, no download) on
../shared/data, on CPU.

    python train.py --config configs/t5_hybrid_cpu.py:prompt_lora --workdir runs/t5_cpu/sst2 \
        --config.task=sst2
    # samsum: --config.task=samsum; wikisql has no train split offline:
    #   --config.task=wikisql --config.train_split=validation --config.selection_split=heldout
    # (trains on validation minus a held-out slice that selects the model, reports test)

No real T5 weights exist on these machines, so the scores only show that the pipeline runs
end to end (training, selection, generation, metrics, checkpoints, samples); they are not the
paper's numbers. Same variants as configs/t5_hybrid.py.
"""

from configs import t5_hybrid


def get_config(variant: str = "prompt_lora"):
    c = t5_hybrid.get_config(variant)
    c.model = "random:tiny"
    c.dtype = "float32"  # bf16 matmuls are emulated (slow) on CPU
    c.data_dir = "../shared/data"
    c.max_source_length = 96  # bytes (ByT5 tokens)
    c.max_target_length = 12  # bytes: "negative" + EOS fits; the sweep sets it per task
    c.max_train_examples = 2000
    c.max_eval_examples = 200
    c.selection_size = 200
    c.num_epochs = 2
    c.optimizer.warmup_steps = 20
    # A random model has no prior for a soft prompt or LoRA to steer: 10x the paper's rates
    # (1e-2 for adapters, 1e-3 for full fine-tuning) make it move within 2 epochs.
    c.optimizer.learning_rate *= 10
    c.batch_size = 16
    c.log_every_steps = 20
    return c
