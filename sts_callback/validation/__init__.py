"""Forecast, then fine-tune for real and correlate: end-to-end checks that use the integration."""
