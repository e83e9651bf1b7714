"""The sts command, the demo, the offline model, SAE training."""
