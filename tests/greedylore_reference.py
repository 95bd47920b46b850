"""A NumPy reference of GreedyLore, written from the spec (section 1.3), not from the code.

It keeps one (a x b) matrix state per compressible leaf and loops over devices
explicitly; float64 throughout. The only things it shares with lore_jax are the
documented conventions: leaf -> matrix view (flatten to (prod(shape[:-1]), shape[-1]),
transpose if tall), the size gate, and the probe formula (groups of same oriented
shape numbered by first appearance, probes of step t for group g drawn as
``jax.random.normal(fold_in(fold_in(key, t), g), (1, k, a, b))``, or ``(1, k, b)`` for
shared probes).
"""

from __future__ import annotations

import jax
import numpy as np


def _view(x: np.ndarray) -> tuple[np.ndarray, bool]:
    m = x.reshape(-1, x.shape[-1])
    tall = m.shape[0] > m.shape[1]
    return (m.T if tall else m), tall


def _svd_basis(h: np.ndarray) -> np.ndarray:
    u, _, _ = np.linalg.svd(h, full_matrices=False)
    for j in range(u.shape[1]):
        i = np.argmax(np.abs(u[:, j]))
        if u[i, j] < 0:
            u[:, j] = -u[:, j]
    return u


class GreedyLoreReference:
    def __init__(self, params: dict, rank: int, tau: int, t0: int, n: int, key,
                 ef: str | None = "ef14", rate: float = 2.0, probes: str = "independent"):
        self.names = sorted(params)  # dict leaves flatten in sorted-key order
        self.rank, self.tau, self.t0, self.n, self.ef, self.key = rank, tau, t0, n, ef, key
        self.shared = probes == "shared"
        self.t = 0
        self.comp, self.group, self.pos = {}, {}, {}
        shapes: list[tuple[int, int]] = []
        counts: dict[tuple[int, int], int] = {}
        for name in self.names:
            x = np.asarray(params[name])
            if x.ndim < 2:
                continue
            m, _ = _view(x)
            a, b = m.shape
            r = min(rank, a)
            if not r * b * rate < a * b:
                continue
            if (a, b) not in shapes:
                shapes.append((a, b))
            self.group[name] = shapes.index((a, b))
            self.pos[name] = counts.get((a, b), 0)
            counts[(a, b)] = self.pos[name] + 1
            self.comp[name] = (a, b, r)
        self.counts = [counts[s] for s in shapes]
        self.E = {k: np.zeros((n, a, b)) for k, (a, b, _) in self.comp.items()}
        self.h = {k: np.zeros((a, b)) for k, (a, b, _) in self.comp.items()}
        self.U = {k: np.eye(a) for k, (a, _, _) in self.comp.items()}

    def probes(self, name: str) -> np.ndarray:
        a, b, _ = self.comp[name]
        g = self.group[name]
        k = jax.random.fold_in(jax.random.fold_in(self.key, self.t), g)
        shape = (1, self.counts[g], b) if self.shared else (1, self.counts[g], a, b)
        v = jax.random.normal(k, shape)
        return np.asarray(v, np.float64)[0, self.pos[name]]

    def step(self, grads: list[dict]) -> dict:
        """grads: one dict of leaves per device. Returns the output (dict of leaves)."""
        t, out = self.t, {}
        for name in self.names:
            gs = [np.asarray(g[name], np.float64) for g in grads]
            if name not in self.comp:
                out[name] = np.mean(gs, axis=0)
                continue
            views = [_view(g)[0] for g in gs]
            tall = _view(gs[0])[1]
            a, b, r = self.comp[name]
            if self.ef == "ef14":
                xs = [v + self.E[name][i] for i, v in enumerate(views)]
            elif self.ef == "ef21":
                xs = [v - self.E[name][i] for i, v in enumerate(views)]
            else:
                xs = views
            if t < self.t0 or (t - self.t0) % self.tau == 0:
                hbar = np.mean(xs, axis=0)
                if t >= self.t0:
                    self.U[name] = _svd_basis(hbar)
                c_local, c_bar = xs, hbar
            else:
                u = self.U[name]
                v = self.probes(name)
                if self.shared:   # one probe for every direction: lam_j = u_j^T H v
                    lam = np.mean([u.T @ (x @ v) for x in xs], axis=0)
                else:             # one probe per direction: lam_j = <(U^T H)[j], v_j>
                    lam = np.mean([np.sum((u.T @ x) * v, axis=1) for x in xs], axis=0)
                score = lam ** 2
                order = sorted(range(a), key=lambda j: (-score[j], j))[:r]
                p = u[:, order]
                rs = [p.T @ x for x in xs]
                c_local = [p @ rr for rr in rs]
                c_bar = p @ np.mean(rs, axis=0)
            if self.ef == "ef14":
                self.E[name] = np.stack([x - c for x, c in zip(xs, c_local, strict=True)])
                res = c_bar
            elif self.ef == "ef21":
                self.E[name] = self.E[name] + np.stack(c_local)
                self.h[name] = self.h[name] + c_bar
                res = self.h[name]
            else:
                res = c_bar
            res = res.T if tall else res
            out[name] = res.reshape(gs[0].shape)
        self.t += 1
        return out
