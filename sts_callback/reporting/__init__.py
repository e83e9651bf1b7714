"""What a person or a tracker reads: the HTML / Markdown report, W&B and TensorBoard tables."""
