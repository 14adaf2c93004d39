"""Integrations of MoELoRA with other training loops: :mod:`moelora_lit.integrations.transformers` (the Hugging Face
Trainer and TRL's SFTTrainer). Nothing here imports Lightning."""
