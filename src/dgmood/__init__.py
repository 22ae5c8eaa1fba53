"""dgmood: fully unsupervised out-of-distribution detection with deep generative models."""

__version__ = "0.1.0"

__all__ = ["load"]


def load(path, method=None, device="cpu", detector=None):
    """Load a saved detector: a run directory's default method (or ``method`` by name), or a detector folder.

    ```python
    import dgmood
    det = dgmood.load("runs/demo")               # the run's default method (combined for a score model)
    det = dgmood.load("runs/demo", "msma-knn")   # any fitted method by name
    det.score(images)     # (N,) float, higher = more in-distribution
    det.predict(images)   # (N,) int, +1 in-distribution / -1 OOD
    ```

    ``images``: (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 or float in [0, 1]. ``detector`` is the older
    name of ``method`` (``knn``, ``gmm``, ``flow`` mean ``msma-knn``, ...). See :mod:`dgmood.app.loading`.
    Imports torch only when called.
    """
    from dgmood.app.loading import load as _load

    return _load(path, method or detector, device=device)
