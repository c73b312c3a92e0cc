"""Ablation table on utdmhad2 (seeds 0-2): mean ± std and paired difference vs joint_uni
trained with the same optimizer / epochs. usage: python experiments/analysis/ablation_table.py"""
import json, glob, os
import numpy as np

SEEDS = {0, 1, 2}
rows = []  # (cell, method, records)
def add(cell, path, methods=None):
  if not os.path.exists(path):
    return
  recs = [r for r in json.load(open(path)) if r["seed"] in SEEDS]
  for m in dict.fromkeys(r["method"] for r in recs):
    if methods is None or m in methods:
      rows.append((cell, m, [r for r in recs if r["method"] == m]))

add("Adam 1e-3, 40 ep (main grid)", "results/utdmhad2.json")
add("SGD 1e-2 m0.9, 40 ep", "results/ablation_utdmhad2/sgd/utdmhad2.json")
add("Adam, kappa 0.3", "results/ablation_utdmhad2/kappa0.3/utdmhad2.json")
add("Adam, kappa 3, gamma 2", "results/ablation_utdmhad2/kappa3_gamma2/utdmhad2.json")
add("Adam, PROTOTYPE noise-to-signal precision", "results/ablation_utdmhad2/prototype_bogc_snr/utdmhad2.json")
add("Adam, PROTOTYPE Laplace on encoder last layers", "results/ablation_utdmhad2/prototype_bogc_laplace_encoder/utdmhad2.json")
add("Adam 1e-3, 120 ep", "results/ablation_utdmhad2/epochs120/utdmhad2.json")

def base_for(recs):
  c = recs[0]["config"]
  for cell, m, rs in rows:
    if m == "joint_uni" and rs[0]["config"]["optimizer"] == c["optimizer"] and rs[0]["config"]["epochs"] == c["epochs"]:
      return {r["seed"]: r for r in rs}
  return None

def f(v):
  v = np.asarray(v); return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
def dlt(v):
  v = np.asarray(v); return f"{v.mean():+.3f} ({int((v > 0).sum())}/{len(v)})"
keys = [("fused", lambda r: r["fused_acc"]), ("branch inertial", lambda r: r["branch_acc"][0]),
        ("probe inertial", lambda r: r["probe_acc"][0]), ("branch skeleton", lambda r: r["branch_acc"][1]),
        ("probe skeleton", lambda r: r["probe_acc"][1])]
print("| setting | method | seeds | " + " | ".join(k for k, _ in keys) + " | Δ fused vs joint_uni | Δ branch inertial | Δ probe inertial |")
print("|" + "---|" * (3 + len(keys) + 3))
for cell, m, rs in rows:
  b = base_for(rs)
  cells = [f([g(r) for r in rs]) for _, g in keys]
  if b and m != "joint_uni":
    ds = [dlt([g(r) - g(b[r["seed"]]) for r in rs if r["seed"] in b]) for _, g in keys[:3]]
  else:
    ds = ["—"] * 3
  print(f"| {cell} | {m} | {len(rs)} | " + " | ".join(cells) + " | " + " | ".join(ds) + " |")
