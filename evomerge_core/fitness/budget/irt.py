"""Informative item subsets: a small item-response model fitted on calibration results
(models x items), the items that best separate candidates, and full-set estimates from them.

Each item j gets a difficulty b_j and a discrimination a_j against an ability theta_i, the
standardised full-set score of calibration model i:

- binary items (0/1 correctness): 2PL, P(y_ij = 1) = sigmoid(a_j * theta_i - b_j), fitted per
  item by a few Newton steps (with a small ridge, so an item every model answers alike gets
  a ~ 0 instead of diverging);
- graded items (e.g. answer log-likelihoods): the linear analogue y_ij = b_j + a_j * theta_i.

An item's information (how well it separates candidates near the calibration abilities) is
a_j^2 p(1-p) averaged over the models (2PL) or a_j^2 / residual variance (linear). The subset
is the `size` most informative items. A candidate's full-set score is estimated as in
tinyBenchmarks' gp-IRT: its observed values on the items it was scored on, plus the model's
prediction for every other item at its ability, which is fitted from the observed items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class ItemModel:
    """Per-item parameters over the `n_items` train items."""

    kind: str  # "2pl" | "linear"
    a: list[float]
    b: list[float]
    noise: list[float]  # linear: residual variance per item; 2pl: unused (1.0)
    scale: tuple[float, float]  # (mean, std) of the full-set scores theta was standardised with

    def to_dict(self) -> dict:
        return {"kind": self.kind, "a": self.a, "b": self.b, "noise": self.noise, "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, data: dict) -> ItemModel:
        return cls(data["kind"], list(data["a"]), list(data["b"]), list(data["noise"]), tuple(data["scale"]))

    def predict(self, theta: float) -> np.ndarray:
        """Expected value of every item at ability `theta`."""
        a, b = np.asarray(self.a), np.asarray(self.b)
        if self.kind == "2pl":
            return 1.0 / (1.0 + np.exp(-(a * theta - b)))
        return b + a * theta


def _is_binary(y: np.ndarray) -> bool:
    return bool(np.all((y == 0.0) | (y == 1.0)))


def fit(results: Sequence[Sequence[float]], ridge: float = 0.1) -> ItemModel:
    """Fit the item model on calibration results (one row per model, one column per item)."""
    y = np.asarray(results, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] < 2:
        raise ValueError("the item model needs per-item results of at least 2 models")
    totals = y.mean(axis=1)
    mean, std = float(totals.mean()), float(totals.std())
    theta = (totals - mean) / std if std > 0 else np.zeros_like(totals)
    if _is_binary(y):
        a, b = _fit_2pl(y, theta, ridge)
        return ItemModel("2pl", a.tolist(), b.tolist(), [1.0] * y.shape[1], (mean, std))
    x = np.stack([np.ones_like(theta), theta], axis=1)
    coef, *_ = np.linalg.lstsq(x.T @ x + ridge * np.diag([0.0, 1.0]), x.T @ y, rcond=None)
    b, a = coef[0], coef[1]
    resid = y - (b[None, :] + a[None, :] * theta[:, None])
    noise = np.maximum(resid.var(axis=0), 1e-12 + 1e-6 * y.var())
    return ItemModel("linear", a.tolist(), b.tolist(), noise.tolist(), (mean, std))


def _fit_2pl(y: np.ndarray, theta: np.ndarray, ridge: float, steps: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Per-item logistic regression of y on theta (parameters a, -b), Newton steps with a ridge."""
    n_items = y.shape[1]
    w = np.zeros((n_items, 2))  # (a, -b) per item
    x = np.stack([theta, np.ones_like(theta)], axis=1)  # models x 2
    for _ in range(steps):
        z = w @ x.T  # items x models
        p = 1.0 / (1.0 + np.exp(-z))
        grad = (y.T - p) @ x - ridge * w
        weights = p * (1 - p)
        hess = np.einsum("im,mk,ml->ikl", weights, x, x) + ridge * np.eye(2)[None]
        w = w + np.linalg.solve(hess, grad[..., None])[..., 0]
    return w[:, 0], -w[:, 1]


def information(model: ItemModel, thetas: Sequence[float]) -> np.ndarray:
    """Each item's information, averaged over the abilities `thetas`."""
    a = np.asarray(model.a)
    if model.kind == "2pl":
        p = np.stack([model.predict(t) for t in thetas])
        return (a[None, :] ** 2 * p * (1 - p)).mean(axis=0)
    return a ** 2 / np.asarray(model.noise)


def select_items(model: ItemModel, thetas: Sequence[float], size: int) -> list[int]:
    """The `size` most informative items (ties: the lower index first), most informative first."""
    info = information(model, thetas)
    order = sorted(range(len(info)), key=lambda j: (-round(float(info[j]), 12), j))
    return order[:size]


def ability(model: ItemModel, items: Sequence[int], values: Sequence[float], prior: float = 1.0) -> float:
    """The ability that best explains `values` on `items` (MAP with a N(0, 1/prior) prior)."""
    if not items:
        return 0.0
    a = np.asarray(model.a)[list(items)]
    b = np.asarray(model.b)[list(items)]
    y = np.asarray(values, dtype=np.float64)
    if model.kind == "linear":
        w = 1.0 / np.asarray(model.noise)[list(items)]
        return float((w * a * (y - b)).sum() / ((w * a * a).sum() + prior))
    theta = 0.0
    for _ in range(30):  # Newton on the concave log posterior
        p = 1.0 / (1.0 + np.exp(-(a * theta - b)))
        grad = float((a * (y - p)).sum()) - prior * theta
        hess = float((a * a * p * (1 - p)).sum()) + prior
        step = grad / hess
        theta += step
        if abs(step) < 1e-10:
            break
    return float(theta)


def estimate(model: ItemModel, items: Sequence[int], values: Sequence[float]) -> float:
    """Full-set mean estimated from the observed `values` on `items` (gp-IRT style: observed
    where seen, the fitted model's prediction at the candidate's ability elsewhere)."""
    predicted = model.predict(ability(model, items, values))
    n = len(predicted)
    seen = np.zeros(n, dtype=bool)
    seen[list(items)] = True
    total = float(np.sum(values)) + float(predicted[~seen].sum())
    return total / n if n else math.nan


def anchor_items(results: Sequence[Sequence[float]], size: int, steps: int = 20) -> tuple[list[int], list[float]]:
    """tinyBenchmarks' anchor points: cluster the items by their calibration response vectors
    (centred per item, so items every model answers alike form one cluster), take the item
    nearest each cluster centre as its anchor, weighted by the cluster's share of the items.
    Deterministic (farthest-point start, then Lloyd steps). Returns anchors (heaviest first)
    and their weights (summing to 1)."""
    x = np.asarray(results, dtype=np.float64)
    x = (x - x.mean(axis=0, keepdims=True)).T  # items x models
    n = x.shape[0]
    size = min(size, n)
    centres = [int(np.argmax((x ** 2).sum(axis=1)))]
    dist = ((x - x[centres[0]]) ** 2).sum(axis=1)
    for _ in range(size - 1):
        nxt = int(np.argmax(dist))
        centres.append(nxt)
        dist = np.minimum(dist, ((x - x[nxt]) ** 2).sum(axis=1))
    c = x[centres].copy()
    for _ in range(steps):
        labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        for k in range(size):
            if (labels == k).any():
                c[k] = x[labels == k].mean(axis=0)
    labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    anchors = []
    for k in range(size):
        members = np.where(labels == k)[0]
        if len(members):
            best = int(members[np.argmin(((x[members] - c[k]) ** 2).sum(axis=1))])
            anchors.append((len(members), best))
    anchors.sort(key=lambda t: (-t[0], t[1]))
    return [a for _, a in anchors], [w / n for w, _ in anchors]
