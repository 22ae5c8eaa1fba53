"""Per-image statistics of images under a model: score norms, likelihoods, LID and its calibration, complexity, reconstruction, k-NN distance; one cache."""
