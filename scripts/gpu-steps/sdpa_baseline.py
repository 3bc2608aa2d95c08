"""Dense causal attention baseline for the HSA comparison (issue 5): PyTorch SDPA on the GPU, the
prefill shapes of the 370M model's HSA layers (16 query heads, 1 kv head, head dim 64, bf16).
Usage: python3 sdpa_baseline.py 16384,65536,1048576"""
import sys

import torch
import torch.nn.functional as F


def median_ms(fn, reps):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "16384,65536").split(",")]
    torch.manual_seed(0)
    for L in lengths:
        q = torch.randn(1, 16, L, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 1, L, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 1, L, 64, device="cuda", dtype=torch.bfloat16)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        ms = median_ms(fn, 3 if L > 262144 else 10)
        flops = 4.0 * 16 * 64 * L * L / 2  # causal half of QK^T and PV
        print(f"sdpa dense causal L={L:8d}: {ms:9.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)",
              flush=True)


if __name__ == "__main__":
    main()
