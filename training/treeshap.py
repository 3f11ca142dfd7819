"""Exact path-dependent TreeSHAP for a LightGBM booster, from per-leaf tables.

LightGBM's ``pred_contrib`` runs the recursive TreeSHAP algorithm (Lundberg et al.,
2020), O(leaves x depth^2) per tree and row: for the served models it costs ~130x a
prediction and was most of the time of every forecast the service stores.  The same
values can be had at O(leaves x depth) per tree and row (the idea of "Fast TreeSHAP v2",
Yang 2021), because a leaf's share of each Shapley value depends on the row only
through which of the leaf's path features the row agrees with.

For a leaf l with value v, let U be the distinct features split on along its path, d
their number, and for j in U: o_j = 1 if the row follows the path at every split on j
(else 0), z_j = the product of the path's cover fractions at those splits.  The expected
output given the features in S, as path-dependent TreeSHAP defines it, is
sum_l v_l prod_{j in U_l} (o_j if j in S else z_j); the Shapley value of i in U is then

    phi_i = v (o_i - z_i) * prod_{j in U'-A} z_j * sum_k w(k, d) e_{|A|-k}(z_A),

with U' = U - {i}, A = {j in U' : o_j = 1}, w(k, d) = k! (d-k-1)! / d! and e_r the
elementary symmetric polynomials.  So each leaf keeps, for each i and each subset A of
U' (d 2^(d-1) numbers), that factor; a row then costs one pass over the internal nodes
(its decisions) and, per leaf, its path and d table look-ups.  The tables are built
when a model is loaded, for leaves of at most ``TABLE_DEPTH`` path features and within
``MAX_TABLE_BYTES`` in all.  A deeper leaf (its table grows as 2^d) is computed for the
row at hand instead, in O(d^2): the elementary symmetric polynomials of z over the
agreeing features once, then for each i the same with z_i divided out — still no
recursion, and a model of deep trees stays off the booster's ``pred_contrib`` (about
10x slower here on the served 730-day model).  Tests hold both to 1e-9.

Decisions follow LightGBM's numerical rule exactly (missing types None, Zero and NaN,
default directions); a model with categorical splits falls back to ``pred_contrib``.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

MAX_TABLE_BYTES = 64 * 2**20
TABLE_DEPTH = 10  # deeper leaves are computed per row (a table holds d 2^d numbers)
MAX_PATH_FEATURES = 62  # a row's agreement with a path is a bit mask in an int64
ZERO_THRESHOLD = float(np.float32(1e-35))  # LightGBM's kZeroThreshold, a float: 1e-35f
MISSING = {"None": 0, "Zero": 1, "NaN": 2}


class TreeShap:
    """Per-feature contributions (bias dropped) of a LightGBM booster's raw score."""

    def __init__(self, n_features: int, nodes: dict[str, np.ndarray],
                 leaves: dict[str, np.ndarray]):
        self.n_features = n_features
        self.nodes = nodes
        self.leaves = leaves

    @classmethod
    def from_booster(cls, booster: Any, max_bytes: int = MAX_TABLE_BYTES,
                     table_depth: int = TABLE_DEPTH) -> TreeShap | None:
        """The explainer for ``booster`` (tables for leaves of at most ``table_depth``
        path features while they fit in ``max_bytes``, the rest computed per row), or None
        when the model has splits it does not cover (categorical) or paths over
        ``MAX_PATH_FEATURES`` features."""
        dump = booster.dump_model()
        n_features = int(dump["max_feature_idx"]) + 1
        nodes: dict[str, list] = {k: [] for k in (
            "feature", "threshold", "default_left", "missing", "parent", "parent_left",
            "parent_bit")}
        leaf_rows: list[tuple[float, tuple[int, bool, int], list[int], list[float]]] = []
        size = 0
        tree_nodes, tree_leaves = [0], [0]
        for tree in dump["tree_info"]:
            root = tree["tree_structure"]
            if "leaf_value" in root and "split_index" not in root:
                continue  # a single leaf: it only shifts the bias
            # depth first, parents before children; a path's features are numbered in
            # order of first appearance, so a split's bit is the same in every leaf below
            stack: list[tuple[dict, tuple[int, bool, int], dict[int, float]]] = [
                (root, (-1, False, 0), {})]
            while stack:
                node, parent, zs = stack.pop()
                if "split_index" not in node:
                    feats = list(zs)
                    d = len(feats)
                    if d > MAX_PATH_FEATURES:
                        return None
                    tabled = d <= table_depth and size + d * 2 ** d * 8 <= max_bytes
                    size += d * 2 ** d * 8 if tabled else 0
                    leaf_rows.append((float(node["leaf_value"]), parent, feats,
                                      [zs[f] for f in feats], tabled))
                    continue
                if node.get("decision_type") != "<=":
                    return None  # categorical split
                k = len(nodes["feature"])
                f = int(node["split_feature"])
                for key, v in (("feature", f), ("threshold", float(node["threshold"])),
                               ("default_left", bool(node["default_left"])),
                               ("missing", MISSING[node["missing_type"]]),
                               ("parent", parent[0]), ("parent_left", parent[1]),
                               ("parent_bit", parent[2])):
                    nodes[key].append(v)
                bit = list(zs).index(f) if f in zs else len(zs)
                total = float(node["internal_count"])
                for child, left in ((node["left_child"], True), (node["right_child"], False)):
                    cover = _count(child) / total if total > 0 else 0.0
                    stack.append((child, (k, left, bit), {**zs, f: zs.get(f, 1.0) * cover}))
            tree_nodes.append(len(nodes["feature"]))
            tree_leaves.append(len(leaf_rows))
        arrays = _node_arrays(nodes)
        arrays["tree_nodes"] = np.asarray(tree_nodes, dtype=np.int64)
        arrays["tree_leaves"] = np.asarray(tree_leaves, dtype=np.int64)
        return cls(n_features, arrays, _leaf_arrays(leaf_rows))

    def contributions(self, x: np.ndarray) -> np.ndarray:
        """(rows x features) contributions on the raw (log-odds) scale."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        out = np.zeros((x.shape[0], self.n_features), dtype=np.float64)
        n, lv = self.nodes, self.leaves
        _contrib(x, n["tree_nodes"], n["tree_leaves"], n["feature"], n["threshold"],
                 n["default_left"], n["missing"], n["parent"], n["parent_left"],
                 n["parent_bit"], lv["parent"], lv["parent_left"], lv["parent_bit"],
                 lv["feat_start"], lv["feature"], lv["table_start"], lv["table"],
                 lv["value"], lv["z"], lv["weights"], out)
        return out


def _count(node: dict) -> float:
    return float(node["internal_count"] if "split_index" in node else node["leaf_count"])


def _node_arrays(nodes: dict[str, list]) -> dict[str, np.ndarray]:
    types = {"threshold": np.float64, "default_left": np.bool_, "parent_left": np.bool_}
    return {k: np.asarray(v, dtype=types.get(k, np.int64)) for k, v in nodes.items()}


def _leaf_arrays(rows: list) -> dict[str, np.ndarray]:
    values, parent, parent_left, parent_bit = [], [], [], []
    feat_start, features, zs, table_start, next_start = [0], [], [], [], 0
    depth = 1
    for value, (p, left, bit), feats, z, tabled in rows:
        values.append(value)
        parent.append(p)
        parent_left.append(left)
        parent_bit.append(bit)
        features += feats
        zs += z
        feat_start.append(len(features))
        depth = max(depth, len(feats))
        table_start.append(next_start if tabled else -1)  # −1: computed per row
        next_start += len(feats) * 2 ** len(feats) if tabled else 0
    arrays = {
        "value": np.asarray(values, dtype=np.float64),
        "parent": np.asarray(parent, dtype=np.int64),
        "parent_left": np.asarray(parent_left, dtype=np.bool_),
        "parent_bit": np.asarray(parent_bit, dtype=np.int64),
        "feat_start": np.asarray(feat_start, dtype=np.int64),
        "feature": np.asarray(features, dtype=np.int64),
        "z": np.asarray(zs, dtype=np.float64),
        "table_start": np.asarray([*table_start, next_start], dtype=np.int64),
    }
    arrays["table"] = np.zeros(int(arrays["table_start"][-1]), dtype=np.float64)
    _fill_tables(arrays["value"], arrays["feat_start"], arrays["z"], arrays["table_start"],
                 arrays["table"])
    weights = np.zeros((depth + 1, depth + 1))  # weights[d, k] = w(k, d)
    for d in range(1, depth + 1):
        weights[d, :d] = [_weight(k, d) for k in range(d)]
    arrays["weights"] = weights
    return arrays


@numba.njit(cache=True, nogil=True)
def _fill_tables(value, feat_start, z, table_start, table):
    """For each leaf, each pattern B of agreement with its d path features (bit j: the
    row follows the path at the splits on its j-th feature) and each i: the leaf's share
    of phi_i, v (o_i - z_i) prod_{j in U'-A} z_j sum_k w(k, d) e_{|A|-k}(z_A) with
    A = B - {i} — laid out [B][i], so a row reads d neighbouring numbers per leaf."""
    n_leaves = feat_start.size - 1
    for leaf in range(n_leaves):
        a, d = feat_start[leaf], feat_start[leaf + 1] - feat_start[leaf]
        if d == 0 or table_start[leaf] < 0:
            continue
        w = np.empty(d)
        for k in range(d):
            w[k] = _weight(k, d)
        e = np.empty(d + 1)
        base = table_start[leaf]
        for pattern in range(1 << d):
            for i in range(d):
                # elementary symmetric polynomials of z over A, and the product outside
                e[0] = 1.0
                size = 0
                outside = 1.0
                for j in range(d):
                    if j == i:
                        continue
                    if (pattern >> j) & 1:
                        size += 1
                        e[size] = 0.0
                        for r in range(size, 0, -1):
                            e[r] += e[r - 1] * z[a + j]
                    else:
                        outside *= z[a + j]
                total = 0.0
                for k in range(size + 1):
                    total += w[k] * e[size - k]
                o = (pattern >> i) & 1
                table[base + pattern * d + i] = value[leaf] * (o - z[a + i]) * outside * total


@numba.njit(cache=True, nogil=True)
def _weight(k, d):
    # k! (d-k-1)! / d!, as a product of ratios (no overflow for deep paths)
    r = 1.0 / d
    for j in range(1, k + 1):
        r *= j / (d - k - 1 + j)
    return r


@numba.njit(cache=True, nogil=True)
def _contrib(x, tree_nodes, tree_leaves, n_feature, n_threshold, n_default_left, n_missing,
             n_parent, n_parent_left, n_parent_bit, l_parent, l_parent_left, l_parent_bit,
             feat_start, feature, table_start, table, value, z, weights, out):
    # tree by tree, every row: one tree's tables stay in cache while the rows pass
    left = np.empty(n_feature.size, dtype=np.bool_)
    agree = np.empty(n_feature.size, dtype=np.int64)  # per node: bits still agreeing
    e = np.empty(weights.shape[0] + 1)  # a deep leaf's polynomials, with and without z_i
    e_i = np.empty(weights.shape[0] + 1)
    for tree in range(tree_nodes.size - 1):
        for r in range(x.shape[0]):
            for k in range(tree_nodes[tree], tree_nodes[tree + 1]):
                v = x[r, n_feature[k]]
                miss = n_missing[k]
                if np.isnan(v) and miss != 2:
                    v = 0.0
                if (miss == 1 and -ZERO_THRESHOLD <= v <= ZERO_THRESHOLD) or (
                        miss == 2 and np.isnan(v)):
                    left[k] = n_default_left[k]
                else:
                    left[k] = v <= n_threshold[k]
                p = n_parent[k]
                if p < 0:
                    agree[k] = -1  # all bits
                elif left[p] != n_parent_left[k]:
                    agree[k] = agree[p] & ~(1 << n_parent_bit[k])
                else:
                    agree[k] = agree[p]
            for leaf in range(tree_leaves[tree], tree_leaves[tree + 1]):
                a = feat_start[leaf]
                d = feat_start[leaf + 1] - a
                p = l_parent[leaf]
                mask = agree[p]
                if left[p] != l_parent_left[leaf]:
                    mask &= ~(1 << l_parent_bit[leaf])
                mask &= (1 << d) - 1
                if table_start[leaf] < 0:
                    _leaf_shares(value[leaf], z[a:a + d], mask, weights[d], e, e_i,
                                 feature[a:a + d], out[r])
                    continue
                base = table_start[leaf] + mask * d
                for i in range(d):
                    out[r, feature[a + i]] += table[base + i]


@numba.njit(cache=True, nogil=True)
def _leaf_shares(v, z, mask, w, e, e_i, features, out):
    """One leaf's shares of every phi_i for a row agreeing with its path on the bits of
    ``mask`` — the table's entry, computed: e = e(z_B) over the agreeing features B once;
    for i in B, e(z_{B-i}) by dividing out (1 + z_i x) (stable: z_i <= 1); the product of
    z outside A directly."""
    d = z.size
    m = 0
    e[0] = 1.0
    for j in range(d):
        if (mask >> j) & 1:
            m += 1
            e[m] = 0.0
            for r in range(m, 0, -1):
                e[r] += e[r - 1] * z[j]
    for i in range(d):
        outside = 1.0
        for j in range(d):
            if j != i and not (mask >> j) & 1:
                outside *= z[j]
        if (mask >> i) & 1:
            size = m - 1
            e_i[0] = 1.0
            for r in range(1, m):
                e_i[r] = e[r] - z[i] * e_i[r - 1]
            total = 0.0
            for k in range(size + 1):
                total += w[k] * e_i[size - k]
            out[features[i]] += v * (1.0 - z[i]) * outside * total
        else:
            total = 0.0
            for k in range(m + 1):
                total += w[k] * e[m - k]
            out[features[i]] += v * (0.0 - z[i]) * outside * total
