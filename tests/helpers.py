import numpy as np


def relative_error(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ over all elements, computed in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
