"""Cost of per-source gradient statistics and of a training step per method, and the peers.

For each model (a two-branch MLP of 0.86M parameters, a two-branch CNN, a small
transformer; three loss sources each: fusion, modality 0, modality 1) and batch size, one
run measures side by side:

- JAX: one batch gradient of the summed losses (the unit), ``bj.source_grad_stats`` with
  ``method="fast"``, ``"vmap"`` and ``"vmap"`` with ``chunk_size``; time and peak memory;
- a full training step (statistics or scores, transform, Adam) of joint (the unit), bogc,
  cggm, ogm_ge and mmpareto;
- PyTorch on the same architectures, shapes and thread count: one batch gradient,
  per-sample gradients with ``torch.func`` (``vmap(jacrev)``, then mean and variance per
  source) and BackPACK's ``Variance`` extension (one backward pass per source), when
  they are installed.

Times are medians over interleaved repeats (the machine may be shared). Peak memory:
JAX, from the compiled program (``memory_analysis``: temporaries + outputs); PyTorch,
the rise of the process's peak resident memory (``VmHWM``, reset after start-up) over
the measured calls, each peer in a fresh process. Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/bench.py              # the default run (a few minutes)
    python benchmarks/bench.py --quick      # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NUM_SOURCES = 3
CLASSES = 10
SKIP_ABOVE_BYTES = 1.5e9  # do not run a method whose per-example gradients exceed this
CHUNK = 16  # chunk_size of the chunked vmap (and of torch.func, if needed)

SIZES = {  # model -> dimensions; the quick run shrinks them
    "mlp": dict(d0=512, d1=384, hidden=512, width=256),
    "cnn": dict(image=28, seq=64, seq_channels=8, c1=32, c2=64),
    "transformer": dict(tokens=32, vocab=1000, d=64, heads=4, layers=2, feats=128),
    # About 20M parameters: 6 blocks of width 512 (12 d**2 each), 64 tokens.
    "transformer20m": dict(tokens=64, vocab=1000, d=512, heads=8, layers=6, feats=512),
}
QUICK_SIZES = {
    "mlp": dict(d0=16, d1=12, hidden=16, width=8),
    "cnn": dict(image=8, seq=8, seq_channels=2, c1=4, c2=4),
    "transformer": dict(tokens=4, vocab=20, d=8, heads=2, layers=1, feats=6),
    "transformer20m": dict(tokens=4, vocab=20, d=16, heads=2, layers=2, feats=8),
}


def model_size(model: str, quick: bool = False) -> dict:
    """Dimensions of a named model.

    ``mlpW`` (e.g. ``mlp512``) is the two-branch MLP with ``W``-wide layers: inputs of
    ``W`` and ``3W/4`` features, two ``W``-wide layers per branch (about ``3.75 W**2``
    parameters); the quick run divides ``W`` by 32.
    """
    family = model_family(model)
    if family == "mlp" and model != "mlp":
        width = int(model[3:])
        if quick:
            width = max(8, width // 32)
        return dict(d0=width, d1=max(1, 3 * width // 4), hidden=width, width=width)
    return (QUICK_SIZES if quick else SIZES)[model]


def model_family(model: str) -> str:
    """``mlp``, ``cnn`` or ``transformer`` (``mlp512`` -> ``mlp``, ``transformer20m`` ->
    ``transformer``)."""
    for family in ("mlp", "cnn", "transformer"):
        if model.startswith(family):
            if family == "mlp" and model != "mlp" and not model[3:].isdigit():
                break
            if family != "mlp" and model not in SIZES:
                break
            return family
    raise ValueError(
        f"unknown model {model!r}: use mlp, mlpW (W an int, e.g. mlp512), cnn, transformer "
        "or transformer20m"
    )


# ----------------------------------------------------------------------------------------
# Data (shared by both frameworks, as numpy).


def make_batch(model: str, size: dict, n: int, seed: int = 0):
    import numpy as np  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n).astype(np.int32)
    model = model_family(model)
    if model == "mlp":
        return (
            rng.normal(size=(n, size["d0"])).astype(np.float32),
            rng.normal(size=(n, size["d1"])).astype(np.float32),
            y,
        )
    if model == "cnn":
        return (
            rng.normal(size=(n, size["image"], size["image"], 1)).astype(np.float32),
            rng.normal(size=(n, size["seq"], size["seq_channels"])).astype(np.float32),
            y,
        )
    return (
        rng.integers(0, size["vocab"], (n, size["tokens"])).astype(np.int32),
        rng.normal(size=(n, size["feats"])).astype(np.float32),
        y,
    )


# ----------------------------------------------------------------------------------------
# JAX / Flax NNX models: encoders enc0, enc1; fusion head; auxiliary heads aux0, aux1.


def jax_model(model: str, size: dict):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    rngs = nnx.Rngs(0)
    model = model_family(model)

    class Heads(nnx.Module):
        def __init__(self, width):
            self.head = nnx.Linear(2 * width, CLASSES, rngs=rngs)
            self.aux0 = nnx.Linear(width, CLASSES, rngs=rngs)
            self.aux1 = nnx.Linear(width, CLASSES, rngs=rngs)

        def __call__(self, h0, h1):
            return (self.head(jnp.concatenate([h0, h1], -1)), self.aux0(h0), self.aux1(h1))

    if model == "mlp":

        class Net(Heads):
            def __init__(self):
                super().__init__(size["width"])
                self.enc0 = nnx.List(
                    [
                        nnx.Linear(size["d0"], size["hidden"], rngs=rngs),
                        nnx.Linear(size["hidden"], size["width"], rngs=rngs),
                    ]
                )
                self.enc1 = nnx.List(
                    [
                        nnx.Linear(size["d1"], size["hidden"], rngs=rngs),
                        nnx.Linear(size["hidden"], size["width"], rngs=rngs),
                    ]
                )

            def __call__(self, x0, x1):
                for layer in self.enc0:
                    x0 = nnx.relu(layer(x0))
                for layer in self.enc1:
                    x1 = nnx.relu(layer(x1))
                return super().__call__(x0, x1)

    elif model == "cnn":

        class Net(Heads):
            def __init__(self):
                super().__init__(size["c2"])
                self.enc0 = nnx.List(
                    [
                        nnx.Conv(1, size["c1"], (3, 3), strides=2, rngs=rngs),
                        nnx.Conv(size["c1"], size["c2"], (3, 3), strides=2, rngs=rngs),
                    ]
                )
                self.enc1 = nnx.List(
                    [
                        nnx.Conv(size["seq_channels"], size["c1"], (5,), strides=2, rngs=rngs),
                        nnx.Conv(size["c1"], size["c2"], (5,), strides=2, rngs=rngs),
                    ]
                )

            def __call__(self, img, seq):
                for layer in self.enc0:
                    img = nnx.relu(layer(img))
                for layer in self.enc1:
                    seq = nnx.relu(layer(seq))
                return super().__call__(img.mean((1, 2)), seq.mean(1))

    else:
        d = size["d"]

        class Block(nnx.Module):
            def __init__(self):
                self.ln1 = nnx.LayerNorm(d, rngs=rngs)
                self.ln2 = nnx.LayerNorm(d, rngs=rngs)
                self.att = nnx.MultiHeadAttention(
                    num_heads=size["heads"], in_features=d, decode=False, rngs=rngs
                )
                self.up = nnx.Linear(d, 4 * d, rngs=rngs)
                self.down = nnx.Linear(4 * d, d, rngs=rngs)

            def __call__(self, x):
                x = x + self.att(self.ln1(x))
                return x + self.down(nnx.gelu(self.up(self.ln2(x)), approximate=False))

        class Net(Heads):
            def __init__(self):
                super().__init__(d)
                self.enc0 = nnx.List(
                    [nnx.Embed(size["vocab"], d, rngs=rngs)]
                    + [Block() for _ in range(size["layers"])]
                )
                self.pos = nnx.Param(
                    0.02 * jax.random.normal(jax.random.key(1), (size["tokens"], d))
                )
                self.enc1 = nnx.Linear(size["feats"], d, rngs=rngs)

            def __call__(self, ids, feats):
                x = self.enc0[0](ids) + self.pos[...]
                for block in self.enc0[1:]:
                    x = block(x)
                return super().__call__(x.mean(1), nnx.relu(self.enc1(feats)))

    net = Net()
    graphdef, params = nnx.split(net, nnx.Param)

    def ce(logits, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

    def forward(p, batch):
        x0, x1, y = batch
        logits = nnx.merge(graphdef, p)(x0, x1)
        return jnp.stack([ce(z, y) for z in logits]), logits

    def losses_fn(p, batch):
        return forward(p, batch)[0]

    return params, losses_fn, forward


def compile_with_memory(jitted, *args):
    """The compiled function and its temporaries + outputs in MiB (None if unknown)."""
    compiled = jitted.lower(*args).compile()
    try:
        stats = compiled.memory_analysis()
        return compiled, (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20
    except Exception:  # pylint: disable=broad-except
        return compiled, None


def jax_functions(model: str, size: dict, n: int, train: bool):
    """Name -> (jitted fn, args); and the names of the training steps that exist."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    import bogc_jax as bj  # pylint: disable=g-import-not-at-top

    params, losses_fn, forward = jax_model(model, size)
    batch = tuple(jnp.asarray(x) for x in make_batch(model, size, n))
    num_params = sum(x.size for x in jax.tree.leaves(params))

    def total(p, b):
        return jnp.sum(jnp.mean(losses_fn(p, b), axis=1))

    fns = {"grad": (jax.jit(jax.grad(total)), (params, batch))}
    for name, kwargs in (
        ("fast", dict(method="fast")),
        ("vmap", dict(method="vmap")),
        ("vmap_chunked", dict(method="vmap", chunk_size=min(CHUNK, n))),
    ):
        fns[name] = (
            jax.jit(lambda p, b, kw=kwargs: bj.source_grad_stats(losses_fn, p, b, **kw)),
            (params, batch),
        )
    notes = []
    if not train:
        return fns, num_params, notes

    labels = bj.label_params(params, {"enc0": 0, "enc1": 1}, default=None)

    def scores(logits, y):
        return jnp.stack([jnp.mean(jnp.argmax(z, -1) == y) for z in logits[1:]])

    def with_scores(p, b):
        losses, logits = forward(p, b)
        return jnp.sum(jnp.mean(losses, axis=1)), scores(logits, b[2])

    transforms = {"joint": lambda: optax.identity(), "bogc": lambda: bj.bogc(NUM_SOURCES)}
    for name, make in (
        ("cggm", lambda: bj.cggm(labels)),
        ("ogm_ge", lambda: bj.ogm_ge(labels)),
        ("mmpareto", lambda: bj.mmpareto(labels)),
    ):
        if hasattr(bj, name):
            transforms[name] = make
        else:
            notes.append(f"bj.{name} is not importable yet: its training step is skipped")

    for name, make in transforms.items():
        tx = optax.chain(make(), optax.adam(1e-3))
        state = tx.init(params)

        def step(p, s, b, name=name, tx=tx):
            extra = {}
            if name == "joint":
                grads = jax.grad(total)(p, b)
            elif name == "bogc":
                stats = bj.source_grad_stats(losses_fn, p, b, method="fast")
                grads, extra = stats.fixed_weight_grads(), {"grad_stats": stats}
            elif name == "mmpareto":
                mean = jax.jacrev(lambda q: jnp.mean(losses_fn(q, b), axis=1))(p)
                stats = bj.GradStats(jnp.float32(n), mean, jax.tree.map(jnp.zeros_like, mean))
                grads, extra = stats.fixed_weight_grads(), {"grad_stats": stats}
            else:
                grads, sc = jax.grad(with_scores, has_aux=True)(p, b)
                extra = {"modality_scores": sc}
            updates, s = tx.update(grads, s, p, **extra)
            return optax.apply_updates(p, updates), s

        fns[f"step_{name}"] = (jax.jit(step), (params, state, batch))
    return fns, num_params, notes


def time_interleaved(fns: dict, repeats: int, budget_s: float = 5.0) -> dict:
    """Median seconds per call; a function stops repeating once it has used ``budget_s``."""
    import jax  # pylint: disable=g-import-not-at-top

    times = {k: [] for k in fns}
    spent = {k: 0.0 for k in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            if times[name] and spent[name] > budget_s:
                continue
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            elapsed = time.perf_counter() - start
            times[name].append(elapsed)
            spent[name] += elapsed
    return {k: sorted(v)[len(v) // 2] for k, v in times.items() if v}


# ----------------------------------------------------------------------------------------
# PyTorch peers (each in a fresh process, so that its peak memory is its own).


def torch_model(model: str, size: dict):
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn  # pylint: disable=g-import-not-at-top

    nnf = nn.functional
    model = model_family(model)

    class Heads(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.head = nn.Linear(2 * width, CLASSES)
            self.aux0 = nn.Linear(width, CLASSES)
            self.aux1 = nn.Linear(width, CLASSES)

        def heads(self, h0, h1):
            return self.head(torch.cat([h0, h1], -1)), self.aux0(h0), self.aux1(h1)

    if model == "mlp":

        class Net(Heads):
            def __init__(self):
                super().__init__(size["width"])
                self.a0 = nn.Linear(size["d0"], size["hidden"])
                self.a1 = nn.Linear(size["hidden"], size["width"])
                self.b0 = nn.Linear(size["d1"], size["hidden"])
                self.b1 = nn.Linear(size["hidden"], size["width"])

            def forward(self, x0, x1):
                h0 = torch.relu(self.a1(torch.relu(self.a0(x0))))
                h1 = torch.relu(self.b1(torch.relu(self.b0(x1))))
                return self.heads(h0, h1)

    elif model == "cnn":

        class Net(Heads):
            def __init__(self):
                super().__init__(size["c2"])
                self.a0 = nn.Conv2d(1, size["c1"], 3, stride=2, padding=1)
                self.a1 = nn.Conv2d(size["c1"], size["c2"], 3, stride=2, padding=1)
                self.b0 = nn.Conv1d(size["seq_channels"], size["c1"], 5, stride=2, padding=2)
                self.b1 = nn.Conv1d(size["c1"], size["c2"], 5, stride=2, padding=2)

            def forward(self, img, seq):  # NHWC / NWC inputs, as in JAX
                h0 = torch.relu(self.a1(torch.relu(self.a0(img.permute(0, 3, 1, 2)))))
                h1 = torch.relu(self.b1(torch.relu(self.b0(seq.permute(0, 2, 1)))))
                return self.heads(h0.mean((2, 3)), h1.mean(2))

    else:
        d = size["d"]

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
                self.att = nn.MultiheadAttention(d, size["heads"], batch_first=True)
                self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

            def forward(self, x):
                h = self.ln1(x)
                x = x + self.att(h, h, h, need_weights=False)[0]
                return x + self.down(nnf.gelu(self.up(self.ln2(x))))

        class Net(Heads):
            def __init__(self):
                super().__init__(d)
                self.emb = nn.Embedding(size["vocab"], d)
                self.pos = nn.Parameter(0.02 * torch.randn(size["tokens"], d))
                self.blocks = nn.ModuleList([Block() for _ in range(size["layers"])])
                self.feat = nn.Linear(size["feats"], d)

            def forward(self, ids, feats):
                x = self.emb(ids) + self.pos
                for block in self.blocks:
                    x = block(x)
                return self.heads(x.mean(1), torch.relu(self.feat(feats)))

    return Net()


def torch_worker(spec: dict) -> dict:
    """Runs one PyTorch method in this (fresh) process; returns its time and memory."""
    import torch  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model, size, n, method = spec["model"], spec["size"], spec["n"], spec["method"]
    net = torch_model(model, size)
    x0, x1, y = (torch.from_numpy(a) for a in make_batch(model, size, n))
    y = y.long()
    if model_family(model) == "transformer":
        x0 = x0.long()
    nnf = torch.nn.functional

    def losses(outputs, target):
        return torch.stack([nnf.cross_entropy(z, target, reduction="none") for z in outputs])

    num_params = sum(p.numel() for p in net.parameters())
    if method == "grad":

        def run():
            net.zero_grad()
            losses(net(x0, x1), y).mean(1).sum().backward()

    elif method == "func":
        from torch.func import functional_call, jacrev, vmap  # pylint: disable=g-import-not-at-top

        params = {k: v.detach() for k, v in net.named_parameters()}

        def one(p, a, b, t):
            out = functional_call(net, p, (a[None], b[None]))
            return losses(out, t[None])[:, 0]

        per_sample = vmap(jacrev(one), in_dims=(None, 0, 0, 0))
        chunk = n if n * NUM_SOURCES * num_params * 4 <= SKIP_ABOVE_BYTES else CHUNK

        def run():
            total = {k: 0.0 for k in params}
            squares = {k: 0.0 for k in params}
            for i in range(0, n, chunk):
                g = per_sample(params, x0[i : i + chunk], x1[i : i + chunk], y[i : i + chunk])
                for k, v in g.items():  # [c, S, ...]
                    total[k] = total[k] + v.sum(0)
                    squares[k] = squares[k] + (v * v).sum(0)
            return {k: (total[k] / n, (squares[k] - total[k] ** 2 / n) / (n - 1)) for k in params}

    elif method == "backpack":
        from backpack import backpack, extend  # pylint: disable=g-import-not-at-top
        from backpack.extensions import Variance  # pylint: disable=g-import-not-at-top

        net = extend(net)

        def run():
            out = losses(net(x0, x1), y)
            result = []
            for s in range(NUM_SOURCES):
                net.zero_grad()
                keep = s < NUM_SOURCES - 1
                with backpack(Variance(), retain_graph=keep):
                    out[s].sum().backward(retain_graph=keep)
                result.append([(p.grad.clone(), p.variance.clone()) for p in net.parameters()])
            return result
    else:
        raise ValueError(method)

    # Start the runtime (threads, allocator, autograd, functorch) on a tiny problem first,
    # so that the memory measured below is the method's own.
    tiny = torch.nn.Linear(2, 1)
    torch.func.vmap(torch.func.grad(lambda w, x: (x @ w).sum()), in_dims=(None, 0))(
        tiny.weight.detach().T, torch.ones(3, 1, 2)
    )
    tiny(torch.ones(1, 2)).sum().backward()
    _reset_peak()
    rss_before = _rss_mib()
    run()  # warm-up
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        if sum(times) > 5.0:
            break
    peak = _peak_mib()
    return {
        "time_s": sorted(times)[len(times) // 2],
        "peak_mib": max(peak - rss_before, 0.0),
        "params": num_params,
    }


def _reset_peak():
    """Reset the kernel's peak-RSS mark of this process (Linux; ignored elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mib() -> float:
    """Peak resident memory since the last reset (VmHWM), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_torch(model, size, n, method, args) -> dict:
    spec = dict(
        model=model, size=size, n=n, method=method, threads=args.threads, repeats=args.repeats
    )
    proc = subprocess.run(
        [sys.executable, __file__, "--torch-worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": reason[:160]}
    return json.loads(lines[-1])


def torch_available() -> tuple[bool, bool]:
    def importable(name):
        proc = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, check=False
        )
        return proc.returncode == 0

    has_torch = importable("torch")
    return has_torch, has_torch and importable("backpack")


# ----------------------------------------------------------------------------------------
# The run.


def fmt(x, unit=""):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.3g}{unit}" if abs(x) < 100 else f"{x:.0f}{unit}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--models", default="mlp,cnn,transformer")
    parser.add_argument("--batch-sizes", default="32,128,512")
    parser.add_argument(
        "--train-batch-sizes",
        default="128",
        help="batch sizes at which the training steps are timed",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.torch_worker:
        print(json.dumps(torch_worker(json.loads(args.torch_worker))))
        return None

    if args.quick:
        args.models, args.batch_sizes, args.train_batch_sizes = "mlp", "8", "8"
        args.repeats = 2
    sizes = QUICK_SIZES if args.quick else SIZES
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    train_sizes = {int(b) for b in args.train_batch_sizes.split(",")}
    has_torch, has_backpack = (False, False) if args.no_torch else torch_available()

    import jax  # pylint: disable=g-import-not-at-top

    out = args.out or os.path.join(
        HERE,
        "results",
        f"bench{'-quick' if args.quick else ''}-"
        f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json",
    )
    rows, notes = [], []
    if not has_torch and not args.no_torch:
        notes.append(
            "torch is not installed: the PyTorch peers are skipped (pip install torch==2.13.0)"
        )
    if has_torch and not has_backpack:
        notes.append("backpack-for-pytorch is not installed: BackPACK is skipped")
    for model in args.models.split(","):
        size = sizes[model]
        for n in batch_sizes:
            fns, num_params, model_notes = jax_functions(model, size, n, n in train_sizes)
            notes.extend(x for x in model_notes if x not in notes)
            per_example_bytes = n * NUM_SOURCES * num_params * 4
            row = {"model": model, "batch": n, "params": int(num_params), "jax": {}, "torch": {}}
            skipped = []
            if per_example_bytes > SKIP_ABOVE_BYTES:
                skipped.append("vmap")
                row["jax"]["vmap"] = {"skipped": f"B x S x P = {per_example_bytes / 2**30:.1f} GiB"}
            for name, (fn, fn_args) in list(fns.items()):
                compiled, mem = compile_with_memory(fn, *fn_args)
                fns[name] = (compiled, fn_args)  # compiled ahead: no warm-up call
                row["jax"].setdefault(name, {})["peak_mib"] = mem
            times = time_interleaved(
                {k: v for k, v in fns.items() if k not in skipped}, args.repeats
            )
            for name, t in times.items():
                row["jax"][name]["time_s"] = t
            unit = times["grad"]
            for name, t in times.items():
                row["jax"][name]["ratio"] = t / unit
            if "step_joint" in times:
                for name in [k for k in times if k.startswith("step_")]:
                    row["jax"][name]["ratio"] = times[name] / times["step_joint"]
            if has_torch:
                for method in ("grad", "func") + (("backpack",) if has_backpack else ()):
                    if method == "backpack" and model_family(model) == "transformer":
                        row["torch"][method] = {
                            "error": "unsupported: BackPACK's Variance has no "
                            "LayerNorm, MultiheadAttention or free-Parameter rule"
                        }
                        continue
                    row["torch"][method] = run_torch(model, size, n, method, args)
            rows.append(row)
            print(row_line(row), flush=True)
            write(out, make_result(args, jax, notes, rows))

    result = make_result(args, jax, notes, rows)
    write(out, result)
    print()
    print(table(result))
    print(f"\nwrote {out}")
    return result


def write(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def make_result(args, jax, notes, rows):
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "memory_method": {
            "jax": "compiled memory_analysis: temp + output bytes",
            "torch": "fresh process per method: peak RSS (VmHWM, reset after "
            "start-up) minus RSS before the first call",
        },
        "notes": notes,
        "rows": rows,
    }


def row_line(row) -> str:
    j = row["jax"]
    return (
        f"{row['model']:>11} B={row['batch']:<4} grad {fmt(j['grad'].get('time_s', 0) * 1e3)}"
        f" ms, fast x{fmt(j['fast'].get('ratio'))}, vmap x{fmt(j['vmap'].get('ratio'))}"
    )


def table(result) -> str:
    """Markdown tables: statistics (time ratios, peak memory), training steps, peers."""
    lines = [
        "Statistics per batch: time / one batch gradient (peak MiB)",
        "",
        "| model | B | grad ms | fast | vmap | vmap chunked | torch.func | BackPACK |"
        " torch grad ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        j, t = row["jax"], row["torch"]

        def cell(entry, unit_s=None):
            if not entry:
                return "-"
            if "skipped" in entry:
                return f"skipped ({entry['skipped']})"
            if "error" in entry:
                return "n/a"
            ratio = entry.get("ratio")
            if ratio is None and unit_s:
                ratio = entry["time_s"] / unit_s
            return f"{fmt(ratio)}x ({fmt(entry.get('peak_mib'))})"

        tg = t.get("grad", {}).get("time_s")
        lines.append(
            f"| {row['model']} | {row['batch']} | {fmt(j['grad']['time_s'] * 1e3)} "
            f"({fmt(j['grad'].get('peak_mib'))}) | {cell(j.get('fast'))} | {cell(j.get('vmap'))} | "
            f"{cell(j.get('vmap_chunked'))} | {cell(t.get('func'), tg)} | "
            f"{cell(t.get('backpack'), tg)} | {fmt(tg * 1e3 if tg else None)} |"
        )
    lines += [
        "",
        "Same work, absolute: fast (JAX) vs the PyTorch peers, ms",
        "",
        "| model | B | fast | torch.func | BackPACK |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        j, t = row["jax"], row["torch"]

        def ms(entry):
            if not entry:
                return "-"
            if "error" in entry:
                return f"n/a ({entry['error'][:60]})"
            return fmt(entry["time_s"] * 1e3)

        lines.append(
            f"| {row['model']} | {row['batch']} | {ms(j.get('fast'))} | "
            f"{ms(t.get('func'))} | {ms(t.get('backpack'))} |"
        )
    steps = [r for r in result["rows"] if "step_joint" in r["jax"]]
    if steps:
        names = sorted(
            {k for r in steps for k in r["jax"] if k.startswith("step_")},
            key=lambda k: (k != "step_joint", k),
        )
        lines += [
            "",
            "Training step / joint step (joint in ms)",
            "",
            "| model | B | " + " | ".join(k[5:] for k in names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for r in steps:
            cells = []
            for k in names:
                e = r["jax"].get(k)
                if not e or "time_s" not in e:
                    cells.append("-")
                elif k == "step_joint":
                    cells.append(f"{fmt(e['time_s'] * 1e3)} ms")
                else:
                    cells.append(f"{fmt(e['ratio'])}x")
            lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + " |")
    if result["notes"]:
        lines += [""] + [f"note: {x}" for x in result["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
