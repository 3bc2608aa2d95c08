"""Trainer of ramba-tiny: a small byte-level RAMba on synthetic long-context tasks (tasks.py).

Runs on one GPU (bf16 autocast; SSM scan, residual stream, retrieval scores and stick-breaking
stay in fp32 inside ramba_ref.py) or, for smoke tests, on the CPU. Training is time-boxed
(`--minutes`) and resumable: a checkpoint is a folder of safetensors shards (each <= 15 MiB:
fp32 weights, AdamW moments in bf16) plus meta.json.

  # fresh run, 8 minutes, checkpoint to OUT/ckpt
  python3 model/reference/train.py --out OUT/ckpt --minutes 8
  # continue
  python3 model/reference/train.py --resume .train/ckpt --out OUT/ckpt --minutes 8
  # evaluation only (held-out passkey at several lengths, greedy-decode check)
  python3 model/reference/train.py --resume .train/ckpt --eval_only --eval_lengths 4096,16384
  # export a model directory for the C++ engine
  python3 model/reference/train.py --resume .train/ckpt --export models/ramba-tiny

Loss: per sequence, the mean cross-entropy over its answer bytes (passkey key, recalled values),
averaged over sequences, plus `--other_weight` x the mean cross-entropy of all other bytes.
Held-out passkey accuracy: exact match of the whole answer " {key}." under teacher forcing with
argmax at every answer position, which is the same event as greedy decoding reproducing it
(`--greedy_check` verifies this with the incremental `step` path).
"""
import argparse
import json
import math
import os
import random
import sys
import threading
import time
import queue

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ramba_ref import RambaConfig, RambaForCausalLM  # noqa: E402
from safetensors_io import load_file, save_file  # noqa: E402
import tasks  # noqa: E402

SHARD_BYTES = 15 * 1024 * 1024


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def model_config(a):
    return RambaConfig(
        hidden_size=a.hidden, vocab_size=256, num_lower_layers=a.lower, num_upper_layers=a.upper,
        num_upper_groups=1, num_mamba_per_gca=a.mamba_per_gca, state_size=a.state,
        head_dim=a.mamba_head_dim, expand=2, n_groups=1, conv_kernel=4,
        mamba_chunk_size=a.mamba_chunk, chunk_size=64, chunk_topk=a.topk, retrieval_dim=a.rdim,
        encoder_layers=1, num_attention_heads=a.heads, num_key_value_heads=a.heads,
        num_kv_heads=a.kv_heads, singlehead_retrieval=False, enable_enc_cls=True,
        tie_word_embeddings=True)


def init_weights(model, seed):
    """Mamba-2 style initialisation on top of the reference's N(0, 0.02) matrices."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_res = len(model.backbone.layers)  # residual branches (roughly)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mixer.dt_bias"):
                dt = torch.exp(torch.rand(p.shape, generator=g) * (math.log(0.1) - math.log(1e-3))
                               + math.log(1e-3)).clamp(min=1e-4)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name.endswith("mixer.A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 15 + 1))
            elif name.endswith("mixer.conv1d.weight"):
                bound = 1.0 / math.sqrt(cfg.conv_kernel)
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif name.endswith(("mixer.out_proj.weight", "o_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 / math.sqrt(2 * n_res))
            elif p.dim() >= 2 or name.endswith("cls_emb"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def param_groups(model, wd):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.endswith("cls_emb") else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------
# Checkpoints: safetensors shards <= 15 MiB + meta.json
# --------------------------------------------------------------------------------------------

def save_checkpoint(path, model, opt, meta):
    os.makedirs(path, exist_ok=True)
    tensors = {}
    names = {p: n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        tensors["p." + n] = p.detach().float().cpu().contiguous()
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                tensors["m." + names[p]] = st["exp_avg"].to(torch.bfloat16).cpu().contiguous()
                tensors["v." + names[p]] = st["exp_avg_sq"].to(torch.bfloat16).cpu().contiguous()
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nb = tensors[k].numel() * tensors[k].element_size()
        if cur and size + nb > SHARD_BYTES - 65536:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += nb
    if cur:
        shards.append(cur)
    for f in os.listdir(path):
        if f.startswith("ckpt-") and f.endswith(".safetensors"):
            os.remove(os.path.join(path, f))
    files = []
    for i, sh in enumerate(shards):
        fn = f"ckpt-{i}.safetensors"
        save_file(sh, os.path.join(path, fn), metadata={"format": "pt"})
        files.append(fn)
    meta = dict(meta, files=files)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return files


def load_checkpoint(path):
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    tensors = {}
    for fn in meta["files"]:
        tensors.update(load_file(os.path.join(path, fn)))
    return meta, tensors


def restore(model, opt, tensors, step):
    sd = {k[2:]: v for k, v in tensors.items() if k.startswith("p.")}
    model.load_state_dict(sd, strict=True)
    if opt is None:
        return
    for n, p in model.named_parameters():
        if "m." + n in tensors:
            opt.state[p] = {"step": torch.tensor(float(step)),
                            "exp_avg": tensors["m." + n].to(p.device, torch.float32),
                            "exp_avg_sq": tensors["v." + n].to(p.device, torch.float32)}


def export(model, out_dir, dtype):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(model.config.to_json_string())
    sd = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        f.write('{"type": "byte"}\n')


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def parse_curriculum(s):
    """"0:1024,400:2048,1200:4096" -> [(0, 1024), (400, 2048), (1200, 4096)]."""
    out = []
    for part in s.split(","):
        a, b = part.split(":")
        out.append((int(a), int(b)))
    return sorted(out)


def length_at(curr, step):
    L = curr[0][1]
    for s, l in curr:
        if step >= s:
            L = l
    return L


def make_batch(seed, step, curr, batch_tokens):
    """Batch of `step` (deterministic in seed and step, so resuming replays nothing)."""
    L = length_at(curr, step)
    B = max(1, batch_tokens // L)
    rng = random.Random(seed * 1_000_003 + step)
    toks, mask, task = tasks.batch(rng, B, L)
    return torch.from_numpy(toks.astype(np.int64)), torch.from_numpy(mask), torch.from_numpy(task)


class Prefetcher:
    def __init__(self, seed, start, curr, batch_tokens, depth=4):
        self.q = queue.Queue(maxsize=depth)
        self.stop = False

        def work():
            s = start
            while not self.stop:
                try:
                    item = (s, make_batch(seed, s, curr, batch_tokens))
                except Exception as e:  # hand the error to the training loop
                    self.q.put((s, e))
                    return
                self.q.put(item)
                s += 1
        self.t = threading.Thread(target=work, daemon=True)
        self.t.start()

    def get(self):
        s, item = self.q.get()
        if isinstance(item, Exception):
            raise item
        return s, item


# --------------------------------------------------------------------------------------------
# Loss and evaluation
# --------------------------------------------------------------------------------------------

def losses(logits, y, mask, task, other_weight):
    B, L, V = logits.shape
    ce = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1), reduction="none").view(B, L)
    ans = mask.float()
    oth = 1.0 - ans
    n_ans = ans.sum(1)
    per_seq = (ce * ans).sum(1) / n_ans.clamp(min=1)
    has = (n_ans > 0).float()
    loss_ans = (per_seq * has).sum() / has.sum().clamp(min=1)
    loss_oth = (ce * oth).sum() / oth.sum().clamp(min=1)
    loss = loss_ans + other_weight * loss_oth
    with torch.no_grad():
        correct = (logits.argmax(-1) == y).float()
        stats = {"loss": loss.detach(), "ans": loss_ans.detach(), "other": loss_oth.detach()}
        for t, name in ((0, "pk"), (1, "kv")):
            sel = (task == t).float()[:, None] * ans
            stats[name + "_ce"] = (ce.detach() * sel).sum() / sel.sum().clamp(min=1)
            stats[name + "_acc"] = (correct * sel).sum() / sel.sum().clamp(min=1)
    return loss, stats


def passkey_eval_set(n, length, seed=777, template=None):
    """Held-out passkey prompts (seed disjoint from training steps' seeds): key formats in turn,
    stratified uniform depths, random filler kinds."""
    rng = random.Random(seed * 7919 + length)
    items = []
    for i in range(n):
        fmt = tasks.KEY_FORMATS[i % len(tasks.KEY_FORMATS)]
        depth = (i + rng.random()) / n
        seq, mask, info = tasks.passkey_sample(rng, length, template or tasks.CLASSIC_TEMPLATE,
                                               key_fmt=fmt, depth=depth)
        info["fmt"] = fmt
        items.append((seq, info))
    return items


@torch.no_grad()
def eval_passkey(model, device, amp, n, length, batch, seed=777, hsa_mode="gather", template=None):
    model.eval()
    items = passkey_eval_set(n, length, seed, template)
    ok = []
    for b0 in range(0, n, batch):
        chunk = items[b0:b0 + batch]
        x = torch.tensor([list(s[:-1]) for s, _ in chunk], dtype=torch.long, device=device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x, hsa_mode=hsa_mode)
        pred = logits.argmax(-1).cpu()
        for r, (s, info) in enumerate(chunk):
            a0, a1 = info["answer_span"]
            want = torch.tensor(list(s[a0:a1]))
            ok.append(bool((pred[r, a0 - 1:a1 - 1] == want).all()))
    model.train()
    by_fmt, by_depth = {}, {}
    for okk, (_, info) in zip(ok, items):
        by_fmt.setdefault(info["fmt"], []).append(okk)
        by_depth.setdefault(min(4, int(info["depth"] * 5)), []).append(okk)
    acc = sum(ok) / len(ok)
    return {"length": length, "n": n, "acc": acc,
            "by_fmt": {k: round(sum(v) / len(v), 3) for k, v in by_fmt.items()},
            "by_depth": {f"{k / 5:.1f}-{(k + 1) / 5:.1f}": round(sum(v) / len(v), 3)
                         for k, v in sorted(by_depth.items())}}


@torch.no_grad()
def eval_kv(model, device, amp, n, length, batch, seed=778):
    model.eval()
    rng = random.Random(seed * 7919 + length)
    total = correct = 0
    for b0 in range(0, n, batch):
        seqs = []
        for _ in range(min(batch, n - b0)):
            seqs.append(tasks.kv_sample(rng, length))
        x = torch.tensor([list(s[:-1]) for s, _, _ in seqs], dtype=torch.long, device=device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x).argmax(-1).cpu().numpy()
        for r, (s, m, _) in enumerate(seqs):
            tgt = np.frombuffer(s[1:], np.uint8)
            hit = pred[r] == tgt
            # answers are maximal runs of the mask
            i = 0
            while i < length:
                if m[i]:
                    j = i
                    while j < length and m[j]:
                        j += 1
                    total += 1
                    correct += int(hit[i:j].all())
                    i = j
                else:
                    i += 1
    model.train()
    return {"length": length, "queries": total, "acc": correct / max(1, total)}


@torch.no_grad()
def greedy_check(model, device, amp, n, length, seed=779):
    """Greedy decoding through the incremental path (prefill with `step`, then one token at a
    time) on held-out passkey prompts; returns the exact-match count and the texts."""
    model.eval()
    items = passkey_eval_set(n, length, seed)
    out = []
    for seq, info in items:
        a0, a1 = info["answer_span"]
        st = model.init_state(1)
        prompt = torch.tensor([list(seq[:a0])], dtype=torch.long, device=device)
        gen = []
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model.step(st, prompt)
            for _ in range(a1 - a0):
                t = int(logits[0, -1].argmax())
                gen.append(t)
                logits = model.step(st, torch.tensor([[t]], device=device))
        out.append((bytes(gen) == seq[a0:a1], seq[a0:a1].decode("latin-1"), bytes(gen).decode("latin-1")))
    model.train()
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def lr_at(a, step):
    lr = a.lr * min(1.0, (step + 1) / max(1, a.warmup))
    if a.decay_start >= 0 and step >= a.decay_start:
        frac = min(1.0, (step - a.decay_start) / max(1, a.decay_end - a.decay_start))
        lr *= 1.0 - frac * (1.0 - a.min_lr_frac)
    return lr


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="checkpoint folder to write at the end")
    ap.add_argument("--resume", default=None, help="checkpoint folder to start from")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time of this run")
    ap.add_argument("--max_steps", type=int, default=10**9)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", type=int, default=-1, help="bf16 autocast (default: on for cuda)")
    ap.add_argument("--batch_tokens", type=int, default=65536)
    ap.add_argument("--curriculum", default="0:1024,400:2048,1200:4096", help="step:length,...")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--decay_start", type=int, default=-1, help="linear decay from this step (-1: none)")
    ap.add_argument("--decay_end", type=int, default=-1)
    ap.add_argument("--min_lr_frac", type=float, default=0.1)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--other_weight", type=float, default=0.1)
    ap.add_argument("--log_every", type=int, default=25)
    ap.add_argument("--eval_every", type=int, default=300)
    ap.add_argument("--eval_n", type=int, default=128)
    ap.add_argument("--eval_len", type=int, default=4096)
    ap.add_argument("--eval_batch", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="torch.compile the Mamba mixers")
    # model
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--lower", type=int, default=4)
    ap.add_argument("--upper", type=int, default=4)
    ap.add_argument("--mamba_per_gca", type=int, default=2)
    ap.add_argument("--state", type=int, default=64)
    ap.add_argument("--mamba_head_dim", type=int, default=64)
    ap.add_argument("--mamba_chunk", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=1)
    ap.add_argument("--rdim", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    # modes
    ap.add_argument("--eval_only", action="store_true")
    ap.add_argument("--eval_lengths", default="4096")
    ap.add_argument("--eval_templates", action="store_true", help="also evaluate every needle template")
    ap.add_argument("--greedy_check", type=int, default=0, help="greedy-decode N prompts via step()")
    ap.add_argument("--export", default=None, help="write a model folder (config, safetensors, tokenizer)")
    ap.add_argument("--export_dtype", default="f32", choices=("f32", "bf16"))
    ap.add_argument("--bench", type=int, default=0, help="time N steps at the final length and exit")
    a = ap.parse_args()

    device = torch.device(a.device)
    amp = (device.type == "cuda") if a.amp < 0 else bool(a.amp)
    meta = {"step": 0, "tokens": 0, "train_seconds": 0.0, "runs": [], "evals": []}
    tensors = None
    if a.resume:
        meta, tensors = load_checkpoint(a.resume)
        cfg = RambaConfig.from_dict(meta["config"])
        log(f"resuming from {a.resume} at step {meta['step']}")
    else:
        cfg = model_config(a)
    torch.manual_seed(a.seed)
    model = RambaForCausalLM(cfg)
    init_weights(model, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params} parameters ({n_params / 1e6:.2f}M); config {json.dumps(cfg.to_dict())}")
    if tensors is not None:
        restore(model, None, tensors, meta["step"])

    if a.export:
        export(model, a.export, torch.float32 if a.export_dtype == "f32" else torch.bfloat16)
        log(f"exported {a.export} ({a.export_dtype})")
        return

    model.to(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    if a.eval_only:
        res = []
        for L in [int(x) for x in a.eval_lengths.split(",")]:
            t0 = time.time()
            bs = max(1, min(a.eval_batch, 65536 // L))
            r = eval_passkey(model, device, amp, a.eval_n, L, bs)
            r["seconds"] = round(time.time() - t0, 1)
            log("passkey", json.dumps(r))
            res.append(r)
            if a.eval_templates and L == 4096:
                for ti, tpl in enumerate(tasks.PASSKEY_TEMPLATES):
                    r = eval_passkey(model, device, amp, a.eval_n // 2, L, bs, template=tpl)
                    log(f"passkey template {ti}", json.dumps({k: r[k] for k in ("length", "n", "acc")}))
                r = eval_kv(model, device, amp, 32, L, bs)
                log("kv", json.dumps(r))
        if a.greedy_check:
            for L in [int(x) for x in a.eval_lengths.split(",")][:2]:
                g = greedy_check(model, device, amp, a.greedy_check, L)
                log(f"greedy decode (step path) at {L}: {sum(x[0] for x in g)}/{len(g)} exact;",
                    "; ".join(f"want {w!r} got {o!r}" for _, w, o in g[:6]))
        if a.out:
            os.makedirs(a.out, exist_ok=True)
            with open(os.path.join(a.out, "eval.json"), "w") as f:
                json.dump(res, f, indent=1)
        return

    if a.compile:
        from ramba_ref import Mamba2Block
        for m in model.modules():
            if isinstance(m, Mamba2Block):
                m.mixer.compile()
    opt = torch.optim.AdamW(param_groups(model, a.wd), lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    if tensors is not None:
        restore(model, opt, tensors, meta["step"])
        del tensors
    curr = parse_curriculum(a.curriculum)
    step = meta["step"]

    if a.bench:
        L = curr[-1][1]
        for i in range(a.bench + 3):
            if i == 3:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.time()
            x, mask, task = make_batch(a.seed, 10**6 + i, [(0, L)], a.batch_tokens)
            x, mask, task = x.to(device), mask.to(device), task.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(x[:, :-1], hsa_mode="dense")
            loss, _ = losses(logits, x[:, 1:], mask, task, a.other_weight)
            loss.backward()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.time() - t0) / a.bench
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
        log(f"bench L={L} batch_tokens={a.batch_tokens}: {dt * 1000:.0f} ms/step, "
            f"{a.batch_tokens / dt / 1e3:.0f}k tok/s, peak mem {mem:.1f} GiB")
        return

    run = {"start_step": step, "args": vars(a), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    pf = Prefetcher(a.seed, step, curr, a.batch_tokens)
    t_start = time.time()
    t_log, tok_log = time.time(), 0
    acc_stats = {}
    model.train()
    eval_seconds = 0.0
    while True:
        elapsed = time.time() - t_start - eval_seconds
        if elapsed > a.minutes * 60 or step >= a.max_steps:
            break
        s, (x, mask, task) = pf.get()
        assert s == step
        x = x.to(device, non_blocking=True)
        mask, task = mask.to(device), task.to(device)
        lr = lr_at(a, step)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x[:, :-1], hsa_mode="dense")
        loss, stats = losses(logits, x[:, 1:], mask, task, a.other_weight)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats["gnorm"] = gn.detach()
        for k, v in stats.items():
            acc_stats.setdefault(k, []).append(v)
        step += 1
        ntok = x.shape[0] * (x.shape[1] - 1)
        meta["tokens"] += ntok
        tok_log += ntok
        if step % a.log_every == 0:
            vals = {k: torch.stack(v).float().mean().item() for k, v in acc_stats.items()}
            acc_stats = {}
            now = time.time()
            msg = " ".join(f"{k} {v:.4f}" for k, v in vals.items())
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0
            log(f"step {step} L {x.shape[1] - 1} lr {lr:.2e} {msg} | {tok_log / (now - t_log) / 1e3:.0f}k tok/s "
                f"mem {mem:.1f}G elapsed {elapsed / 60:.1f}m")
            t_log, tok_log = now, 0
        if a.eval_every > 0 and step % a.eval_every == 0:
            t0 = time.time()
            r = eval_passkey(model, device, amp, a.eval_n, a.eval_len, a.eval_batch)
            r["step"] = step
            meta["evals"].append(r)
            log("eval passkey", json.dumps(r))
            eval_seconds += time.time() - t0
            t_log = time.time()
    pf.stop = True
    train_s = time.time() - t_start - eval_seconds
    meta["train_seconds"] += train_s
    meta["step"] = step
    # final evaluation
    t0 = time.time()
    r = eval_passkey(model, device, amp, a.eval_n, a.eval_len, a.eval_batch)
    r["step"] = step
    meta["evals"].append(r)
    log("final eval passkey", json.dumps(r))
    rk = eval_kv(model, device, amp, 16, a.eval_len, a.eval_batch)
    rk["step"] = step
    log("final eval kv", json.dumps(rk))
    run.update(end_step=step, train_seconds=round(train_s, 1), eval_seconds=round(time.time() - t0 + eval_seconds, 1),
               final_passkey=r["acc"], final_kv=rk["acc"])
    meta["runs"].append(run)
    meta["config"] = cfg.to_dict()
    if a.out:
        files = save_checkpoint(a.out, model, opt, meta)
        log(f"checkpoint step {step} -> {a.out} ({len(files)} shards)")


if __name__ == "__main__":
    main()
