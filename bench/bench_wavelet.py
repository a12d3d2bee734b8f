"""Time the WLF loss (forward + backward) against F.mse_loss on an SD3 4K latent; prints JSON lines."""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from errors import HelpFormatter, exit_on_usage_error
from wavelet import WaveletLoss, haar_dwt2d


def explicit_wlf(pred, target, band_weights=(1.0, 1.0, 1.0, 1.0)):
    """The textbook form: materialise every sub-band with haar_dwt2d and let autograd do the rest (one level)."""
    ll, (lh, hl, hh) = haar_dwt2d(pred - target)
    return sum(w * b.square().sum() for w, b in zip(band_weights, (ll, lh, hl, hh))) / pred.numel()


class _CountCalls(TorchDispatchMode):
    """Counts the ATen calls that do work (views and no-op casts excluded): on a GPU, about one kernel each."""

    FREE = {"view", "unsqueeze", "expand", "select", "slice", "unflatten", "unbind", "reshape", "_unsafe_view",
            "as_strided", "alias", "detach", "t", "transpose", "permute", "squeeze", "promote_types", "empty_like",
            "new_empty", "empty"}

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.calls += name not in self.FREE and not (name in ("to", "_to_copy") and out is args[0])
        return out


def aten_calls(loss_fn, pred, target):
    """ATen calls of one loss forward + backward."""
    pred.grad = None
    with _CountCalls() as counter:
        loss_fn(pred, target).backward()
    return counter.calls


def fwd_bwd_ms(loss_fn, pred, target, clock):
    """Time of one loss forward + backward in milliseconds on `clock` (synchronised on CUDA), and the process's
    minor page faults meanwhile (fresh host buffers the allocator had handed back to the kernel)."""
    pred.grad = None
    if pred.is_cuda:
        torch.cuda.synchronize()
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, clock()
    loss_fn(pred, target).backward()
    if pred.is_cuda:
        torch.cuda.synchronize()
    return (clock() - start) * 1e3, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main(args):
    # Setup data:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = tuple(int(s) for s in args.shape.split(","))
    pred = torch.randn(shape, device=device, requires_grad=True)
    target = torch.randn(shape, device=device)
    weighting = torch.rand(shape[0], 1, 1, 1, device=device)

    # Cases, each timed against F.mse_loss in the same loop:
    cases = {
        "wlf_L1_w1111": WaveletLoss(1),
        "wlf_L1_w1222": WaveletLoss(1, (1, 2, 2, 2)),
        "wlf_L1_w1222_sd3_weighting": lambda p, t: WaveletLoss(1, (1, 2, 2, 2))(p, t, weighting),
        "wlf_L2_w1222": WaveletLoss(2, (1, 2, 2, 2)),
        "wlf_L3_w1222": WaveletLoss(3, (1, 2, 2, 2)),
        "wlf_L1_w0.5,1,2,3": WaveletLoss(1, (0.5, 1, 2, 3)),
        "wlf_L2_w0.5,1,2,3": WaveletLoss(2, (0.5, 1, 2, 3)),
        "explicit_autograd_L1_w1222": lambda p, t: explicit_wlf(p, t, (1, 2, 2, 2)),
    }
    # On a shared CPU box, one thread timed on its own CPU clock is robust to the other tenants' load.
    single_cpu = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if single_cpu else time.perf_counter
    times, faults = {name: [] for name in ["mse", *cases]}, {name: [] for name in ["mse", *cases]}
    for i in range(args.warmup + args.repeats):
        for name, fn in [("mse", F.mse_loss), *cases.items()]:
            ms, minor_faults = fwd_bwd_ms(fn, pred, target, clock)
            if i >= args.warmup:
                times[name].append(ms)
                faults[name].append(minor_faults)

    # Report: the ratio is the median over repeats of (case time / mse time of the same repeat).
    mse_ms, mse_calls = statistics.median(times["mse"]), aten_calls(F.mse_loss, pred, target)
    for name in cases:
        ratios = [c / m for c, m in zip(times[name], times["mse"])]
        print(json.dumps({
            "bench": "wavelet_loss_fwd_bwd", "case": name, "shape": list(shape), "device": str(device),
            "threads": torch.get_num_threads(), "clock": clock.__name__, "repeats": args.repeats,
            "mse_ms": round(mse_ms, 3), "case_ms": round(statistics.median(times[name]), 3), "ratio_vs_mse": round(statistics.median(ratios), 3),
            "aten_calls": aten_calls(cases[name], pred, target), "mse_aten_calls": mse_calls,
            "minor_faults": statistics.median(faults[name]), "mse_minor_faults": statistics.median(faults["mse"]),
        }))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--shape", default="4,16,256,256", help="latent B,C,H,W (SD3 at 4096^2 with the F=16 VAE)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    exit_on_usage_error("python -m bench.bench_wavelet", main, parse_args())
