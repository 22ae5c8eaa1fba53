"""Generative models: score network, image flow, losses, noise schedule, diffusion view, sampling, training, checkpoints."""
