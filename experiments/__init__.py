"""Experiment scripts (one per paper figure or reviewer question); see experiments/common.py."""
