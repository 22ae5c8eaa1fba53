"""Array detectors: scikit-learn estimators on feature matrices (never import torch models), and their persistence."""
