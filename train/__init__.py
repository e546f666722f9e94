"""The train stage: QLoRA fine-tuning from a YAML recipe, data validation, merge to a 16-bit model."""
