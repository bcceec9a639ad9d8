"""Deterministic synthetic demo data for the finance and insurance zones."""
