"""Linear probes: what a linear router could reach on the inputs it reads.

A router is a linear scorer of the pooled hidden state, so the held-out
accuracy of a linear classifier fitted to convergence on the same pooled
inputs is the ceiling a router's accuracy is measured against. The probe
standardises its features (mean removed, per-feature scale) with statistics of
its training split only, and fits a multinomial logistic regression with a
small L2 penalty by L-BFGS, in float64: no learning rate, no step budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

L2 = 1e-3  # per-sample penalty on the weights: keeps separable classes from diverging
MAX_ITER = 500


@dataclass
class Standardiser:
    """x → (x - mean) / scale, per feature; fitted on one split, applied to any."""

    mean: torch.Tensor  # (H,)
    scale: torch.Tensor  # (H,)

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = 1e-6) -> Standardiser:
        """x: (N, H). A feature that never varies keeps scale `eps`-floored: it stays ~0."""
        x = x.double()
        mean = x.mean(0)
        std = x.std(0, correction=0) if x.shape[0] > 1 else torch.ones_like(mean)
        return cls(mean, std.clamp(min=eps * max(float(std.max()), 1e-12)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) / self.scale


@dataclass
class LinearProbe:
    standardiser: Standardiser
    weight: torch.Tensor  # (C, H)
    bias: torch.Tensor  # (C,)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, H) → (N,) class indices."""
        return (self.standardiser(x) @ self.weight.T + self.bias).argmax(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if not len(y):
            return float("nan")
        return float((self.predict(x) == y.to(self.weight.device)).double().mean())


def fit_linear_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = L2) -> LinearProbe:
    """A standardised multinomial logistic regression fitted to convergence. x: (N, H), y: (N,)."""
    standardiser = Standardiser.fit(x)
    z = standardiser(x)  # (N, H) float64
    y = y.long().to(z.device)
    weight = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=z.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=MAX_ITER, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), one_thread():
        optimizer.step(closure)
    return LinearProbe(standardiser, weight.detach(), bias.detach())


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one CPU thread, then as before. A fit is hundreds of small L-BFGS steps, where
    threads cost more in hand-offs than they share out: measured on 2 busy cores, 5 folds of
    16 x 128 took 7.4 s on 2 threads and 0.34 s on one; of 1000 x 1536, 8.8 s and 1.8 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                   test_y: torch.Tensor, num_classes: int) -> float:
    """Held-out accuracy of a probe fitted on the training split."""
    return fit_linear_probe(train_x, train_y, num_classes).accuracy(test_x, test_y)


def cross_validated_accuracy(x: torch.Tensor, y: torch.Tensor, num_classes: int, folds: int = 5,
                             seed: int = 0) -> float:
    """Accuracy of probes each scored on the fold it never saw (every sample scored once)."""
    n = len(y)
    if n < 2:
        raise ValueError(f"a probe needs at least 2 labelled samples, got {n}")
    folds = min(folds, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    right = 0
    for fold in order.tensor_split(folds):
        keep = torch.ones(n, dtype=torch.bool)
        keep[fold] = False
        probe = fit_linear_probe(x[keep], y[keep], num_classes)
        right += int((probe.predict(x[fold]) == y[fold]).sum())
    return right / n
