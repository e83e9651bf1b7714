"""Whole passes built on core and scoring: the forecast, re-checks, the guard's decisions, gating, run-level terms."""
