"""Times the reference HSA Triton forward kernel (RamstorageAI/long-context-modeling,
ops/hsa_triton.py `_attn_fwd`) on the prefill shapes of bench-ops, so the two are compared side by
side on one GPU: 16 query heads over 1 kv head, head dim 64, chunks of 64 keys, top-8, bf16 Q/K/V,
float32 weights. The reference file is not part of this repository: copy it to a directory and
name it in RAMBA_REFERENCE_OPS (docs/benchmarks.md says how). Only the forward kernel is timed:
the launch below mirrors the reference's `_attention.forward` without its host-side NaN checks.

Selections, as in bench-ops --selection:
  token: every token its own 8 chunks, random among those wholly before it (the model's case:
         one retrieval per token, so Q_X = 1 in the reference);
  neighbours: token, then each slot keeps the previous token's chunk with probability 0.8
         (neighbouring tokens of a trained model share picks; Q_X = 1);
  block: the 64 tokens of a query block share one selection (Q_X = 64);
  file:NAME: a model's own selections, one row per token, from the files listed in
         RAMBA_SELECTION_FILES (comma-separated; written by selection-reuse --dump), on the
         lengths they cover (Q_X = 1).
Usage: RAMBA_REFERENCE_OPS=DIR python3 hsa_reference.py 16384,65536,1048576"""
import os
import struct
import sys
import types

import torch

from sdpa_baseline import median_ms  # this folder's: the same timing for both baselines


def import_reference():
    path = os.environ.get("RAMBA_REFERENCE_OPS", "")
    if not path or not os.path.exists(os.path.join(path, "hsa_triton.py")):
        print("hsa_reference: RAMBA_REFERENCE_OPS does not hold hsa_triton.py; skipped")
        sys.exit(0)
    # The module imports pytest and einops for its tests only; stand-ins keep it importable.
    if "pytest" not in sys.modules:
        mark = types.SimpleNamespace(parametrize=lambda *a, **k: (lambda f: f))
        sys.modules["pytest"] = types.SimpleNamespace(mark=mark)
    try:
        import einops  # noqa: F401
    except ImportError:
        sys.modules["einops"] = types.SimpleNamespace(rearrange=None, repeat=None)
    sys.path.insert(0, path)
    import hsa_triton
    return hsa_triton


def selection(L, q_x, topk, chunk, device):
    """Random eligible chunks ((c + 1) * chunk <= first token of the block) and softmax weights;
    blocks with fewer than topk eligible chunks get weight 0 on the rest."""
    blocks = L // q_x
    first = torch.arange(blocks, device=device) * q_x
    eligible = (first // chunk).clamp(min=0)
    r = torch.rand(blocks, topk, device=device)
    idx = (r * eligible.clamp(min=1).unsqueeze(1)).floor().to(torch.int64)
    valid = torch.arange(topk, device=device).unsqueeze(0) < eligible.unsqueeze(1)
    scores = torch.rand(blocks, topk, device=device).masked_fill(~valid, float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return idx.view(1, blocks, 1, topk).contiguous(), w.view(1, blocks, 1, topk).contiguous()


def share_with_neighbours(idx, keep=0.8):
    """Each slot of each token keeps the previous token's chunk with probability `keep`: a slot's
    chunk is the one its run of kept slots started with (always eligible later on)."""
    rows, topk = idx.shape[1], idx.shape[3]
    flat = idx.view(rows, topk)
    kept = torch.rand(rows, topk, device=idx.device) < keep
    kept[0] = False
    ar = torch.arange(rows, device=idx.device).unsqueeze(1).expand(rows, topk)
    start = torch.where(kept, torch.zeros_like(ar), ar).cummax(dim=0).values
    return flat.gather(0, start).view(1, rows, 1, topk).contiguous()


def selections_from_file(path, L, topk, device):
    """The first L rows of a selections file (tools/selection_stats.h: "RSEL", uint32 version,
    int64 rows, int64 per_row, int32 indices); unused slots (-1) point at chunk 0 with weight 0."""
    with open(path, "rb") as f:
        data = f.read()
    magic, version, rows, per_row = struct.unpack_from("<4sIqq", data, 0)
    if magic != b"RSEL" or version != 1 or per_row != topk or rows < L:
        return None
    flat = torch.frombuffer(bytearray(data[24:24 + 4 * L * per_row]), dtype=torch.int32)
    idx = flat.view(L, topk).to(device=device, dtype=torch.int64)
    valid = idx >= 0
    scores = torch.rand(L, topk, device=device).masked_fill(~valid, float("-inf"))
    w = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    idx = idx.clamp(min=0)
    return idx.view(1, L, 1, topk).contiguous(), w.view(1, L, 1, topk).contiguous()


def main():
    ref = import_reference()
    lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "16384,65536").split(",")]
    torch.manual_seed(0)
    HQ, H, D, K, S = 16, 1, 64, 8, 64
    for L in lengths:
        q = torch.randn(1, L, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16)
        modes = [("token", 1), ("neighbours", 1), ("block", 64)]
        files = [f for f in os.environ.get("RAMBA_SELECTION_FILES", "").split(",") if f]
        modes += [("file:" + os.path.basename(f), 1, f) for f in files]
        for mode in modes:
            name, q_x = mode[0], mode[1]
            if len(mode) == 3:
                picked = selections_from_file(mode[2], L, K, "cuda")
                if picked is None:
                    print(f"hsa_reference: {mode[2]} does not cover L={L} with top-{K}")
                    continue
                idx, w = picked
            else:
                idx, w = selection(L, q_x, K, S, "cuda")
            if name == "neighbours":
                idx = share_with_neighbours(idx)
            block_m = min(q_x, 16)
            m = torch.empty((1, K, L, HQ), device="cuda", dtype=torch.float32)
            o = torch.empty_like(q)
            grid = (L // block_m, 1, H)

            def run():
                ref._attn_fwd[grid](
                    q, k, v, w, idx, 1.0 / D ** 0.5, 0.0, m, o,
                    q.stride(0), q.stride(1), q.stride(2), q.stride(3),
                    k.stride(0), k.stride(1), k.stride(2), k.stride(3),
                    v.stride(0), v.stride(1), v.stride(2), v.stride(3),
                    o.stride(0), o.stride(1), o.stride(2), o.stride(3),
                    w.stride(0), w.stride(1), w.stride(2), w.stride(3),
                    idx.stride(0), idx.stride(1), idx.stride(2), idx.stride(3),
                    m.stride(0), m.stride(1), m.stride(2), m.stride(3),
                    L, L, HQ // H, K, D, block_m, S, q_x)

            ms = median_ms(run, 3 if L > 262144 else 10)
            flops = 4.0 * L * HQ * K * S * D
            print(f"reference triton HSA forward L={L:8d} selection={name}: {ms:8.3f} ms "
                  f"({flops / ms / 1e9:.0f} TFLOP/s)", flush=True)
        del q, k, v


if __name__ == "__main__":
    main()
