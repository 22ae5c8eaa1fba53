"""dgmood: fully unsupervised out-of-distribution detection with deep generative models."""

__version__ = "0.1.0"
