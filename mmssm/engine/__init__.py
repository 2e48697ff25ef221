"""Optimizer constructors, hooks and model wrappers."""
