"""Bipartite matching of predictions to ground-truth points within a radius.

Two kernels share one edge list (``pairs_within``):

* ``optimal_pairs``: a maximum-cardinality matching that, among all maximum ones, has the least
  total distance.  The edge graph is split into connected components (usually a handful of
  points each) and each is solved with ``scipy.optimize.linear_sum_assignment``, so a slide
  with 10^5 detections never builds a dense 10^5 x 10^5 matrix.
* ``tp_gains``: predictions are added in descending score order and each tries one augmenting
  path; the matching stays maximum after every step (adding one vertex raises the maximum by
  at most one, and any larger matching differs from the current one by an augmenting path that
  starts at the new vertex).  ``gains[i]`` is 1 when adding prediction ``i`` raised the TP
  count, so TP at any threshold is a cumulative sum: no re-matching per threshold.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

__all__ = ["pairs_within", "optimal_pairs", "tp_gains"]


def pairs_within(pred_xy: np.ndarray, truth_xy: np.ndarray, radius: float):
    """All ``(pred, truth)`` index pairs with distance ``<= radius``, and their distances.

    The KD-tree is queried slightly wide and the result cut with exact squared distances, so a
    point at exactly ``radius`` (e.g. integer offsets (18, 24) at radius 30) is inside.
    """
    empty = np.zeros(0, dtype=np.intp)
    if len(pred_xy) == 0 or len(truth_xy) == 0:
        return empty, empty, np.zeros(0)
    wide = radius * (1 + 1e-9) + 1e-9
    sdm = cKDTree(pred_xy).sparse_distance_matrix(cKDTree(truth_xy), wide, output_type="ndarray")
    pi, ti = sdm["i"].astype(np.intp), sdm["j"].astype(np.intp)
    d2 = ((pred_xy[pi] - truth_xy[ti]) ** 2).sum(axis=1)
    keep = d2 <= radius * radius
    order = np.lexsort((ti[keep], pi[keep]))  # stable, input-order edge list
    return pi[keep][order], ti[keep][order], np.sqrt(d2[keep][order])


def optimal_pairs(pi, ti, d, n_pred: int, n_truth: int, radius: float) -> np.ndarray:
    """``(K, 2)`` matched ``(pred, truth)`` pairs: most matches, then least total distance.

    Cost per in-radius pair is ``-1 + d / (radius * (k + 1))`` (k = component size bound), so one
    more match always outweighs any distance saving; out-of-radius cells cost 0 and are dropped.
    """
    if len(pi) == 0:
        return np.zeros((0, 2), dtype=np.intp)
    graph = coo_matrix((np.ones(len(pi)), (pi, n_pred + ti)), shape=(n_pred + n_truth,) * 2)
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[pi]
    sizes = np.bincount(edge_comp)
    out = [np.stack([pi, ti], axis=1)[sizes[edge_comp] == 1]]  # lone edges match directly
    scale = radius if radius > 0 else 1.0
    for c in np.flatnonzero(sizes > 1):
        e = np.flatnonzero(edge_comp == c)
        rows, r_inv = np.unique(pi[e], return_inverse=True)
        cols, c_inv = np.unique(ti[e], return_inverse=True)
        k = min(len(rows), len(cols))
        cost = np.zeros((len(rows), len(cols)))
        cost[r_inv, c_inv] = -1.0 + d[e] / (scale * (k + 1))
        r, cc = linear_sum_assignment(cost)
        hit = cost[r, cc] < 0
        out.append(np.stack([rows[r[hit]], cols[cc[hit]]], axis=1))
    pairs = np.concatenate(out).astype(np.intp)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def tp_gains(pi, ti, order: np.ndarray, n_truth: int) -> np.ndarray:
    """Per prediction, 1 if adding it (in ``order``) grew the maximum matching, else 0."""
    n_pred = len(order)
    gains = np.zeros(n_pred, dtype=np.int64)
    if len(pi) == 0:
        return gains
    starts = np.searchsorted(pi, np.arange(n_pred + 1))  # pi is sorted: CSR adjacency
    adj = [ti[starts[p] : starts[p + 1]].tolist() for p in range(n_pred)]
    owner = [-1] * n_truth  # truth -> matched prediction
    reachable = len(np.unique(ti))
    for v in order.tolist():
        if adj[v] and _augment(v, adj, owner):
            gains[v] = 1
            reachable -= 1
            if reachable == 0:  # every truth with a neighbour is taken: no more gains
                break
    return gains


def _augment(root: int, adj: list, owner: list) -> bool:
    """Iterative DFS for an augmenting path from unmatched ``root``; flips it when found."""
    for t in adj[root]:  # the common case: a free truth right there
        if owner[t] < 0:
            owner[t] = root
            return True
    seen: set[int] = set()
    stack = [(root, iter(adj[root]))]
    via: list[int] = []  # via[i]: truth that led from stack[i] to stack[i + 1]
    while stack:
        p, it = stack[-1]
        for t in it:
            if t in seen:
                continue
            seen.add(t)
            if owner[t] < 0:  # free truth: shift every prediction on the path one step
                for (q, _), u in zip(stack, [*via, t], strict=True):
                    owner[u] = q
                return True
            via.append(t)
            stack.append((owner[t], iter(adj[owner[t]])))
            break
        else:
            stack.pop()
            if via:
                via.pop()
    return False
