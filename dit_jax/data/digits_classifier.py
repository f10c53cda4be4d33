"""A classifier of real 8x8 digits, used to score class-conditional samples of the digits model.

An RBF SVC on the 64 raw pixels, trained on 80% of load_digits and scored on the other 20%. Generated
images (N, S, S, 1) in [-1, 1] are average-pooled to 8x8 and mapped back to the 0..16 scale first.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def train_classifier(seed: int = 0) -> Tuple[object, float]:
    """-> (fitted classifier, accuracy on the held-out 20% of the real digits)."""
    from sklearn.datasets import load_digits  # data-stack extra (scikit-learn), absent on a sampling-only box
    from sklearn.model_selection import train_test_split  # (same)
    from sklearn.svm import SVC  # (same)

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data, d.target, test_size=0.2, random_state=seed,
                                              stratify=d.target)
    clf = SVC(kernel="rbf", gamma="scale", C=10.0).fit(x_tr, y_tr)
    return clf, float(clf.score(x_te, y_te))


def to_digit_features(images: np.ndarray) -> np.ndarray:
    """(N, S, S, 1) in [-1, 1], S a multiple of 8 -> (N, 64) on load_digits' 0..16 scale."""
    images = np.asarray(images, np.float64)
    n, s = images.shape[0], images.shape[1]
    if s % 8 or images.shape[2] != s:
        raise ValueError(f"expected square images with a size that is a multiple of 8, got {images.shape}")
    r = s // 8
    x = images[..., 0].reshape(n, 8, r, 8, r).mean(axis=(2, 4))  # (N, 8, 8)
    return np.clip((x + 1.0) * 8.0, 0.0, 16.0).reshape(n, 64)


def conditional_accuracy(clf, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of generated images that the classifier labels as their conditioning class."""
    pred = clf.predict(to_digit_features(images))
    return float(np.mean(pred == np.asarray(labels)))
