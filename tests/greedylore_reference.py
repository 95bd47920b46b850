"""A NumPy reference of GreedyLore, written from its algorithm box, not from the code.

The paper's algorithm (``tracking="off"``: Chen et al. 2025, arXiv:2507.08784, Algorithms
2-3) and range tracking (``tracking="range"``), both as the ``lore_jax.greedylore``
module docstring and ``docs/greedylore_derivations.md`` state them. It keeps one (a x b)
matrix state per compressible leaf and loops over devices explicitly; float64
throughout. The only things it shares with lore_jax are the documented conventions: leaf -> matrix
view (flatten to (prod(shape[:-1]), shape[-1]), transpose if tall), the size gate, and
the probe formula (groups of same oriented shape numbered by first appearance; the
probes of step t for all groups drawn as one
``v = jax.random.normal(jax.random.fold_in(key, t), (n,))``, ``n`` the sum over groups of
``p k a b`` (``p k b`` for range tracking's columns), group g's the g-th block of ``v``,
reshaped ``(p, k, a, b)`` or ``(p, k, b)``).

Range tracking: the left singular vectors of ``Y = mean_i H_i [qr(Q), v']``, ``v'`` the
column probes with their part in ``span(qr(Q))`` removed, are the candidates, scored by
their energy ``||u_j^T Y||^2``; a group of k same-shape matrices takes its ``k r`` best
scores over all of its matrices (ties to the lower flat index ``m c + j``); the output
adds to the rows sent ``(I - P) H P_W``, ``P`` the selected directions' projector and
``P_W`` the projector onto ``span([qr(Q), v'])``.
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


def _top(score: np.ndarray, r: int) -> list[int]:
    return sorted(range(len(score)), key=lambda j: (-score[j], j))[:r]


class GreedyLoreReference:
    """``tau``: steps between refreshes (``None``: only the first, after the warm-up)."""

    def __init__(self, params: dict, rank: int, tau: int | None, t0: int, n: int, key,
                 ef: str | None = "ef14", rate: float = 2.0, tracking: str = "off",
                 num_probes: int = 1):
        self.names = sorted(params)  # dict leaves flatten in sorted-key order
        self.rank, self.tau, self.t0, self.n, self.ef, self.key = rank, tau, t0, n, ef, key
        self.tracking = tracking
        self.num_probes = num_probes
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
        self.shapes = shapes
        self.E = {k: np.zeros((n, a, b)) for k, (a, b, _) in self.comp.items()}
        self.h = {k: np.zeros((a, b)) for k, (a, b, _) in self.comp.items()}
        self.U = {k: np.eye(a) for k, (a, _, _) in self.comp.items()}
        self.Q = {k: np.zeros((b, r)) for k, (_, b, r) in self.comp.items()}

    def probes(self, name: str) -> np.ndarray:
        """This step's probes of ``name``: range tracking's columns ``(p, b)``, else
        ``(p, a, b)``."""
        def block(g):   # group g's probes: (p, k, b) or (p, k, a, b)
            a, b = self.shapes[g]
            k = self.counts[g]
            return (self.num_probes, k, b) if self.tracking == "range" else \
                (self.num_probes, k, a, b)

        sizes = [int(np.prod(block(g))) for g in range(len(self.shapes))]
        v = np.asarray(jax.random.normal(jax.random.fold_in(self.key, self.t), (sum(sizes),)),
                       np.float64)
        g = self.group[name]
        start = sum(sizes[:g])
        return v[start:start + sizes[g]].reshape(block(g))[:, self.pos[name]]

    def score(self, name: str, xs: list[np.ndarray]) -> np.ndarray:
        """Estimated energy of every direction of U in the mean, ``(a,)``: the mean over
        probes of the squared device-averaged probe scores
        ``lam_j = mean_i <(U^T H_i)[j], v_j>``."""
        u = self.U[name]
        lams = [np.mean([np.sum((u.T @ x) * v, axis=1) for x in xs], axis=0)
                for v in self.probes(name)]
        return np.mean(np.square(lams), axis=0)

    def compressed(self, xs: dict) -> tuple[dict, dict]:
        """One compressed step of every compressible leaf: (local, mean) reconstructions."""
        scores, right = {}, {}   # right: range tracking's projector onto span([Q_hat, v'])
        for name in self.comp:
            if self.tracking == "range":   # Ritz vectors of Hbar [Q_hat, v'], sigma^2
                q_hat = np.linalg.qr(self.Q[name])[0]
                v = self.probes(name)
                v = v - (v @ q_hat) @ q_hat.T                       # (p, b), outside span
                w = np.concatenate([q_hat, v.T], axis=1)
                y = np.mean([x @ w for x in xs[name]], axis=0)
                right[name] = w @ np.linalg.pinv(w, rcond=1e-6)
                self.U[name] = np.linalg.svd(y, full_matrices=False)[0]
                scores[name] = np.sum((self.U[name].T @ y) ** 2, axis=1)
            else:
                scores[name] = self.score(name, xs[name])
        chosen = {}
        if self.tracking == "off":   # r directions per matrix
            chosen = {name: _top(scores[name], self.comp[name][2]) for name in self.comp}
        else:   # a group's k r best over all of its matrices
            for g in range(len(self.counts)):
                members = sorted((n for n in self.comp if self.group[n] == g),
                                 key=lambda n: self.pos[n])
                c = len(scores[members[0]])
                flat = np.concatenate([scores[n] for n in members])
                picked = _top(flat, len(members) * self.comp[members[0]][2])
                for n in members:
                    chosen[n] = [f % c for f in picked if f // c == self.pos[n]]
        c_local, c_bar = {}, {}
        for name, js in chosen.items():
            p = self.U[name][:, js]
            rs = [p.T @ x for x in xs[name]]
            r_bar = np.mean(rs, axis=0)
            c_local[name] = [p @ rr for rr in rs]
            c_bar[name] = p @ r_bar
            if name in right:   # + the part of H P_W outside span(U[:, J])
                miss = np.eye(p.shape[0]) - p @ p.T
                c_local[name] = [c + miss @ x @ right[name]
                                 for c, x in zip(c_local[name], xs[name], strict=True)]
                c_bar[name] = c_bar[name] + miss @ np.mean(xs[name], axis=0) @ right[name]
                # Q: rows of its r best-scored directions; the old column if unsent
                best = _top(scores[name], self.comp[name][2])
                for c, j in enumerate(best):
                    if j in js:
                        self.Q[name][:, c] = r_bar[js.index(j)]
        return c_local, c_bar

    def step(self, grads: list[dict]) -> dict:
        """grads: one dict of leaves per device. Returns the output (dict of leaves)."""
        t, out = self.t, {}
        xs, views_tall = {}, {}
        for name in self.names:
            gs = [np.asarray(g[name], np.float64) for g in grads]
            if name not in self.comp:
                out[name] = np.mean(gs, axis=0)
                continue
            views = [_view(g)[0] for g in gs]
            views_tall[name] = (_view(gs[0])[1], gs[0].shape)
            if self.ef == "ef14":
                xs[name] = [v + self.E[name][i] for i, v in enumerate(views)]
            elif self.ef == "ef21":
                xs[name] = [v - self.E[name][i] for i, v in enumerate(views)]
            else:
                xs[name] = views
        since = t - self.t0
        if since < 0 or (since == 0 if not self.tau else since % self.tau == 0):
            c_local, c_bar = {}, {}
            for name in self.comp:
                hbar = np.mean(xs[name], axis=0)
                if t >= self.t0:
                    self.U[name] = _svd_basis(hbar)
                    if self.tracking == "range":
                        self.Q[name] = hbar.T @ self.U[name][:, :self.comp[name][2]]
                c_local[name], c_bar[name] = xs[name], hbar
        else:
            c_local, c_bar = self.compressed(xs)
        for name in self.comp:
            if self.ef == "ef14":
                self.E[name] = np.stack([x - c for x, c in zip(xs[name], c_local[name],
                                                                strict=True)])
                res = c_bar[name]
            elif self.ef == "ef21":
                self.E[name] = self.E[name] + np.stack(c_local[name])
                self.h[name] = self.h[name] + c_bar[name]
                res = self.h[name]
            else:
                res = c_bar[name]
            tall, shape = views_tall[name]
            res = res.T if tall else res
            out[name] = res.reshape(shape)
        self.t += 1
        return out
