"""dgmood: fully unsupervised out-of-distribution detection with deep generative models."""

__version__ = "0.1.0"

__all__ = ["load"]


def load(path, detector=None, device="cpu"):
    """Load a fitted run directory as a scoring bundle (imports torch only when called).

    ```python
    import dgmood
    bundle = dgmood.load("runs/demo", detector="knn")   # default: the run's first detector
    bundle.score(images)     # (N,) float, higher = more in-distribution
    bundle.predict(images)   # (N,) int, +1 in-distribution / -1 OOD
    ```

    ``images``: (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or float in [0, 1]. See
    :mod:`dgmood.app.bundle` for the files read and the errors raised.
    """
    from dgmood.app.bundle import load as _load

    return _load(path, detector=detector, device=device)
