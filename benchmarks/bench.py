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

Times are medians over interleaved repeats (the machine may be shared); on a CPU each row
(model and batch size) is measured in a fresh process (``--isolate``), since a process
that has run a large model measures the next on a fragmented heap. Peak memory:
JAX, from the compiled program (``memory_analysis``: temporaries + outputs); PyTorch,
the rise of the process's peak resident memory (``VmHWM``, reset after start-up) over
the measured calls, each peer in a fresh process. Prints a table and writes JSON to benchmarks/results/.

On Linux the C library's allocator is part of what a CPU run measures: with glibc's
defaults, a program whose temporaries outgrow a thread's 64 MiB arena maps them afresh on
every call, and the page faults cost as much as the arithmetic (the bogc step on the
1024-wide MLP, about 29,000 faults a step). The JSON records the ``MALLOC_*`` settings;
``docs/benchmarks.md`` gives the ones that keep freed memory in one arena
(:data:`STEADY_ALLOCATOR`), and the run says when they are missing.

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
for _path in (ROOT, HERE):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from timing import STEP_METHODS, in_fresh_process, time_interleaved, training_step

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

        def heads(self, h0, h1, stop_heads=False):
            fused = self.head(jnp.concatenate([h0, h1], -1))
            if stop_heads:  # the auxiliary heads train on features they do not move
                h0, h1 = jax.lax.stop_gradient(h0), jax.lax.stop_gradient(h1)
            return fused, self.aux0(h0), self.aux1(h1)

        def __call__(self, x0, x1, stop_heads=False):
            return self.heads(*self.features(x0, x1), stop_heads)

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

            def features(self, x0, x1):
                for layer in self.enc0:
                    x0 = nnx.relu(layer(x0))
                for layer in self.enc1:
                    x1 = nnx.relu(layer(x1))
                return x0, x1

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

            def features(self, img, seq):
                for layer in self.enc0:
                    img = nnx.relu(layer(img))
                for layer in self.enc1:
                    seq = nnx.relu(layer(seq))
                return img.mean((1, 2)), seq.mean(1)

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

            def features(self, ids, feats):
                x = self.enc0[0](ids) + self.pos[...]
                for block in self.enc0[1:]:
                    x = block(x)
                return x.mean(1), nnx.relu(self.enc1(feats))

    net = Net()
    graphdef, params = nnx.split(net, nnx.Param)

    def ce(logits, y):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

    def forward(p, batch, stop_heads=False):
        x0, x1, y = batch
        logits = nnx.merge(graphdef, p)(x0, x1, stop_heads)
        return jnp.stack([ce(z, y) for z in logits]), logits

    forward.graphdef = graphdef  # type: ignore[attr-defined]

    def losses_fn(p, batch):
        return forward(p, batch)[0]

    return params, losses_fn, forward


def representation_parts(forward):
    """``(encode, head_params)`` of :func:`jax_model`'s network (``forward`` carries its
    graph), for ``bj.representation_bogc``: the two modalities' features, and ``(kernel,
    bias)`` of the fusion head (reading both) and of the two auxiliary heads (one each)."""
    from flax import nnx  # pylint: disable=g-import-not-at-top

    def encode(p, batch):
        return list(nnx.merge(forward.graphdef, p).features(batch[0], batch[1]))

    def head_params(p):
        return [(p[name]["kernel"][...], p[name]["bias"][...]) for name in ("head", "aux0", "aux1")]

    return encode, head_params


def compile_with_memory(jitted, *args):
    """The compiled function, its temporaries + outputs in MiB (None if unknown), the
    seconds spent lowering and compiling it, and the number of operations in the lowered
    program (what the compiler has to work through)."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    try:
        stats = compiled.memory_analysis()
        mib = (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20
    except Exception:  # pylint: disable=broad-except
        mib = None
    text = lowered.as_text()
    ops = sum(
        1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith("//")
    )
    return compiled, mib, seconds, ops


STEPS = STEP_METHODS
STATS = ("grad", "fast", "vmap", "vmap_chunked")


def jax_functions(
    model: str,
    size: dict,
    n: int,
    train: bool,
    stats: tuple = STATS,
    steps: tuple = STEPS,
):
    """Name -> (jitted fn, args); the parameter count; notes.

    Statistics: ``grad`` (one batch gradient of the summed losses: the unit), ``fast``,
    ``vmap``, ``vmap_chunked`` (``bj.source_grad_stats`` with that method). Training steps
    (``step_<method>``, each the method's gradient work + its transform + Adam):

    - ``joint``: the fusion loss; the auxiliary heads train on stop-gradient features (the
      unit of the step ratios);
    - ``joint_uni``: the fixed-weight sum of the three losses (BOGC's baseline);
    - ``bogc``: ``bj.source_grad_stats(method="fast")`` -> ``bj.bogc``;
    - ``cggm``, ``ogm_ge``: the summed losses' gradient and the auxiliary heads' batch
      accuracies (``modality_scores``) -> ``bj.cggm`` / ``bj.ogm_ge``;
    - ``mmpareto``: per-source mean gradients (``bj.source_grad_means``: mmpareto reads
      no variance) -> ``bj.mmpareto``.

    (``timing.training_step`` builds each step.)
    """
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    import bogc_jax as bj  # pylint: disable=g-import-not-at-top

    params, losses_fn, forward = jax_model(model, size)
    batch = tuple(jnp.asarray(x) for x in make_batch(model, size, n))
    num_params = sum(x.size for x in jax.tree.leaves(params))

    def total(p, b):
        return jnp.sum(jnp.mean(losses_fn(p, b), axis=1))

    fns = {}
    options = {
        "fast": dict(method="fast"),
        "vmap": dict(method="vmap"),
        "vmap_chunked": dict(method="vmap", chunk_size=_divisor(n, CHUNK)),
    }
    for name in stats:
        if name == "grad":
            fns["grad"] = (jax.jit(jax.grad(total)), (params, batch))
            continue
        kwargs = options[name]
        fns[name] = (
            jax.jit(lambda p, b, kw=kwargs: bj.source_grad_stats(losses_fn, p, b, **kw)),
            (params, batch),
        )
    notes = []
    if not train:
        return fns, num_params, notes

    labels = bj.label_params(params, {"enc0": 0, "enc1": 1}, default=None)
    parts = representation_parts(forward)
    for name in steps:
        needs = {"bogc_repr": "representation_bogc"}.get(name, name)
        if name not in ("joint", "joint_uni") and not hasattr(bj, needs):
            notes.append(f"bj.{name} is not importable yet: its training step is skipped")
            continue
        step, state = training_step(bj, name, losses_fn, forward, params, labels, n, parts=parts)
        fns[f"step_{name}"] = (jax.jit(step), (params, state, batch))
    return fns, num_params, notes


def _divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


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
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
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


SUITES = {
    # name: models, statistics batch sizes, training-step batch sizes, P sweep (models at
    # the first training batch size), statistics methods.
    "default": dict(
        models="mlp512,mlp1024,mlp2048,cnn,transformer",
        batch_sizes="32,128,512",
        train_batch_sizes="128",
        stats="grad,fast,vmap,vmap_chunked",
    ),
    # Cost against B (32 to 1024) on the 512-wide MLP and the CNN, and against P
    # (0.1M to 10M parameters: MLPs of width 160 to 1632) at B = 128; draws the PNG.
    "scaling": dict(
        models="mlp512,cnn",
        batch_sizes="32,64,128,256,512,1024",
        train_batch_sizes="32,64,128,256,512,1024",
        params_models="mlp160,mlp320,mlp640,mlp1024,mlp1632",
        stats="grad,fast,vmap",
    ),
    # One GPU, under 8 minutes: models and batches that keep it busy. The steps leave out
    # joint_uni and ogm_ge (their compile times would push the suite past 8 minutes).
    "gpu": dict(
        models="mlp2048,cnn,transformer20m",
        batch_sizes="256,1024",
        train_batch_sizes="256,1024",
        stats="grad,fast,vmap",
        steps="joint,bogc,bogc_repr,cggm,mmpareto",
    ),
}
QUICK_SUITES = {
    "default": dict(models="mlp", batch_sizes="8", train_batch_sizes="8"),
    "scaling": dict(
        models="mlp512", batch_sizes="8,16", train_batch_sizes="8,16", params_models="mlp256,mlp512"
    ),
    "gpu": dict(models="mlp2048", batch_sizes="8", train_batch_sizes="8"),
}


def measure_row(args, model, n, sweep, train_sizes, stats, steps, has_torch, has_backpack):
    """One row of the tables: the JAX functions (and PyTorch peers) of ``model`` at batch
    ``n``, timed side by side. Returns ``(row, notes)``."""
    size = model_size(model, args.quick)
    train = n in train_sizes and sweep == "batch" or sweep == "params"
    fns, num_params, model_notes = jax_functions(
        model, size, n, train, stats=stats, steps=steps if train else ()
    )
    per_example_bytes = n * NUM_SOURCES * num_params * 4
    row = {
        "model": model,
        "sweep": sweep,
        "batch": n,
        "params": int(num_params),
        "pid": os.getpid(),  # rows measured in fresh processes (--isolate) differ here
        "jax": {},
        "torch": {},
    }
    skipped = []
    for name in ("vmap", "vmap_chunked"):
        limit = args.vmap_max_gib * 2**30 * (CHUNK / n if name == "vmap_chunked" else 1)
        if name in fns and per_example_bytes > limit:
            skipped.append(name)
            row["jax"][name] = {"skipped": f"B x S x P = {per_example_bytes / 2**30:.1f} GiB"}
    for name, (fn, fn_args) in list(fns.items()):
        if name in skipped:
            continue
        compiled, mem, seconds, ops = compile_with_memory(fn, *fn_args)
        fns[name] = (compiled, fn_args)  # compiled ahead: no warm-up call
        row["jax"].setdefault(name, {}).update(peak_mib=mem, compile_s=seconds, ops=ops)
    times = time_interleaved(
        {k: v for k, v in fns.items() if k not in skipped}, args.repeats, clock=args.clock
    )
    for name, t in times.items():
        row["jax"][name]["time_s"] = t
        row["jax"][name]["ratio"] = t / times["grad"]
    if "step_joint" in times:
        joint = row["jax"]["step_joint"]
        for name in [k for k in times if k.startswith("step_")]:
            e = row["jax"][name]
            e["ratio"] = times[name] / times["step_joint"]
            e["compile_ratio"] = e["compile_s"] / joint["compile_s"]
    if has_torch and sweep == "batch":
        for method in ("grad", "func") + (("backpack",) if has_backpack else ()):
            if method == "backpack" and model_family(model) == "transformer":
                row["torch"][method] = {
                    "error": "unsupported: BackPACK's Variance has no "
                    "LayerNorm, MultiheadAttention or free-Parameter rule"
                }
                continue
            if method == "func" and per_example_bytes > 64 * SKIP_ABOVE_BYTES:
                row["torch"][method] = {"error": "skipped: too slow at this size"}
                continue
            row["torch"][method] = run_torch(model, size, n, method, args)
    return row, model_notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--suite",
        default="default",
        choices=sorted(SUITES),
        help="default: statistics and steps on the MLPs (512, 1024, 2048 wide), the CNN and "
        "the transformer, with the PyTorch peers; scaling: cost against B and P, drawn as "
        "a log-log PNG; gpu: one GPU in under 8 minutes (B 256 and 1024, a 20M-parameter "
        "transformer)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes, two repeats")
    parser.add_argument("--models", default=None, help="comma-separated (suite's default)")
    parser.add_argument("--batch-sizes", default=None)
    parser.add_argument(
        "--train-batch-sizes", default=None, help="batch sizes at which the steps are timed"
    )
    parser.add_argument(
        "--params-models", default=None, help="models of the P sweep (scaling suite)"
    )
    parser.add_argument("--stats", default=None, help=f"statistics to time, of {STATS}")
    parser.add_argument(
        "--steps", default=None, help=f"training steps, of {STEPS} (suite's default: all)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "cpu"),
        help="wall: elapsed time (GPUs, a quiet machine); cpu: this process's CPU time (a "
        "shared CPU; the PyTorch peers always report elapsed time)",
    )
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--vmap-max-gib",
        type=float,
        default=SKIP_ABOVE_BYTES / 2**30,
        help="skip vmap where the per-example gradients (B x S x P) exceed this",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting new rows after this many seconds (gpu suite: 420)",
    )
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--plot", default=None, help="PNG path (default: beside the JSON)")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure each row in a fresh process (default: on a CPU): a process that has "
        "run a large model measures the next one on a fragmented heap",
    )
    parser.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.torch_worker:
        print(json.dumps(torch_worker(json.loads(args.torch_worker))))
        return None

    suite = dict(SUITES[args.suite])
    if args.quick:
        suite.update(QUICK_SUITES[args.suite])
        args.repeats = min(args.repeats, 2)
    suite.setdefault("steps", ",".join(STEPS))
    for key in ("models", "batch_sizes", "train_batch_sizes", "params_models", "stats", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, suite.get(key, ""))
    if args.suite == "gpu":
        args.no_torch = True  # the peers run on the CPU: not this suite's subject
        if args.budget_s is None:
            args.budget_s = 420.0
    stats = tuple(x for x in args.stats.split(",") if x)
    if "grad" not in stats:
        stats = ("grad",) + stats
    steps = tuple(x for x in args.steps.split(",") if x)
    if steps and "joint" not in steps:
        steps = ("joint",) + steps
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    train_sizes = {int(b) for b in args.train_batch_sizes.split(",") if b}
    plan = [(m, n, "batch") for m in args.models.split(",") if m for n in batch_sizes]
    plan += [(m, n, "batch") for m in args.models.split(",") if m for n in sorted(train_sizes)
             if n not in batch_sizes]  # fmt: skip
    if args.params_models:
        n0 = min(train_sizes) if 128 not in train_sizes else 128
        plan += [(m, n0, "params") for m in args.params_models.split(",") if m]
    for model, _, _ in plan:
        model_family(model)  # fail early on an unknown name
    if args.row_worker:  # measure_row's arguments, as the parent found them
        model, n, sweep, has_torch, has_backpack = json.loads(args.row_worker)
    else:
        has_torch, has_backpack = (False, False) if args.no_torch else torch_available()
    if args.isolate and not args.row_worker:
        # This process only collects rows: on a GPU it must not reserve the memory the
        # rows' processes need (they inherit the setting and allocate as they go).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import jax  # pylint: disable=g-import-not-at-top

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or os.path.join(
        HERE, "results", f"bench-{args.suite}{'-quick' if args.quick else ''}-{stamp}.json"
    )
    rows, notes = [], []
    if not has_torch and not args.no_torch:
        notes.append(
            "torch is not installed: the PyTorch peers are skipped (pip install torch==2.13.0)"
        )
    if has_torch and not has_backpack:
        notes.append("backpack-for-pytorch is not installed: BackPACK is skipped")
    note = allocator_note(jax.default_backend())
    if note and not args.row_worker:
        notes.append(note)
    if args.row_worker:
        row, row_notes = measure_row(
            args, model, n, sweep, train_sizes, stats, steps, has_torch, has_backpack
        )
        write(args.result_file, {"row": row, "notes": row_notes})
        return None
    isolate = args.isolate
    if isolate is None:
        isolate = jax.default_backend() == "cpu" and len(plan) > 1
    started = time.perf_counter()
    for model, n, sweep in plan:
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - started)
        if left is not None and left <= 0:
            notes.append(f"time budget ({args.budget_s:.0f} s) spent: skipped {model} B={n}")
            continue
        if isolate:
            job = json.dumps([model, n, sweep, has_torch, has_backpack])
            rest = list(argv if argv is not None else sys.argv[1:])
            result = in_fresh_process(__file__, rest + ["--row-worker", job], timeout_s=left)
            if result is None:
                notes.append(f"time budget spent while measuring {model} B={n}: row skipped")
                continue
            row, row_notes = result["row"], result["notes"]
        else:
            row, row_notes = measure_row(
                args, model, n, sweep, train_sizes, stats, steps, has_torch, has_backpack
            )
        notes.extend(x for x in row_notes if x not in notes)
        rows.append(row)
        print(row_line(row), flush=True)
        write(out, make_result(args, jax, notes, rows))

    result = make_result(args, jax, notes, rows)
    write(out, result)
    print()
    print(table(result))
    if args.suite == "scaling" or args.plot:
        png = args.plot or os.path.splitext(out)[0] + ".png"
        drawn = plot(result, png)
        print(f"\nwrote {png}" if drawn else f"\nno plot: {drawn.reason}")
        result["plot"] = png if drawn else None
        write(out, result)
    print(f"\nwrote {out}")
    return result


def write(path, result):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def library_commit() -> str:
    """The last commit that changed ``bogc_jax/`` in this checkout (``+dirty`` with
    uncommitted changes there). A copy of the tree without its git history (a remote
    machine's working copy, say) reads it from ``$LIBRARY_COMMIT``."""
    fallback = os.environ.get("LIBRARY_COMMIT") or "unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", ROOT, "log", "-1", "--format=%H", "--", "bogc_jax"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "bogc_jax"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return (commit + ("+dirty" if dirty else "")) if commit else fallback
    except (OSError, subprocess.CalledProcessError):
        return fallback


# glibc settings under which every thread allocates from the main arena, large blocks come
# from the heap rather than from their own mappings, and freed memory stays with the
# process: a call then reuses the pages of the previous one.
STEADY_ALLOCATOR = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "1073741824",
}


def allocator() -> dict:
    """The C library and its ``MALLOC_*`` settings in this process's environment."""
    name, version = platform.libc_ver()
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
    return {"libc": f"{name} {version}".strip(), "settings": settings}


def allocator_note(platform_name: str) -> str | None:
    """A note when a CPU run on glibc lacks :data:`STEADY_ALLOCATOR`, else None."""
    if platform_name != "cpu" or platform.libc_ver()[0] != "glibc":
        return None
    if all(os.environ.get(k) == v for k, v in STEADY_ALLOCATOR.items()):
        return None
    settings = " ".join(f"{k}={v}" for k, v in STEADY_ALLOCATOR.items())
    return (
        "glibc's default arenas map large temporaries afresh on every call: steps with "
        f"temporaries over 64 MiB include page faults. For the library's own cost run with "
        f"{settings} (docs/benchmarks.md)"
    )


def make_result(args, jax, notes, rows):
    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "suite": args.suite,
        "quick": args.quick,
        "threads": args.threads,
        "repeats": args.repeats,
        "clock": args.clock,
        "library_commit": library_commit(),
        "device": {
            "platform": device.platform,
            "kind": getattr(device, "device_kind", str(device)),
            "count": jax.device_count(),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "allocator": allocator(),
        "memory_method": {
            "jax": "compiled memory_analysis: temp + output bytes",
            "torch": "fresh process per method: peak RSS (VmHWM, reset after "
            "start-up) minus RSS before the first call",
        },
        "timing_method": "compiled ahead (lower + compile, timed: compile_s); medians over "
        "interleaved repeats",
        "notes": notes,
        "rows": rows,
    }


def row_line(row) -> str:
    j = row["jax"]
    parts = [f"{row['model']:>14} B={row['batch']:<5} P={row['params'] / 1e6:.2f}M"]
    parts.append(f"grad {fmt(j['grad'].get('time_s', 0) * 1e3)} ms")
    for name in ("fast", "vmap"):
        if "ratio" in j.get(name, {}):
            parts.append(f"{name} x{fmt(j[name]['ratio'])}")
    for name in ("step_bogc", "step_mmpareto"):
        if "ratio" in j.get(name, {}):
            parts.append(f"{name[5:]} x{fmt(j[name]['ratio'])}")
    return ", ".join(parts)


def table(result) -> str:
    """Markdown tables: statistics (time ratios, peak memory), training steps (time and
    compile-time ratios, peak memory), the PyTorch peers."""
    rows = result["rows"]
    lines = [
        f"Device: {result['device']['kind']} ({result['device']['platform']}); library "
        f"{result['library_commit'][:12]}",
        "",
        "Statistics per batch: time / one batch gradient (peak MiB)",
        "",
        "| model | P | B | grad ms | fast | vmap | vmap chunked | torch.func | BackPACK |"
        " torch grad ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

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

    for row in rows:
        j, t = row["jax"], row["torch"]
        tg = t.get("grad", {}).get("time_s")
        lines.append(
            f"| {row['model']} | {row['params'] / 1e6:.2f}M | {row['batch']} | "
            f"{fmt(j['grad']['time_s'] * 1e3)} ({fmt(j['grad'].get('peak_mib'))}) | "
            f"{cell(j.get('fast'))} | {cell(j.get('vmap'))} | {cell(j.get('vmap_chunked'))} | "
            f"{cell(t.get('func'), tg)} | {cell(t.get('backpack'), tg)} | "
            f"{fmt(tg * 1e3 if tg else None)} |"
        )
    if any(row["torch"] for row in rows):
        lines += [
            "",
            "Same work, absolute: fast (JAX) vs the PyTorch peers, ms",
            "",
            "| model | B | fast | torch.func | BackPACK |",
            "|---|---|---|---|---|",
        ]
        for row in rows:
            j, t = row["jax"], row["torch"]
            if not t:
                continue

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
    steps = [r for r in rows if "time_s" in r["jax"].get("step_joint", {})]
    if steps:
        names = sorted(
            {k for r in steps for k in r["jax"] if k.startswith("step_")},
            key=lambda k: (k != "step_joint", STEPS.index(k[5:]) if k[5:] in STEPS else 99),
        )
        header = "| model | P | B | " + " | ".join(k[5:] for k in names) + " |"
        rule = "|---|---|---|" + "---|" * len(names)
        blocks = (
            ("Training step / joint step (joint in ms)", "ratio", "time_s", 1e3, " ms"),
            ("Compile time / joint step's (joint in s)", "compile_ratio", "compile_s", 1, " s"),
            ("Operations in the lowered step (StableHLO)", None, "ops", 1, ""),
            ("Training step peak memory, MiB", None, "peak_mib", 1, ""),
        )
        for title, ratio_key, abs_key, scale, unit in blocks:
            lines += ["", title, "", header, rule]
            for r in steps:
                cells = []
                for k in names:
                    e = r["jax"].get(k, {})
                    if abs_key not in e or e[abs_key] is None:
                        cells.append("-")
                    elif ratio_key is None or k == "step_joint":
                        cells.append(f"{fmt(e[abs_key] * scale)}{unit}")
                    else:
                        cells.append(f"{fmt(e[ratio_key])}x")
                lines.append(
                    f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} | "
                    + " | ".join(cells)
                    + " |"
                )
    if result["notes"]:
        lines += [""] + [f"note: {x}" for x in result["notes"]]
    return "\n".join(lines)


class _NotDrawn:
    def __init__(self, reason):
        self.reason = reason

    def __bool__(self):
        return False


CURVES = ("grad", "fast", "vmap", "step_joint", "step_bogc", "step_mmpareto", "step_cggm")


def plot(result, path):
    """Log-log PNG: seconds against B (one panel per model of the B sweep) and against P."""
    try:
        import matplotlib  # pylint: disable=g-import-not-at-top

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:
        return _NotDrawn("matplotlib is not installed (pip install matplotlib)")
    rows = result["rows"]
    by_batch = {}
    for r in rows:
        if r.get("sweep", "batch") == "batch":
            by_batch.setdefault(r["model"], []).append(r)
    by_params = [r for r in rows if r.get("sweep") == "params"]
    panels = [(f"{m}: time vs batch size B", "batch", rs) for m, rs in by_batch.items()]
    if by_params:
        panels.append(
            (f"MLPs at B={by_params[0]['batch']}: time vs parameters P", "params", by_params)
        )
    if not panels:
        return _NotDrawn("no rows")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, key, rs) in zip(axes[0], panels):
        rs = sorted(rs, key=lambda r: r[key])
        for name in CURVES:
            pts = [
                (r[key], r["jax"][name]["time_s"]) for r in rs if "time_s" in r["jax"].get(name, {})
            ]
            if len(pts) > 1:
                ax.plot(*zip(*pts), marker="o", label=name.replace("step_", "step "))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("B" if key == "batch" else "P (parameters)")
        ax.set_ylabel("seconds")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['device']['kind']}, library {result['library_commit'][:10]}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
