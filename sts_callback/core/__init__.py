"""Inputs, prompts, residual capture, SAEs, statistics, extraction, held-out loss, files: no Trainer, no decisions."""
