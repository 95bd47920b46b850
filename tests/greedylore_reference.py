"""A NumPy reference of GreedyLore, written from the spec (section 1.3), not from the code.

It keeps one (a x b) matrix state per compressible leaf and loops over devices
explicitly; float64 throughout. The only things it shares with lore_jax are the
documented conventions: leaf -> matrix view (flatten to (prod(shape[:-1]), shape[-1]),
transpose if tall), the size gate, and the probe formula (groups of same oriented
shape numbered by first appearance; the probes of step t for all groups drawn as one
``v = jax.random.normal(fold_in(wrap_key_data([key, key], impl="unsafe_rbg"), t), (n,))``,
``n`` the sum over groups of ``p k a b`` (``p k b`` for shared probes and probe
columns), group g's the g-th block of ``v``, reshaped ``(p, k, a, b)`` or ``(p, k, b)``).

The lore_jax extensions are written from the spec in the greedylore module docstring:
basis tracking (``tracking="power"``: ``Y = mean_i H_i qr(Q)``, ``T = qr(Y)``, the old
basis completes ``T`` through the block reflector ``F``, written here from its formula;
scores are the exact energy inside ``span(qr(Q))`` plus probes outside it; and
``tracking="range"``: the left singular vectors of ``Y = mean_i H_i [qr(Q), v']``, ``v'``
the column probes with their part in ``span(qr(Q))`` removed, lead the basis, scored by
their energy ``||u_j^T Y||^2``; its output adds to the rows sent ``(I - P) H P_W``, ``P``
the selected directions' projector and ``P_W`` the projector onto span([qr(Q), v'])) and
group allocation (``allocation="group"``: the group's ``k r`` best scores over all of its
matrices, ties to the lower flat index ``m a + j``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def _complete(top: np.ndarray, u_prev: np.ndarray) -> np.ndarray:
    """[T, U_prev F[:, p:]] with F = I - (E + C')(I + C1')^{-1}(E + C')^T (the spec's formula)."""
    a, p = top.shape
    if p == a:
        return top
    c = u_prev.T @ top
    left, _, right_t = np.linalg.svd(c[:p])
    c_rot = c @ right_t.T @ left.T
    e = np.eye(a)[:, :p]
    f = np.eye(a) - (e + c_rot) @ np.linalg.inv(np.eye(p) + c_rot[:p]) @ (e + c_rot).T
    return np.concatenate([top, u_prev @ f[:, p:]], axis=1)


def _top(score: np.ndarray, r: int) -> list[int]:
    return sorted(range(len(score)), key=lambda j: (-score[j], j))[:r]


class GreedyLoreReference:
    def __init__(self, params: dict, rank: int, tau: int, t0: int, n: int, key,
                 ef: str | None = "ef14", rate: float = 2.0, probes: str = "independent",
                 tracking: str = "off", track_every: int = 1, allocation: str = "matrix",
                 num_probes: int = 1):
        self.names = sorted(params)  # dict leaves flatten in sorted-key order
        self.rank, self.tau, self.t0, self.n, self.ef, self.key = rank, tau, t0, n, ef, key
        self.shared = probes == "shared"
        self.tracking, self.track_every, self.allocation = tracking, track_every, allocation
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

    def probes(self, name: str, columns: bool = False) -> np.ndarray:
        """This step's probes of ``name``: ``(p, b)`` shared or columns, else ``(p, a, b)``."""
        def block(g):   # group g's probes: (p, k, b) or (p, k, a, b)
            a, b = self.shapes[g]
            k = self.counts[g]
            return (self.num_probes, k, b) if self.shared or columns else \
                (self.num_probes, k, a, b)

        sizes = [int(np.prod(block(g))) for g in range(len(self.shapes))]
        rbg = jax.random.wrap_key_data(jnp.concatenate([self.key, self.key]),
                                       impl="unsafe_rbg")
        v = np.asarray(jax.random.normal(jax.random.fold_in(rbg, self.t), (sum(sizes),)),
                       np.float64)
        g = self.group[name]
        start = sum(sizes[:g])
        return v[start:start + sizes[g]].reshape(block(g))[:, self.pos[name]]

    def score(self, name: str, xs: list[np.ndarray], q_hat: np.ndarray | None = None,
              y: np.ndarray | None = None) -> np.ndarray:
        """Estimated energy of every direction of U in the mean, ``(a,)``: the mean over
        probes of the squared device-averaged probe scores; after a tracking round, the
        exact energy inside span(q_hat), ``||u_j^T y||^2``, plus the probe estimate of the
        rest, with probes restricted to the complement of span(q_hat)."""
        u = self.U[name]
        lams = []
        for v in self.probes(name):
            if q_hat is not None:
                v = v - (v @ q_hat) @ q_hat.T
            if self.shared:   # one probe for every direction: lam_j = u_j^T H v
                lams.append(np.mean([u.T @ (x @ v) for x in xs], axis=0))
            else:             # one probe per direction: lam_j = <(U^T H)[j], v_j>
                lams.append(np.mean([np.sum((u.T @ x) * v, axis=1) for x in xs], axis=0))
        score = np.mean(np.square(lams), axis=0)
        if y is not None:
            score = score + np.sum((u.T @ y) ** 2, axis=1)
        return score

    def compressed(self, xs: dict) -> tuple[dict, dict]:
        """One compressed step of every compressible leaf: (local, mean) reconstructions."""
        in_cycle = (self.t - self.t0) % self.tau
        scores, right = {}, {}   # right: range tracking's projector onto span([Q_hat, v'])
        for name in self.comp:
            tracked = self.tracking != "off" and (in_cycle - 1) % self.track_every == 0
            if tracked and self.tracking == "power":
                q_hat = np.linalg.qr(self.Q[name])[0]
                y = np.mean([x @ q_hat for x in xs[name]], axis=0)
                self.U[name] = _complete(np.linalg.qr(y)[0], self.U[name])
                scores[name] = self.score(name, xs[name], q_hat, y)
            elif tracked:   # range: Ritz vectors of Hbar [Q_hat, v'], scored by sigma^2
                q_hat = np.linalg.qr(self.Q[name])[0]
                v = self.probes(name, columns=True)
                v = v - (v @ q_hat) @ q_hat.T                       # (p, b), outside span
                w = np.concatenate([q_hat, v.T], axis=1)
                y = np.mean([x @ w for x in xs[name]], axis=0)
                right[name] = w @ np.linalg.pinv(w, rcond=1e-6)
                self.U[name] = _complete(np.linalg.svd(y, full_matrices=False)[0],
                                         self.U[name])
                scores[name] = np.sum((self.U[name].T @ y) ** 2, axis=1)
            else:
                scores[name] = self.score(name, xs[name])
        chosen = {}
        if self.allocation == "matrix":
            chosen = {name: _top(scores[name], self.comp[name][2]) for name in self.comp}
        else:
            for g in range(len(self.counts)):
                members = sorted((n for n in self.comp if self.group[n] == g),
                                 key=lambda n: self.pos[n])
                a, _, r = self.comp[members[0]]
                flat = np.concatenate([scores[n] for n in members])
                picked = _top(flat, len(members) * r)
                for n in members:
                    chosen[n] = [f % a for f in picked if f // a == self.pos[n]]
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
            if self.tracking != "off":
                if self.allocation == "matrix":
                    self.Q[name] = r_bar.T
                else:   # rows of its r best-scored directions; the old column if unsent
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
        if t < self.t0 or (t - self.t0) % self.tau == 0:
            c_local, c_bar = {}, {}
            for name in self.comp:
                hbar = np.mean(xs[name], axis=0)
                if t >= self.t0:
                    self.U[name] = _svd_basis(hbar)
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
