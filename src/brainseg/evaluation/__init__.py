"""Measuring: metrics, per-lesion measurements, the evaluation protocol, follow-up comparison."""
