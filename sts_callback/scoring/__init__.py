"""Scores from statistics: STS variants, signed features, calibration, early forecasts."""
