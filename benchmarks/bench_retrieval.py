"""Cross-modal retrieval benchmark of the losses on scikit-learn's bundled digits (no download).

Task: each 8x8 digit is split into two "modalities", its top four rows (32
pixels) and its bottom four rows; retrieve the other half of the same image.
Fixed split of the 1797 images (seeded permutation): 1097 train, 300 val,
400 test. Two small MLP encoders (32 -> 128 -> 128 -> 32, ReLU), one per
modality, embeddings L2-normalised; Adam (lr 2e-3), batch 128, the same
epochs and seeds for every loss. A fraction ``r`` of the training pairs is
mismatched (their bottom halves are replaced by those of random other
training images, a fixed draw per seed) for r in {0, 0.2, 0.5}.

Contenders (one setup function builds them all):
- ``infonce``: symmetric InfoNCE.
- ``swamp``: SwAMP swapped-prototype loss alone; ``swamp+infonce``: plus InfoNCE (weight 1).
- ``l2rm``: the L2RM recipe: InfoNCE warm-up (first 20% of the epochs), then each
  epoch a clean/noisy split (``split_clean_noisy``, Beta mixture on per-pair InfoNCE
  losses), InfoNCE on clean batches + ``L2RMLoss`` (dummy-point partial OT, learned
  cost with one ``cost_step`` per step on planted clean pairs) on noisy batches.
  (Official L2RM uses a triplet loss on the clean part and SGRAF similarities; here
  the clean part keeps InfoNCE so only the OT rematching differs from the baseline.)
- ``multisk+infonce``: InfoNCE + Multi-SK anchor consistency (``MultiSKLoss``; the
  input-space features are the raw standardised half-images, 16 anchors, queue 128).

Hyper-parameters: one knob per method, two values, chosen by the validation rsum
averaged over mismatch rates 0 and 0.5 with one tuning seed (seed 100, not a test
seed); InfoNCE's temperature is chosen first and reused by every contrastive part.
Then each (method, rate) is trained with seeds 0, 1, 2 and evaluated on the test
split at the last epoch: R@1/5/10 in both directions and rsum (sum of the six).

Run: ``python benchmarks/bench_retrieval.py`` (about 4 minutes on a shared 2-core CPU),
``--quick`` (a smoke run: 1 seed, 2 epochs, no search), ``--out-dir DIR``.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # the shared otbench package, also when this file is imported by path
    sys.path.insert(0, HERE)

from otbench.env import DEFAULT_OUT, git_commit  # noqa: E402  (puts this checkout's ot_losses first)

from ot_losses.losses import L2RMLoss, MultiSKLoss, SwAMPLoss, info_nce_loss, split_clean_noisy  # noqa: E402
RATES = (0.0, 0.2, 0.5)
SEEDS = (0, 1, 2)
TUNE_SEED = 100
METHODS = ("infonce", "swamp", "swamp+infonce", "l2rm", "multisk+infonce")
# one knob per method, two values (the search is deliberately tiny)
GRID = {
    "infonce": ("temperature", (0.05, 0.1)),
    "swamp": ("n_prototypes", (16, 64)),
    "swamp+infonce": ("n_prototypes", (16, 64)),
    "l2rm": ("eps", (0.07, 0.03)),
    "multisk+infonce": ("weight", (0.1, 1.0)),
}
DEFAULTS = {"infonce": 0.1, "swamp": 16, "swamp+infonce": 16, "l2rm": 0.07, "multisk+infonce": 1.0}


# ----------------------------------------------------------------------------- data
def load_data():
    """Standardised top/bottom halves and the fixed train/val/test split."""
    from sklearn.datasets import load_digits
    x = load_digits().images.reshape(-1, 64).astype(np.float32) / 16.0
    top, bottom = x[:, :32], x[:, 32:]
    perm = np.random.RandomState(0).permutation(len(x))
    idx = {"train": perm[:1097], "val": perm[1097:1397], "test": perm[1397:]}
    mu_a, sd_a = top[idx["train"]].mean(0), top[idx["train"]].std(0) + 1e-3
    mu_b, sd_b = bottom[idx["train"]].mean(0), bottom[idx["train"]].std(0) + 1e-3
    a, b = torch.from_numpy((top - mu_a) / sd_a), torch.from_numpy((bottom - mu_b) / sd_b)
    return {k: (a[v], b[v]) for k, v in idx.items()}


def corrupt(b, rate, seed):
    """Replace the partner of a fraction ``rate`` of the pairs by a random other one."""
    n = b.shape[0]
    g = np.random.RandomState(1000 + seed)
    noisy = g.choice(n, size=int(round(rate * n)), replace=False)
    partner = np.arange(n)
    partner[noisy] = g.randint(0, n, size=len(noisy))
    return b[torch.from_numpy(partner)], torch.from_numpy(partner != np.arange(n))


def encoder(dim_in, dim_out=32, hidden=128):
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, dim_out))


@torch.no_grad()
def recall(enc_a, enc_b, a, b):
    """R@1/5/10 both directions (percent) and rsum, pairs = equal rows."""
    enc_a.eval(), enc_b.eval()
    sim = F.normalize(enc_a(a), dim=1) @ F.normalize(enc_b(b), dim=1).T
    enc_a.train(), enc_b.train()
    out = {}
    for name, s in (("a2b", sim), ("b2a", sim.T)):
        rank = (s > s.diag()[:, None]).sum(1)  # how many candidates beat the true partner
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * (rank < k).float().mean().item()
    out["rsum"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- training
def setup(method, knob, dim=32, epochs=30, batch=128, temperature=0.1, rate=0.0):
    """Build the loss modules and a ``step(a, b, epoch, state) -> loss`` for one contender."""
    mods = nn.ModuleDict()
    if method.startswith("swamp"):
        mods["swamp"] = SwAMPLoss(dim, n_prototypes=int(knob), eps=0.05, temperature=0.1, n_iters=3,
                                  info_nce_weight=1.0 if method == "swamp+infonce" else 0.0,
                                  info_nce_temperature=temperature, backend="torch")
    if method == "l2rm":
        # official L2RM forbids the given pairs only when the noise ratio is non-zero
        mods["l2rm"] = L2RMLoss(batch, mass=0.1, eps=float(knob), tau=0.05, n_iters=1000, tol=1e-6,
                                forbid_diagonal=rate > 0, backend="torch")
    if method == "multisk+infonce":
        mods["msk"] = MultiSKLoss((32, 32, dim), n_anchors=16, queue_size=batch, eps=0.07, n_iters=20,
                                  temperature=0.1, backend="torch")
    warmup = max(1, epochs // 5)

    def step(xa, xb, za, zb, epoch):
        if method == "infonce":
            return info_nce_loss(za, zb, temperature=temperature)
        if method.startswith("swamp"):
            return mods["swamp"](za, zb)
        if method == "multisk+infonce":
            return info_nce_loss(za, zb, temperature=temperature) + knob * mods["msk"](xa, xb, za, zb)
        raise AssertionError(method)

    return mods, step, warmup


def per_pair_infonce(enc_a, enc_b, a, b, temperature):
    """Symmetric InfoNCE of each pair against all other training pairs (for the split)."""
    with torch.no_grad():
        enc_a.eval(), enc_b.eval()
        za, zb = enc_a(a), enc_b(b)
        enc_a.train(), enc_b.train()
        return info_nce_loss(za, zb, temperature=temperature, reduction="none")


def train(method, knob, data, rate, seed, *, epochs, batch=128, temperature=0.1, eval_split="test"):
    """Train one contender; returns (metrics on ``eval_split``, seconds per epoch, extra info)."""
    a_tr, b_clean = data["train"]
    b_tr, is_noisy = corrupt(b_clean, rate, seed)
    if method == "infonce":
        temperature = knob
    torch.manual_seed(seed)
    enc_a, enc_b = encoder(a_tr.shape[1]), encoder(b_tr.shape[1])
    mods, step, warmup = setup(method, knob, epochs=epochs, batch=batch, temperature=temperature, rate=rate)
    params = list(enc_a.parameters()) + list(enc_b.parameters())
    if method != "l2rm":  # L2RM's cost net has its own optimiser (cost_step)
        params += list(mods.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    n = a_tr.shape[0]
    info = {}
    t0 = time.perf_counter()
    for epoch in range(epochs):
        if method == "l2rm" and epoch >= warmup:
            loss_pp = per_pair_infonce(enc_a, enc_b, a_tr, b_tr, temperature)
            _, clean = split_clean_noisy(loss_pp, method="beta")
            clean_idx, noisy_idx = clean.nonzero().squeeze(1), (~clean).nonzero().squeeze(1)
            info.setdefault("split", []).append({
                "epoch": epoch, "n_noisy_pred": int(len(noisy_idx)),
                "precision_noisy": float(is_noisy[noisy_idx].float().mean()) if len(noisy_idx) else None,
                "recall_noisy": (float((~clean)[is_noisy].float().mean()) if is_noisy.any() else None)})
            clean_perm = clean_idx[torch.randperm(len(clean_idx), generator=gen)]
            noisy_perm = noisy_idx[torch.randperm(len(noisy_idx), generator=gen)]
            # clean batches drive the epoch; noisy batches (drop_last) are drawn alongside
            n_noisy_batches = len(noisy_perm) // batch
            for bi, start in enumerate(range(0, len(clean_perm) - batch + 1, batch)):
                ci = clean_perm[start:start + batch]
                za, zb = enc_a(a_tr[ci]), enc_b(b_tr[ci])
                loss = info_nce_loss(za, zb, temperature=temperature)
                if n_noisy_batches:
                    ni = noisy_perm[(bi % n_noisy_batches) * batch:(bi % n_noisy_batches + 1) * batch]
                    # cost-net update: plant k clean images into the noisy image rows
                    with torch.no_grad():
                        enc_a.eval(), enc_b.eval()
                        rows = ni.clone()
                        kk = int(torch.randint(1, max(2, int(0.1 * batch) + 1), (1,), generator=gen))
                        slots = torch.randperm(batch, generator=gen)[:kk]
                        cols = torch.randperm(batch, generator=gen)[:kk]
                        rows[slots] = ci[cols]
                        s_keys = F.normalize(enc_a(a_tr[rows]), dim=1) @ F.normalize(enc_b(b_tr[ci]), dim=1).T
                        enc_a.train(), enc_b.train()
                    mods["l2rm"].cost_step(s_keys, torch.stack([slots, cols], dim=1))
                    sim = F.normalize(enc_a(a_tr[ni]), dim=1) @ F.normalize(enc_b(b_tr[ni]), dim=1).T
                    loss = loss + mods["l2rm"](sim)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            continue
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch + 1, batch):
            idx = perm[start:start + batch]
            xa, xb = a_tr[idx], b_tr[idx]
            za, zb = enc_a(xa), enc_b(xb)
            if method == "l2rm":  # warm-up
                loss = info_nce_loss(za, zb, temperature=temperature)
            else:
                loss = step(xa, xb, za, zb, epoch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sec = (time.perf_counter() - t0) / epochs
    return recall(enc_a, enc_b, *data[eval_split]), sec, info


# ----------------------------------------------------------------------------- driver
def _mean_std(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def run(quick=False, out_dir=None, epochs=None, threads=1):
    torch.set_num_threads(threads)
    out_dir = out_dir or str(DEFAULT_OUT)
    os.makedirs(out_dir, exist_ok=True)
    epochs = epochs or (2 if quick else 30)
    seeds = SEEDS[:1] if quick else SEEDS
    rates = (0.0, 0.5) if quick else RATES
    data = load_data()
    t_start = time.perf_counter()

    # ---- tiny hyper-parameter search on the validation split
    chosen, search = dict(DEFAULTS), []
    if not quick:
        order = ["infonce"] + [m for m in METHODS if m != "infonce"]
        for method in order:
            knob_name, values = GRID[method]
            scores = {}
            for v in values:
                rs = [train(method, v, data, r, TUNE_SEED, epochs=epochs, eval_split="val",
                            temperature=chosen["infonce"])[0]["rsum"] for r in (0.0, 0.5)]
                scores[v] = float(np.mean(rs))
                search.append({"method": method, knob_name: v, "val_rsum_r0": rs[0], "val_rsum_r50": rs[1]})
            chosen[method] = max(values, key=lambda v: scores[v])
            print(f"[search] {method}: {knob_name} -> {chosen[method]}  ({scores})", flush=True)

    # ---- final runs
    rows = []
    for rate in rates:
        for method in METHODS:
            runs, secs = [], []
            for seed in seeds:
                metrics, sec, info = train(method, chosen[method], data, rate, seed, epochs=epochs,
                                           temperature=chosen["infonce"])
                runs.append(metrics)
                secs.append(sec)
            row = {"method": method, "mismatch_rate": rate, "knob": {GRID[method][0]: chosen[method]},
                   "seeds": list(seeds), "epochs": epochs, "sec_per_epoch": _mean_std(secs)}
            for key in runs[0]:
                row[key] = _mean_std([r[key] for r in runs])
            row["per_seed_rsum"] = [r["rsum"] for r in runs]
            if info.get("split"):
                row["l2rm_split_last_epoch_last_seed"] = info["split"][-1]
            rows.append(row)
            print(f"[{rate:.0%}] {method:16s} rsum {row['rsum'][0]:6.1f} ± {row['rsum'][1]:4.1f}  "
                  f"a2b R@1 {row['a2b_R@1'][0]:5.1f}  b2a R@1 {row['b2a_R@1'][0]:5.1f}  "
                  f"{row['sec_per_epoch'][0] * 1e3:6.1f} ms/epoch", flush=True)

    result = {
        "benchmark": "bench_retrieval", "quick": quick,
        "task": "digits top half <-> bottom half retrieval (sklearn load_digits), 1097/300/400 split",
        "encoders": "MLP 32-128-128-32 per modality, Adam lr 2e-3, batch 128",
        "epochs": epochs, "seeds": list(seeds), "rates": list(rates), "chosen": chosen, "search": search,
        "rows": rows, "total_seconds": time.perf_counter() - t_start,
        "env": {"torch": torch.__version__, "python": platform.python_version(), "threads": threads,
                "device": "cpu", "machine": platform.processor() or platform.machine(),
                "commit": git_commit(short=True),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }
    with open(os.path.join(out_dir, "retrieval.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    with open(os.path.join(out_dir, "retrieval.md"), "w") as fh:
        fh.write(markdown(result))
    print(f"wrote {out_dir}/retrieval.{{json,md}} in {result['total_seconds']:.0f} s", flush=True)
    return result


def markdown(result):
    lines = [f"# Retrieval benchmark (digits halves), {'QUICK smoke run' if result['quick'] else 'full run'}",
             "",
             f"{result['task']}; {result['encoders']}; {result['epochs']} epochs; "
             f"seeds {result['seeds']}; mean ± std over seeds; recalls in percent; "
             f"torch {result['env']['torch']}, {result['env']['threads']} thread(s), commit "
             f"{result['env']['commit']}, {result['env']['date']}.",
             "",
             "Chosen on the validation split: " + ", ".join(
                 f"{m}: {GRID[m][0]}={v}" for m, v in result["chosen"].items()),
             ""]
    head = ("| mismatch | method | a2b R@1 | a2b R@5 | a2b R@10 | b2a R@1 | b2a R@5 | b2a R@10 | rsum "
            "| ms/epoch |")
    lines += [head, "|" + "---|" * 10]
    for r in result["rows"]:
        cells = [f"{r['mismatch_rate']:.0%}", r["method"]]
        for key in ("a2b_R@1", "a2b_R@5", "a2b_R@10", "b2a_R@1", "b2a_R@5", "b2a_R@10", "rsum"):
            cells.append(f"{r[key][0]:.1f} ± {r[key][1]:.1f}")
        cells.append(f"{r['sec_per_epoch'][0] * 1e3:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Headline comparisons (rsum, paired by seed)", ""]
    lines += headlines(result) + [""]
    return "\n".join(lines)


def headlines(result):
    """The two claims of the seed papers this table can test, stated from the numbers."""
    rows = {(r["method"], r["mismatch_rate"]): r for r in result["rows"]}
    out = []
    for method, base, rate in (("swamp", "infonce", 0.0), ("swamp+infonce", "infonce", 0.0),
                               ("l2rm", "infonce", 0.5), ("l2rm", "infonce", 0.2),
                               ("multisk+infonce", "infonce", 0.0)):
        if (method, rate) not in rows or (base, rate) not in rows:
            continue
        a, b = rows[(method, rate)], rows[(base, rate)]
        wins = sum(x > y for x, y in zip(a["per_seed_rsum"], b["per_seed_rsum"]))
        word = "higher" if a["rsum"][0] > b["rsum"][0] else "lower"
        out.append(f"- {rate:.0%} mismatch: {method} {a['rsum'][0]:.1f} ± {a['rsum'][1]:.1f} vs {base} "
                   f"{b['rsum'][0]:.1f} ± {b['rsum'][1]:.1f} ({word}; higher on {wins}/"
                   f"{len(a['per_seed_rsum'])} seeds)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epochs, rates 0 and 0.5")
    p.add_argument("--out-dir", default=None,
                   help="where retrieval.{json,md} go (default benchmarks/results)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = p.parse_args(argv)
    run(quick=args.quick, out_dir=args.out_dir, epochs=args.epochs, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
