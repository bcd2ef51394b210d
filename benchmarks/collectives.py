"""Which torch.distributed collective moves EF21's messages fastest over a slow link (gloo, 2 ranks)?

The uncompressed ``sharded`` topology moves the same bytes as DDP's ring all-reduce (each rank sends half the
gradient to the other's owner, then half the model back), yet measured slower over a shaped link. This script times
the candidate collectives for one step's traffic of the benchmark model (1.378 MB fp32), in two network namespaces
joined by a tbf-shaped veth pair (as ``shaped_link.py``), median of 5 after 2 warm-up rounds, slower rank:

* ``all_reduce``: DDP's dense all-reduce of the whole gradient;
* ``all_to_all + all_gather``: sharded uplink (each rank's half to its owner) then downlink (owners' halves to all);
* ``reduce_scatter + all_gather``: the same traffic as a reduce-scatter (needs a sum: uncompressed only);
* ``isend/irecv + all_gather``: the uplink as one point-to-point exchange;
* ``all_gather (whole)``: the allgather topology's uplink.

    sudo python benchmarks/collectives.py            # ~2 min; writes benchmarks/results/collectives.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common as C  # noqa: E402
from shaped_link import ADDR0, Link, netns_unavailable  # noqa: E402

NBYTES = 1_378_176  # the benchmark model's fp32 gradient (344,544 parameters)


def _variants(n: int) -> dict[str, object]:
    half = n // 2
    rank = dist.get_rank()

    def a2a_ag() -> None:
        send = torch.zeros(n, dtype=torch.uint8)
        recv = torch.empty(n, dtype=torch.uint8)
        dist.all_to_all_single(recv, send, [half, n - half], [half, n - half])
        out = torch.empty(2 * half, dtype=torch.uint8)
        dist.all_gather_into_tensor(out, torch.zeros(half, dtype=torch.uint8))

    def rs_ag() -> None:
        x = torch.zeros(n // 4, dtype=torch.float32)
        out = torch.empty(n // 8, dtype=torch.float32)
        dist.reduce_scatter_tensor(out, x)
        full = torch.empty(n // 4, dtype=torch.float32)
        dist.all_gather_into_tensor(full, out)

    def p2p_ag() -> None:
        send = torch.zeros(half, dtype=torch.uint8)
        recv = torch.empty(half, dtype=torch.uint8)
        ops = [dist.P2POp(dist.isend, send, 1 - rank), dist.P2POp(dist.irecv, recv, 1 - rank)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        out = torch.empty(2 * half, dtype=torch.uint8)
        dist.all_gather_into_tensor(out, torch.zeros(half, dtype=torch.uint8))

    def allreduce() -> None:
        dist.all_reduce(torch.zeros(n // 4, dtype=torch.float32))

    def allgather_whole() -> None:
        out = torch.empty(2 * n, dtype=torch.uint8)
        dist.all_gather_into_tensor(out, torch.zeros(n, dtype=torch.uint8))

    def chunked(k: int) -> object:
        def run() -> None:  # the sharded uplink + downlink, each split into k async collectives in flight at once
            works = []
            c = half // k
            for _ in range(k):
                send = torch.zeros(2 * c, dtype=torch.uint8)
                recv = torch.empty(2 * c, dtype=torch.uint8)
                works.append(dist.all_to_all_single(recv, send, [c, c], [c, c], async_op=True))
            for w in works:
                w.wait()
            works = []
            for _ in range(k):
                out = torch.empty(2 * c, dtype=torch.uint8)
                works.append(dist.all_gather_into_tensor(out, torch.zeros(c, dtype=torch.uint8), async_op=True))
            for w in works:
                w.wait()

        return run

    return {"all_reduce": allreduce, "all_to_all + all_gather, 4 chunks": chunked(4),
            "all_to_all + all_gather, 16 chunks": chunked(16), "all_to_all + all_gather": a2a_ag, "reduce_scatter + all_gather": rs_ag,
            "isend/irecv + all_gather": p2p_ag, "all_gather (whole)": allgather_whole}


def worker(cfg: dict) -> None:
    dist.init_process_group("gloo", init_method=cfg["init"], rank=cfg["rank"], world_size=2)
    out = {}
    for name, fn in _variants(cfg["nbytes"]).items():
        times = []
        try:
            for i in range(7):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            t = torch.tensor([statistics.median(times)], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out[name] = float(t)
        except RuntimeError as e:  # a collective gloo does not implement
            out[name] = f"unsupported: {str(e).splitlines()[0][:120]}"
    if cfg["rank"] == 0:
        Path(cfg["result"]).write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="none,334,33.4", help="Mbit/s per direction; 'none' = unlimited")
    p.add_argument("--out", default=str(C.RESULTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return
    reason = netns_unavailable()
    if reason:
        raise SystemExit(f"needs network namespaces: {reason}")
    import subprocess

    link = Link()
    rows = []
    try:
        link.create()
        for rate in args.rates.split(","):
            mbit = None if rate == "none" else float(rate)
            link.shape(mbit)
            with tempfile.TemporaryDirectory() as tmp:
                port = C.free_port()
                result = Path(tmp) / "r.json"
                procs = []
                for rank in range(2):
                    cfg = {"init": f"tcp://{ADDR0}:{port}", "rank": rank, "nbytes": NBYTES, "result": str(result)}
                    (Path(tmp) / f"c{rank}.json").write_text(json.dumps(cfg))
                    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=link.dev[rank])
                    cmd = ["ip", "netns", "exec", link.ns[rank], sys.executable, __file__, "--worker",
                           str(Path(tmp) / f"c{rank}.json")]
                    procs.append(subprocess.Popen(cmd, env=env))
                for pr in procs:
                    pr.wait(timeout=600)
                res = json.loads(result.read_text())
            for name, t in res.items():
                rows.append({"mbit": mbit, "collective": name, "seconds": t})
                shown = f"{t * 1e3:8.1f} ms" if isinstance(t, float) else t
                print(f"{rate:>6} Mbit/s  {name:<30} {shown}", flush=True)
    finally:
        link.destroy()
    C.write_json(Path(args.out) / "collectives.json", {"nbytes": NBYTES, "runs": rows,
                                                         "environment": C.environment()})


if __name__ == "__main__":
    main()
