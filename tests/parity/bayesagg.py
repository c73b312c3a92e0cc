"""Parity of the library with BayesAgg-MTL's official outputs, from any fixture file.

    python -m tests.parity.bayesagg ../shared/reference/bayesagg/fixtures_seed0.npz

Reads a fixture in the documented format (README.md beside the fixture: inputs ``h``,
``h_full``, heads ``mc_W``/``bin_W``, labels and targets, ``gamma``, the powers, the draws),
recomputes every reference output from those inputs with ``bogc_jax`` in float64, and
prints, per key, the largest error relative to the key's largest magnitude
(``max |ours - ref| / max |ref|``). With the library's own draws (``--own-draws S``,
default 4096) it also prints, per Monte Carlo key, the largest ``|ours - ref| / se`` over
elements, with ``se`` the standard error of the difference of the two estimates (from the
reference draws' second and fourth moments). Exits 1 if any key exceeds its tolerance
(``--tol``, default 1e-8; 4 standard errors for the Monte Carlo keys).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bogc_jax import head_posterior as hp
from bogc_jax import representation_moments as rm
from bogc_jax import representation_weights as rw

CLAMP = rw.VARIANCE_CLAMP


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {ours.shape}, reference {ref.shape}")
    scale = max(float(np.max(np.abs(ref))), 1e-300)
    return float(np.max(np.abs(ours - ref))) / scale


def _powered(var, p):
    return jnp.power(jnp.maximum(var, CLAMP), p)


def _mc_z(loss, post, h, y, ref_draws, key, num_samples):
    """Largest |z| of the mean and of the variance: own draws against the reference draws."""
    ours = rm.monte_carlo_moments(
        loss, h, y, posterior=post, form="full", key=key, num_samples=num_samples, chunk_size=256
    )
    g = jax.vmap(lambda th: rm.input_gradients(loss, th, h, y))(ref_draws)  # [S, B, slots, d]
    s_ref = g.shape[0]
    mean_ref = jnp.mean(g, 0)
    var_ref = jnp.mean(jnp.square(g - mean_ref), 0)
    m4 = jnp.mean((g - mean_ref) ** 4, 0)
    se_mean = jnp.sqrt(var_ref / num_samples + var_ref / s_ref)
    se_var = jnp.sqrt(jnp.maximum(m4 - var_ref**2, 0) * (1 / num_samples + 1 / s_ref))
    z_mean = jnp.abs(ours.mean - mean_ref) / jnp.maximum(se_mean, 1e-300)
    z_var = jnp.abs(ours.var - var_ref) / jnp.maximum(se_var, 1e-300)
    return float(jnp.max(z_mean)), float(jnp.max(z_var))


def check(path: str, tol: float = 1e-8, own_draws: int = 4096, seed: int = 0):
    """``[(key, value, tolerance, kind)]`` for every reference output of the fixture."""
    f = np.load(path)
    gamma = float(f["gamma"])
    p_reg, p_cls = float(f["sqrt_power_reg"]), float(f["sqrt_power_cls"])
    h, h_full = jnp.asarray(f["h"]), jnp.asarray(f["h_full"])
    rows = []
    moments = {}
    keys = jax.random.split(jax.random.key(seed), 2)
    for prefix, loss, y_key in (("mc", "softmax", "mc_y"), ("bin", "sigmoid", "bin_y")):
        theta = jnp.asarray(f[f"{prefix}_W"])
        y, y_full = jnp.asarray(f[y_key]), jnp.asarray(f[f"{y_key}_full"])
        full = hp.full_data_posterior(
            loss, theta, h_full, y_full, prior_variance=gamma, form="full"
        )
        post = hp.head_posterior(loss, theta, h, y, full, form="full")
        for stage, p in (("full", full), ("post", post)):
            rows.append(
                (
                    f"{prefix}_{stage}_mean",
                    relative_error(p.mean.reshape(-1), f[f"{prefix}_{stage}_mean"]),
                    tol,
                    "rel",
                )
            )
            rows.append(
                (
                    f"{prefix}_{stage}_cov",
                    relative_error(hp.covariance(loss, "full", p), f[f"{prefix}_{stage}_cov"]),
                    tol,
                    "rel",
                )
            )
        draws = jnp.asarray(f[f"{prefix}_draws"]).reshape((-1,) + theta.shape)
        m = rm.monte_carlo_moments(loss, h, y, draws=draws, chunk_size=128)
        moments[prefix] = (m.mean, _powered(m.var, p_cls))
        rows.append((f"{prefix}_E_g", relative_error(m.mean, f[f"{prefix}_E_g"]), tol, "rel"))
        rows.append(
            (f"{prefix}_V_g", relative_error(moments[prefix][1], f[f"{prefix}_V_g"]), tol, "rel")
        )
        if own_draws:
            key = keys[0] if prefix == "mc" else keys[1]
            z_mean, z_var = _mc_z(loss, post, h, y, draws, key, own_draws)
            rows.append((f"{prefix}_E_g (own draws)", z_mean, 4.0, "z"))
            rows.append((f"{prefix}_var_g (own draws)", z_var, 4.0, "z"))
    y, y_full = jnp.asarray(f["reg_y"]), jnp.asarray(f["reg_y_full"])
    theta = jnp.zeros((y.shape[1], h.shape[1]), h.dtype)  # exact: independent of the start
    full = hp.full_data_posterior("mse", theta, h_full, y_full, prior_variance=gamma, form="full")
    post = hp.head_posterior("mse", theta, h, y, full, form="full")
    for stage, p in (("full", full), ("post", post)):
        cov = jnp.broadcast_to(jnp.linalg.inv(p.precision), (theta.shape[0],) + p.precision.shape)
        rows.append(
            (f"reg_{stage}_mean", relative_error(p.mean, f[f"reg_{stage}_mean"]), tol, "rel")
        )
        rows.append((f"reg_{stage}_cov", relative_error(cov, f[f"reg_{stage}_cov"]), tol, "rel"))
    m = rm.mse_moments(post, h, y, form="full")
    moments["reg"] = (m.mean, _powered(m.var, p_reg))
    rows.append(("reg_E_g", relative_error(m.mean, f["reg_E_g"]), tol, "rel"))
    rows.append(("reg_V_g", relative_error(moments["reg"][1], f["reg_V_g"]), tol, "rel"))
    order = ("reg", "mc", "bin")
    mean = jnp.moveaxis(jnp.concatenate([moments[k][0] for k in order], axis=1), 1, 0)
    var = jnp.moveaxis(jnp.concatenate([moments[k][1] for k in order], axis=1), 1, 0)
    agg, _, _ = rw.calibrate(mean, var, scale="mean", aggregation="precision", power=1.0)
    rows.append(("agg_dL_dh", relative_error(agg / h.shape[0], f["agg_dL_dh"]), tol, "rel"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture", help="a fixture .npz in the documented format")
    parser.add_argument("--tol", type=float, default=1e-8, help="relative tolerance")
    parser.add_argument("--own-draws", type=int, default=4096, help="0 to skip")
    args = parser.parse_args(argv)
    with jax.enable_x64(True):  # float64 here only: importing this module changes nothing
        rows = check(args.fixture, args.tol, args.own_draws)
    failed = 0
    print(f"{'key':<26} {'error':>12} {'tolerance':>10}  measure")
    for key, value, tolerance, kind in rows:
        ok = value <= tolerance
        failed += not ok
        measure = "max |diff| / max |ref|" if kind == "rel" else "max |diff| / std. error"
        print(f"{key:<26} {value:12.3e} {tolerance:10.1e}  {measure}{'' if ok else '  FAIL'}")
    print(f"{len(rows) - failed}/{len(rows)} within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
