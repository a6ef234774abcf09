"""Throughput of the conditional flow: samples/s of one training step without energy.

A step = sample fine ~ q(.|s) with log q (reparameterised), loss = mean(log q + sum(fine^2)/2 as a stand-in
for the energy), backward, optimizer step. Alanine-dipeptide sizes: n_fine = 58 (14 circular), n_cg = 2
periodic. Usage:
    python benchmarks/flow_throughput.py [--threads 1] [--zuko] [--quick]
Prints a markdown table (configuration, dtype, batch, samples/s).
"""

from __future__ import annotations

import argparse
import time

import torch

from openmm_cgflow.flow import ConditionalFlow

N_FINE, N_CIRC, N_CG = 58, 14, 2


def _circular():
    c = torch.zeros(N_FINE, dtype=torch.bool)
    c[torch.randperm(N_FINE, generator=torch.Generator().manual_seed(0))[:N_CIRC]] = True
    return c


def bench_ours(n_layers, hidden, dtype, batch, seconds):
    flow = ConditionalFlow(N_FINE, _circular(), N_CG, [True, True], n_layers=n_layers, hidden=hidden, dtype=dtype)
    with torch.no_grad():  # non-identity weights so the spline work is representative
        for layer in flow.layers:
            last = layer.conditioner.net[-1]
            last.weight.normal_(0.0, 0.01)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)

    def step():
        s = (torch.rand(batch, N_CG, generator=g, dtype=dtype) * 2 - 1) * torch.pi
        fine, log_q = flow.sample(s, generator=g)
        loss = (log_q + 0.5 * (fine**2).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _time(step, batch, seconds), sum(p.numel() for p in flow.parameters())


def bench_zuko(n_layers, hidden, dtype, batch, seconds):
    import zuko

    flow = zuko.flows.NCSF(N_FINE, 4, transforms=n_layers, hidden_features=hidden, passes=2).to(dtype)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)

    def step():
        s = (torch.rand(batch, N_CG, dtype=dtype) * 2 - 1) * torch.pi
        ctx = torch.cat([s.cos(), s.sin()], 1)
        fine, log_q = flow(ctx).rsample_and_log_prob()
        loss = (log_q + 0.5 * (fine**2).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return _time(step, batch, seconds), sum(p.numel() for p in flow.parameters())


def _time(step, batch, seconds):
    step()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += batch
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--zuko", action="store_true", help="also time zuko's NCSF of the same size")
    ap.add_argument("--quick", action="store_true", help="one configuration, short timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    configs = [(8, (192, 192)), (6, (128, 128)), (12, (256, 256))]
    dtypes = [torch.float32, torch.float64]
    batches = [256, 1024]
    if args.quick:
        configs, dtypes, batches, args.seconds = configs[:1], dtypes[:1], batches[1:], 2.0
    print(f"threads = {args.threads}")
    print("| flow | layers x hidden | params | dtype | batch | samples/s (sample+log q+backward+Adam) |")
    print("|---|---|---|---|---|---|")
    for n_layers, hidden in configs:
        for dtype in dtypes:
            for batch in batches:
                rate, n_par = bench_ours(n_layers, hidden, dtype, batch, args.seconds)
                print(f"| ConditionalFlow | {n_layers} x {list(hidden)} | {n_par:,} | {str(dtype)[6:]} | {batch} | {rate:,.0f} |", flush=True)
    if args.zuko:
        for dtype in dtypes[:1]:
            for batch in batches[-1:]:
                rate, n_par = bench_zuko(12, (256, 256), dtype, batch, args.seconds)
                print(f"| zuko NCSF (passes=2) | 12 x [256, 256] | {n_par:,} | {str(dtype)[6:]} | {batch} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
