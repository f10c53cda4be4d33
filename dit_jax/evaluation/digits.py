"""Sample quality of the digits model with embedded data only: a small network trained on the real digits.

Not ImageNet FID. A multi-layer perceptron (64 pixels -> 64 ReLU units -> 10 classes, scikit-learn) is trained
on 80% of scikit-learn's 1797 real 8x8 digits; its hidden activations are the features. Two numbers:
  digits_fd            Fréchet distance between the features of generated samples and of all real digits
                       (the FID formula on these 64-d features; 0 for a perfect model)
  digits_class_acc     fraction of generated samples the network labels as their conditioning class
Generated images (N, S, S, 1) in [-1, 1] are average-pooled to 8x8 and mapped back to the 0..16 scale.
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import numpy as np

from dit_jax.evaluation.metrics import frechet_distance, statistics

try:  # scikit-learn's own dependency: there wherever the scorer (scikit-learn) can run
    from threadpoolctl import threadpool_limits
except ImportError:  # a sampling-only box without the data stack
    threadpool_limits = None


def to_digit_pixels(images: np.ndarray) -> np.ndarray:
    """(N, S, S, 1) in [-1, 1], S a multiple of 8 -> (N, 64) on load_digits' 0..16 scale."""
    images = np.asarray(images, np.float64)
    n, s = images.shape[0], images.shape[1]
    if s % 8 or images.shape[2] != s:
        raise ValueError(f"expected square images with a size that is a multiple of 8, got {images.shape}")
    r = s // 8
    x = images[..., 0].reshape(n, 8, r, 8, r).mean(axis=(2, 4))  # (N, 8, 8)
    return np.clip((x + 1.0) * 8.0, 0.0, 16.0).reshape(n, 64)


class DigitsScorer:
    """The trained network, the real digits' feature statistics, and `score(images, labels)`."""

    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits  # data-stack extra (scikit-learn), absent on a sampling-only box
        from sklearn.model_selection import train_test_split  # (same)
        from sklearn.neural_network import MLPClassifier  # (same)

        d = load_digits()
        x_tr, x_te, y_tr, y_te = train_test_split(d.data, d.target, test_size=0.2, random_state=seed,
                                                  stratify=d.target)
        self.net = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=2000, random_state=seed)
        # One BLAS thread: the products are (200, 64) x (64, 64); a thread pool spends 6x the CPU (10 s
        # instead of 1.6 on 2 cores, more while a training run shares them) for the same weights.
        with threadpool_limits(limits=1, user_api="blas"):
            self.net.fit(x_tr / 16.0, y_tr)
        self.heldout_accuracy = float(self.net.score(x_te / 16.0, y_te))
        self.real_stats = statistics(self.features(d.data))

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 64) pixels on the 0..16 scale -> (N, 64) hidden ReLU activations."""
        return np.maximum(pixels / 16.0 @ self.net.coefs_[0] + self.net.intercepts_[0], 0.0)

    def score(self, images: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
        pixels = to_digit_pixels(images)
        mu, sigma = statistics(self.features(pixels))
        return {"digits_fd": frechet_distance(mu, sigma, *self.real_stats),
                "digits_class_acc": float(np.mean(self.net.predict(pixels / 16.0) == np.asarray(labels)))}


@functools.lru_cache(maxsize=2)
def scorer(seed: int = 0) -> DigitsScorer:
    """One trained scorer per process and seed (training once takes about a second)."""
    return DigitsScorer(seed)


def real_digits_score(seed: int = 0) -> Tuple[float, float]:
    """(digits_fd, digits_class_acc) of the real digits themselves: the best a model can reach."""
    from sklearn.datasets import load_digits  # data-stack extra (scikit-learn)

    d = load_digits()
    images = (d.images / 8.0 - 1.0)[..., None]
    s = scorer(seed).score(images, d.target)
    return s["digits_fd"], s["digits_class_acc"]
