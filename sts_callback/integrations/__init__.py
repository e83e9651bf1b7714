"""The transformers / TRL Trainer callback and reading a trainer's datasets."""
