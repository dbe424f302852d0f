"""Sample-level (patient-level) train/validation/test splits: no sample in two splits."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def split_samples(
    sample_ids: Iterable[str],
    *,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Split distinct sample (patient) ids into train / val / test.

    Parameters
    ----------
    sample_ids
        Sample ids, repeated or not (e.g. ``patches.sample_id``); each distinct id goes to exactly one split.
    val_fraction, test_fraction
        Fractions of the distinct samples for validation and test (rounded, at least one each when the fraction is
        positive, and at least one sample left for training).
    seed
        Seed of the shuffle.

    Returns
    -------
    ``{"train": [...], "val": [...], "test": [...]}``.

    Examples
    --------
    >>> from c3diff.pp import split_samples
    >>> split_samples(["p1", "p1", "p2", "p3", "p4", "p5"], val_fraction=0.2, test_fraction=0.2, seed=0)["test"]
    ['p5']
    """
    unique = list(dict.fromkeys(str(s) for s in sample_ids))
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must be in [0, 1), got {value!r}.")
    n = len(unique)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    n_test = 0 if test_fraction == 0 else max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise ValueError(
            f"{n} distinct sample(s) cannot be split into train/val/test with val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}; splits are made by sample, never by patch. Add samples or lower the "
            "fractions."
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [unique[i] for i in order]
    return {
        "train": shuffled[n_val + n_test :],
        "val": shuffled[:n_val],
        "test": shuffled[n_val : n_val + n_test],
    }
