"""Evaluation: bits-per-byte per domain and text generation."""
