"""Metrics, reports and plots (never import torch models)."""
