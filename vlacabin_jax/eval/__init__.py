"""Evaluation (DESIGN.md §6): the cabin simulator, the proposal's metrics, policy/model evaluation, reports."""
