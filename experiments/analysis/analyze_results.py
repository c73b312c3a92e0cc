"""Paired comparison of methods in results/*.json: per-seed differences vs a baseline.

usage: python experiments/analysis/analyze_results.py results/utdmhad2.json [baseline] [seeds]
Prints, per method, mean +- std of fused/branch/probe and the paired difference
(method - baseline) over the seeds both have, mean +- std and how many seeds improved.
"""
import json, sys
import numpy as np

def load(paths):
  recs = []
  for p in paths:
    for r in json.load(open(p)):
      r = dict(r); r["_src"] = p; recs.append(r)
  return recs

def main():
  paths = [a for a in sys.argv[1:] if a.endswith(".json")]
  rest = [a for a in sys.argv[1:] if not a.endswith(".json")]
  base = rest[0] if rest else "joint_uni"
  seeds = None if len(rest) < 2 else [int(s) for s in rest[1].split(",")]
  recs = load(paths)
  if seeds is not None:
    recs = [r for r in recs if r["seed"] in seeds]
  mods = recs[0]["modalities"]
  def tag(r):
    c = r["config"]
    extra = []
    for k, d in (("optimizer", "adam"), ("kappa", 1.0), ("gamma", 1.0), ("epochs", None), ("lr", None)):
      extra.append(f"{k}={c.get(k)}")
    return r["method"] + " [" + ",".join(extra) + "]"
  groups = {}
  for r in recs:
    groups.setdefault(tag(r), []).append(r)
  def keyvals(r):
    out = {"fused": r["fused_acc"]}
    for i, m in enumerate(mods):
      out[f"br_{m}"] = r["branch_acc"][i]; out[f"pr_{m}"] = r["probe_acc"][i]; out[f"hd_{m}"] = r["head_acc"][i]
    return out
  basegroups = {t: g for t, g in groups.items() if t.startswith(base + " ")}
  cols = list(keyvals(recs[0]).keys())
  print("group | n | " + " | ".join(cols))
  for t, g in groups.items():
    vals = [keyvals(r) for r in g]
    cells = []
    for c in cols:
      v = np.array([x[c] for x in vals])
      cells.append(f"{v.mean():.3f}±{v.std(ddof=1) if len(v)>1 else 0:.3f}")
    print(f"{t} | {len(g)} | " + " | ".join(cells))
  print("\npaired differences vs", base, "(same seeds; baseline with same optimizer/epochs/lr); (k/n) = seeds improved")
  print("group | n | " + " | ".join(cols))
  for t, g in groups.items():
    if t.startswith(base + " "): continue
    c0 = g[0]["config"]
    cands = [bg for bt, bg in basegroups.items() if bg[0]["config"]["optimizer"] == c0["optimizer"]
             and bg[0]["config"]["epochs"] == c0["epochs"] and bg[0]["config"]["lr"] == c0["lr"]]
    if not cands: continue
    bmap = {r["seed"]: keyvals(r) for r in cands[0]}
    cells = []
    common = [r for r in g if r["seed"] in bmap]
    if not common: continue
    for c in cols:
      d = np.array([keyvals(r)[c] - bmap[r["seed"]][c] for r in common])
      cells.append(f"{d.mean():+.3f}±{d.std(ddof=1) if len(d)>1 else 0:.3f} ({(d>0).sum()}/{len(d)})")
    print(f"{t} | {len(common)} | " + " | ".join(cells))

main()
