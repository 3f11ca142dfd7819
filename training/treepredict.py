"""A LightGBM binary booster's probability, bit for bit, without its per-call set-up.

``Booster.predict`` builds a predictor (thread buffers, a row parser) on every call: for
the one or two rows of a forecast that set-up, not the trees, was ~0.2 ms per horizon
and call.  Walking the same trees in a compiled loop costs microseconds.  The walk
follows LightGBM's own code exactly, so the result is the same double:

* a value with |v| <= kZeroThreshold (1e-35) is read as 0.0, as LightGBM's row parser
  drops it and the tree reads 0.0;
* at a numerical split: NaN is 0.0 unless the split's missing type is NaN; a missing
  value (NaN for type NaN, zero for type Zero) goes the default direction; otherwise
  ``v <= threshold`` goes left (``Tree::NumericalDecision``);
* the raw score is the sum of the trees' leaf values in tree order, from 0.0, in double
  (``GBDT::PredictRaw``); the probability is ``1 / (1 + exp(-sigmoid * raw))``
  (``BinaryLogloss::ConvertOutput``).

A booster with categorical or linear trees, a random forest (averaged trees) or another
objective is left to LightGBM (``from_booster`` returns None).
``tests/training/test_treepredict.py`` holds the two equal, bit for bit, on trees with
missing values of every missing type, zeros at LightGBM's zero threshold, deep paths and
stumps.
"""

from __future__ import annotations

import re
from typing import Any

import numba
import numpy as np

from training.treeshap import MISSING, ZERO_THRESHOLD

_BINARY = re.compile(r"^binary(?: sigmoid:(?P<sigmoid>[0-9.eE+-]+))?$")
# objectives whose output is the raw score itself (``ConvertOutput`` is the identity)
# (not ``regression sqrt``: a booster fitted on the square root squares its output)
_IDENTITY = re.compile(r"^(?:quantile(?: alpha:[0-9.eE+-]+)?|regression|regression_l1)$")


class TreePredictor:
    def __init__(self, arrays: dict[str, np.ndarray], sigmoid: float | None, n_features: int):
        self.arrays = arrays
        self.sigmoid = sigmoid
        self.n_features = n_features

    @classmethod
    def from_booster(cls, booster: Any) -> TreePredictor | None:
        dump = booster.dump_model()
        objective = str(dump.get("objective", "")).strip()
        m = _BINARY.match(objective)
        if (m is None and not _IDENTITY.match(objective)) \
                or dump.get("num_tree_per_iteration", 1) != 1 \
                or dump.get("average_output"):  # a random forest averages its trees
            return None
        sigmoid = float(m.group("sigmoid") or 1.0) if m else None  # None: identity output
        cols: dict[str, list] = {k: [] for k in ("feature", "threshold", "default_left",
                                                 "missing", "left", "right")}
        leaves: list[float] = []
        roots: list[int] = []

        def visit(node: dict) -> int:
            """The node's index (a leaf: ~its index among the leaves)."""
            if "split_index" not in node:
                if "leaf_coeff" in node:  # a linear tree: its leaves are models
                    raise _Unsupported
                leaves.append(float(node["leaf_value"]))
                return ~(len(leaves) - 1)
            if node.get("decision_type") != "<=":
                raise _Unsupported
            k = len(cols["feature"])
            for key, v in (("feature", int(node["split_feature"])),
                           ("threshold", float(node["threshold"])),
                           ("default_left", bool(node["default_left"])),
                           ("missing", MISSING[node["missing_type"]]),
                           ("left", 0), ("right", 0)):
                cols[key].append(v)
            cols["left"][k] = visit(node["left_child"])
            cols["right"][k] = visit(node["right_child"])
            return k

        try:
            for tree in dump["tree_info"]:
                roots.append(visit(tree["tree_structure"]))
        except (_Unsupported, KeyError):
            return None
        arrays = {
            "roots": np.asarray(roots, dtype=np.int64),
            "feature": np.asarray(cols["feature"], dtype=np.int64),
            "threshold": np.asarray(cols["threshold"], dtype=np.float64),
            "default_left": np.asarray(cols["default_left"], dtype=np.bool_),
            "missing": np.asarray(cols["missing"], dtype=np.int64),
            "left": np.asarray(cols["left"], dtype=np.int64),
            "right": np.asarray(cols["right"], dtype=np.int64),
            "leaf_value": np.asarray(leaves, dtype=np.float64),
        }
        return cls(arrays, sigmoid, int(dump["max_feature_idx"]) + 1)

    def raw(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got shape {x.shape}")
        a = self.arrays
        out = np.empty(x.shape[0], dtype=np.float64)
        _raw(np.ascontiguousarray(x), a["roots"], a["feature"], a["threshold"],
             a["default_left"], a["missing"], a["left"], a["right"], a["leaf_value"], out)
        return out

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The probability (a binary booster) or the value (a regression or quantile
        booster), as ``Booster.predict`` gives it."""
        raw = self.raw(x)
        if self.sigmoid is not None:
            _sigmoid(raw, self.sigmoid)
        return raw


class _Unsupported(Exception):
    pass


@numba.njit(cache=True, nogil=True)
def _raw(x, roots, feature, threshold, default_left, missing, left, right, leaf_value, out):
    for r in range(x.shape[0]):
        acc = 0.0
        for t in range(roots.size):
            node = roots[t]
            while node >= 0:
                v = np.float64(x[r, feature[node]])
                if -ZERO_THRESHOLD <= v <= ZERO_THRESHOLD:
                    v = 0.0  # the row parser drops it: the tree reads 0.0
                miss = missing[node]
                if np.isnan(v) and miss != 2:
                    v = 0.0
                if (miss == 1 and -ZERO_THRESHOLD <= v <= ZERO_THRESHOLD) or (
                        miss == 2 and np.isnan(v)):
                    go_left = default_left[node]
                else:
                    go_left = v <= threshold[node]
                node = left[node] if go_left else right[node]
            acc += leaf_value[~node]
        out[r] = acc


@numba.njit(cache=True, nogil=True)
def _sigmoid(raw, sigmoid):
    for i in range(raw.size):
        raw[i] = 1.0 / (1.0 + np.exp(-sigmoid * raw[i]))
