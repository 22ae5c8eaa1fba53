"""Methods: image detectors built from a model, statistics and an array detector."""
