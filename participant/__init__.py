"""The participant: offline models, LoRA fine-tuning, batched generation, evaluation."""
