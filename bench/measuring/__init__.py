"""Measurements, one per module: train (a model on a task), profile (time, memory, FLOPs against n), isolated
and memprobe (a memory measurement in a fresh process), streaming, dynamics, hybrid_speed."""
