"""PEFT's ``IncrementalPCA`` (``peft.utils.incremental_pca``), the part EVA uses, in plain torch.

EVA calls ``partial_fit`` on each batch of a layer's inputs with
``lowrank=True`` and ``lowrank_seed=42``; the arithmetic here is PEFT's, step
for step (float64 running mean and variance, the same stacked matrix, the same
seeded ``torch.svd_lowrank`` and sign flip), so components match PEFT's on the
same data. Kept here because megalora must run without PEFT installed.
"""

from __future__ import annotations

from typing import Optional

import torch


class IncrementalPCA:
    """Centred incremental PCA on row batches ``[n_samples, n_features]``.

    Args:
        n_components: Components kept.
        lowrank_seed: Seed of ``torch.svd_lowrank`` (drawn in a forked RNG, so
            the caller's global RNG is untouched).
        lowrank_niter: Subspace iterations of ``torch.svd_lowrank``.
    """

    def __init__(self, n_components: int, lowrank_seed: Optional[int] = 42, lowrank_niter: int = 4):
        self.n_components = n_components
        self.lowrank_q = n_components * 2
        self.lowrank_seed = lowrank_seed
        self.lowrank_niter = lowrank_niter
        self.n_features_ = None

    def _svd(self, x: torch.Tensor):
        seeded = self.lowrank_seed is not None
        with torch.random.fork_rng(enabled=seeded):
            if seeded:
                torch.manual_seed(self.lowrank_seed)
            u, s, v = torch.svd_lowrank(x, q=self.lowrank_q, niter=self.lowrank_niter)
            return u, s, v.mH

    @staticmethod
    def _mean_and_var(x, last_mean, last_var, last_count):
        new_count = torch.tensor([x.shape[0]], device=x.device)
        count = last_count + new_count
        last_sum = (torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None
                    else last_mean * last_count)
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / count
        temp = x - new_sum / new_count
        correction = temp.sum(dim=0, dtype=torch.float64).square()
        temp.square_()
        new_unnormalized = temp.sum(dim=0, dtype=torch.float64)
        new_unnormalized -= correction / new_count
        if last_var is None:
            return mean, new_unnormalized / count, count
        last_over_new = last_count.double() / new_count
        unnormalized = (last_var * last_count + new_unnormalized
                        + last_over_new / count * (last_sum / last_over_new - new_sum).square())
        return mean, unnormalized / count, count

    @staticmethod
    def _svd_flip_v(u, vt):
        rows = torch.argmax(torch.abs(vt), dim=1)
        signs = torch.sign(vt[range(vt.shape[0]), rows])
        u *= signs[: u.shape[1]].view(1, -1)
        vt *= signs.view(-1, 1)
        return u, vt

    def partial_fit(self, x: torch.Tensor) -> "IncrementalPCA":
        """Fold the batch ``x`` into the estimate (``x`` is copied, never changed)."""
        x = x.clone()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        n_samples, n_features = x.shape
        if self.n_components > n_features:
            raise ValueError(f"n_components={self.n_components} invalid for n_features={n_features}, need more "
                             "rows than columns for IncrementalPCA processing.")
        if self.n_components > n_samples:
            raise ValueError(f"n_components={self.n_components} must be less or equal to the batch number of "
                             f"samples {n_samples}")
        first = not hasattr(self, "components_")
        if first:
            self.mean_, self.var_ = None, None
            self.n_samples_seen_ = torch.tensor([0], device=x.device)
            self.n_features_ = n_features
        elif n_features != self.n_features_:
            raise ValueError("Number of features of the new batch does not match the number of features of the "
                             "first batch.")
        mean, var, total = self._mean_and_var(x, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            factor = torch.sqrt((self.n_samples_seen_.double() / total) * n_samples)
            x = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, x,
                              factor * (self.mean_ - batch_mean)))
        u, s, vt = self._svd(x)
        u, vt = self._svd_flip_v(u, vt)
        self.n_samples_seen_ = total
        self.components_ = vt[: self.n_components]
        self.singular_values_ = s[: self.n_components]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (s**2 / torch.sum(var * total))[: self.n_components]
        return self
