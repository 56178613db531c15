"""Offline CARE conversion of GQA checkpoints (Llama-3.x, Qwen3) into MLA checkpoints.

Pipeline, one module per step: load -> calibrate -> factorize -> allocate -> rope_map -> assemble -> write.
"""
