"""Time ``ef_lightning.lmo.direction("spectral_muon", G)`` against torch.optim.Muon's own Newton–Schulz.

GPT-2-small shapes (768×768, 3072×768, 768×3072); for each repeat the two functions run back to back in alternating
order (interleaved, so drift and thermal effects hit both), and the script reports medians and the ratio
ours / torch (target ≤ 1.05). ``direction`` also returns d in G's dtype, scaled by sqrt(max(1, d_out/d_in)), which
torch's bare function does not; that extra cast+scale is part of what is measured.

    python benchmarks/lmo_speed.py --repeats 30 --dtype bfloat16

Note: torch's ``_zeropower_via_newtonschulz`` always iterates in bfloat16; with ``--dtype float32`` ours runs in
float32 and the ratio compares different precisions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

from ef_lightning.lmo import direction

SHAPES = [(768, 768), (3072, 768), (768, 3072)]


def timed(fn, G: torch.Tensor, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn(G)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per shape and function (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="Newton–Schulz dtype for ours (torch's is always bfloat16; default bfloat16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's); 1 is steadier on a small, busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ns_dtype = getattr(torch, args.dtype)
    ours = lambda G: direction("spectral_muon", G, ns_steps=5, ns_dtype=ns_dtype)  # noqa: E731
    theirs = lambda G: _zeropower_via_newtonschulz(G, (DEFAULT_A, DEFAULT_B, DEFAULT_C), 5, EPS)  # noqa: E731

    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads={torch.get_num_threads()}, ns_dtype={args.dtype}, "
          f"repeats={args.repeats}")
    print(f"{'shape':>12}  {'ours ms':>9}  {'torch ms':>9}  {'ratio':>6}")
    ratios = []
    for shape in SHAPES:
        G = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(0))
        for _ in range(args.warmup):
            ours(G), theirs(G)
        t_ours, t_theirs = [], []
        for r in range(args.repeats):
            pair = [(ours, t_ours), (theirs, t_theirs)]
            for fn, out in pair if r % 2 == 0 else pair[::-1]:
                out.append(timed(fn, G, sync))
        mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
        ratios.append(mo / mt)
        print(f"{'x'.join(map(str, shape)):>12}  {1e3 * mo:9.3f}  {1e3 * mt:9.3f}  {mo / mt:6.3f}")
    print(f"geometric-mean ratio ours/torch: {statistics.geometric_mean(ratios):.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
