"""Simulation scenarios, the experiment runner, tables and plots."""
