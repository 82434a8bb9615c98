"""Pretraining: the loop, its optimizer and schedule, checkpoints and throughput accounting."""
