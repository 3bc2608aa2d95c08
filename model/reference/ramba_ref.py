"""Trusted PyTorch reference of RAMba (Mamba-2 + Hierarchical Sparse Attention).

Implements /work/shared/RAMBA_SPEC.md (docs: the repository's shared spec) exactly, with the
checkpoint names of the authors' HF-style code, so that its state_dict loads their checkpoints
(after model/reference/convert_checkpoint.py) and our C++ engine's fixtures come from it.

Two entry points over the same layer math:
  * `RambaForCausalLM.forward(input_ids [N, L]) -> logits [N, L, V]`: full sequence, batched,
    differentiable and device-agnostic (training; Mamba in the chunked SSD form;
    `hsa_mode="dense"` computes HSA with matrix products instead of gathers, same result).
  * `state = model.init_state(N)`; `logits = model.step(state, input_ids [N, m])`: incremental,
    any segment length m >= 1, over an explicit `RambaState` (decode / segmented prefill).
    `step(..., mamba_mode="recurrent")` runs the Mamba-2 token recurrence instead of SSD.

Computation runs in the parameters' dtype (use `model.double()` for fixtures) except that SSM
states and stick-breaking weights are at least fp32. Under torch.autocast (bf16 training) the SSM
scan and the retrieval scores opt out of autocast and stay in >= fp32.
"""
import dataclasses
import json
import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RambaConfig:
    hidden_size: int = 64
    vocab_size: int = 128
    num_lower_layers: int = 2
    num_upper_layers: int = 2
    num_upper_groups: int = 1
    num_mamba_per_gca: int = 1
    # Mamba-2
    state_size: int = 16
    head_dim: int = 16
    num_heads: int = 0          # 0: expand * hidden_size / head_dim
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    mamba_chunk_size: int = 256
    use_conv_bias: bool = True
    use_bias: bool = False
    time_step_limit: tuple = (0.0, float("inf"))
    layer_norm_epsilon: float = 1e-5
    # chunk memory / HSA
    chunk_size: int = 64
    chunk_topk: int = 8
    retrieval_dim: int = 64
    encoder_layers: int = 1
    num_attention_heads: int = 4
    num_key_value_heads: int = 0  # 0: num_attention_heads
    num_kv_heads: int = 1
    singlehead_retrieval: bool = False
    enable_enc_cls: Optional[bool] = None  # None: encoder_layers > 0
    encoder_rms_norm_eps: float = 1e-6
    encoder_rope_theta: float = 10000.0
    hsa_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0
    pad_token_id: int = 0
    initializer_range: float = 0.02

    def __post_init__(self):
        if not self.num_heads:
            self.num_heads = self.expand * self.hidden_size // self.head_dim
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.enable_enc_cls is None:
            self.enable_enc_cls = self.encoder_layers > 0
        self.time_step_limit = tuple(float(x) for x in self.time_step_limit)
        self.validate()

    # derived sizes
    @property
    def d_inner(self):
        return self.expand * self.hidden_size

    @property
    def conv_dim(self):
        return self.d_inner + 2 * self.n_groups * self.state_size

    @property
    def attn_head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def retrieval_heads(self):
        return 1 if self.singlehead_retrieval else self.num_kv_heads

    @property
    def encoder_intermediate_size(self):
        return int(self.hidden_size * 8 / 3 // 64 * 64)

    @property
    def num_hsa_layers(self):
        return self.num_upper_layers // self.num_mamba_per_gca

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"RambaConfig: {msg}")
        need(self.num_upper_groups == 1, f"num_upper_groups={self.num_upper_groups} unsupported (only 1)")
        need(self.num_upper_layers % self.num_mamba_per_gca == 0,
             "num_upper_layers must be divisible by num_mamba_per_gca")
        need(self.d_inner % self.head_dim == 0, "head_dim must divide expand*hidden_size")
        need(self.num_heads * self.head_dim == self.d_inner, "num_heads*head_dim != d_inner")
        need(self.num_heads % self.n_groups == 0, "n_groups must divide num_heads")
        need(not self.use_bias, "use_bias=true unsupported")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads must divide hidden_size")
        need(self.num_attention_heads % self.num_kv_heads == 0, "num_kv_heads must divide num_attention_heads")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             "num_key_value_heads must divide num_attention_heads")
        need(self.retrieval_dim % self.retrieval_heads == 0, "retrieval_dim % retrieval heads != 0")
        need(not (self.enable_enc_cls and self.encoder_layers == 0), "enable_enc_cls needs encoder_layers > 0")
        if self.encoder_layers > 0:
            need(self.attn_head_dim % 2 == 0, "odd attention head dim (RoPE)")
            need(self.encoder_intermediate_size > 0, "hidden_size too small for the encoder MLP")

    # (de)serialisation, HF-style config.json keys
    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        if "d_model" in d and "hidden_size" not in d:
            d["hidden_size"] = d["d_model"]
        for key, bad in (("enable_softmax", True), ("enable_qk_norm", True), ("enable_lmk_norm", True),
                         ("enc_prenorm", True), ("mask_slide_window", True), ("enable_pos_decay", True),
                         ("enable_softmax1", True), ("insert_lmk", True), ("hsa_only", False)):
            if key in d and bool(d[key]) == bad:
                raise ValueError(f"config key {key}={d[key]} is not supported by the reference")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))  # Python's json accepts the literal Infinity

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["time_step_limit"] = list(self.time_step_limit)
        d["model_type"] = "ramba"
        return d

    def to_json_string(self):
        return json.dumps(self.to_dict(), indent=2) + "\n"  # writes Infinity for inf


# --------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------

def _at_least_f32(dtype):
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(t):
    """Disables autocast (mixed-precision training) for the ops that must run in >= fp32: the SSM
    scan and the retrieval scores. Without autocast this changes nothing."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def rms_norm(x, weight, eps):
    dt = x.dtype
    xf = x.to(_at_least_f32(dt))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dt)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def segsum(x):
    """x [..., T] -> [..., T, T] with out[i, j] = sum_{k=j+1..i} x_k (i >= j), -inf above."""
    T = x.shape[-1]
    xe = x.unsqueeze(-1).expand(*x.shape, T)  # [..., i, j] = x_i
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    xe = xe.masked_fill(~lower, 0)
    out = torch.cumsum(xe, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_chunked(x, dt, A, B, C, block, init_state=None):
    """Chunked SSD form of the Mamba-2 scan (zero D term).

    x [b, l, h, p], dt [b, l, h] (after softplus), A [h] (negative), B, C [b, l, h, n] (already
    expanded from groups to heads), init_state [b, h, p, n] or None.
    Returns y [b, l, h, p] and the final state [b, h, p, n]. Same math as `ssm_recurrent`.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    pad = (-l) % block
    if pad:  # dt = 0 on padding: decay 1 and no input, so the final state is unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    c = x.shape[1] // block
    X = (x * dt.unsqueeze(-1)).reshape(b, c, block, h, p)
    Adt = (A * dt).reshape(b, c, block, h).permute(0, 3, 1, 2)  # [b, h, c, Q]
    B = B.reshape(b, c, block, h, n)
    C = C.reshape(b, c, block, h, n)
    A_cum = torch.cumsum(Adt, dim=-1)
    # 1. within-block outputs
    Lmat = torch.exp(segsum(Adt))  # [b, h, c, Q, Q]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lmat, X)
    # 2. state contributed by each block
    decay_states = torch.exp(A_cum[..., -1:] - A_cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    # 3. inter-block recurrence
    if init_state is None:
        init_state = torch.zeros(b, h, p, n, dtype=states.dtype, device=states.device)
    states = torch.cat([init_state.unsqueeze(1).to(states.dtype), states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. state -> output
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(A_cum))
    y = (y_diag + y_off).reshape(b, c * block, h, p)[:, :l]
    return y, final_state


def ssm_recurrent(x, dt, A, B, C, init_state=None):
    """Token-by-token Mamba-2 recurrence: S <- exp(dt A) S + dt x (outer) B; y = S C."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    S = init_state if init_state is not None else torch.zeros(b, h, p, n, dtype=x.dtype, device=x.device)
    ys = []
    for t in range(l):
        dA = torch.exp(dt[:, t] * A)  # [b, h]
        S = dA[..., None, None] * S + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * B[:, t].unsqueeze(-2)
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    return torch.stack(ys, dim=1), S


# --------------------------------------------------------------------------------------------
# Mamba-2 block
# --------------------------------------------------------------------------------------------

class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: RambaConfig):
        super().__init__()
        self.cfg = cfg
        di, ng, ds, nh = cfg.d_inner, cfg.n_groups, cfg.state_size, cfg.num_heads
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * di + 2 * ng * ds + nh, bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim,
                                bias=cfg.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(nh))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, nh + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(nh))
        self.norm = RMSNorm(di, cfg.layer_norm_epsilon)
        self.out_proj = nn.Linear(di, cfg.hidden_size, bias=False)

    def forward(self, hs, conv_state=None, ssm_state=None, mode="ssd"):
        """hs [b, l, d] (already block-normed). conv_state [b, conv_dim, k-1] holds the previous
        xBC inputs (None: zeros); ssm_state [b, h, p, n] (None: zeros).
        Returns (out [b, l, d], new conv_state, new ssm_state)."""
        cfg = self.cfg
        b, l, _ = hs.shape
        di, ng, ds, nh, hp = cfg.d_inner, cfg.n_groups, cfg.state_size, cfg.num_heads, cfg.head_dim
        k = cfg.conv_kernel
        zxbcdt = self.in_proj(hs)
        z, xBC, dt = torch.split(zxbcdt, [di, cfg.conv_dim, nh], dim=-1)
        # depthwise causal conv over [previous k-1 inputs | this segment]
        xBC_t = xBC.transpose(1, 2)  # [b, conv_dim, l]
        if conv_state is None:
            conv_state = torch.zeros(b, cfg.conv_dim, k - 1, dtype=hs.dtype, device=hs.device)
        full = torch.cat([conv_state.to(hs.dtype), xBC_t], dim=-1)
        new_conv_state = full[:, :, -(k - 1):]
        conv = F.conv1d(full, self.conv1d.weight, self.conv1d.bias, groups=cfg.conv_dim)  # [b, c, l]
        xBC = F.silu(conv.transpose(1, 2))
        x, Bm, Cm = torch.split(xBC, [di, ng * ds, ng * ds], dim=-1)
        sdt = _at_least_f32(hs.dtype)
        with _no_autocast(hs):  # the scan and its state stay in >= fp32 under mixed precision
            x = x.reshape(b, l, nh, hp).to(sdt)
            rep = nh // ng
            Bm = Bm.reshape(b, l, ng, ds).repeat_interleave(rep, dim=2).to(sdt)
            Cm = Cm.reshape(b, l, ng, ds).repeat_interleave(rep, dim=2).to(sdt)
            dt = F.softplus(dt.to(sdt) + self.dt_bias.to(sdt))
            lo, hi = cfg.time_step_limit
            if lo > 0.0 or hi != float("inf"):
                dt = dt.clamp(lo, hi)
            A = -torch.exp(self.A_log.to(sdt))
            if ssm_state is not None:
                ssm_state = ssm_state.to(sdt)
            if mode == "ssd":
                y, new_ssm = ssd_chunked(x, dt, A, Bm, Cm, cfg.mamba_chunk_size, ssm_state)
            elif mode == "recurrent":
                y, new_ssm = ssm_recurrent(x, dt, A, Bm, Cm, ssm_state)
            else:
                raise ValueError(f"unknown mamba mode {mode}")
            y = y + self.D.to(sdt)[:, None] * x
            y = y.reshape(b, l, di).to(hs.dtype)
        # gated RMSNorm, gate first, per group
        g = y * F.silu(z)
        g = g.reshape(b, l, ng, di // ng)
        gf = g.to(sdt)
        gf = gf * torch.rsqrt(gf.pow(2).mean(-1, keepdim=True) + cfg.layer_norm_epsilon)
        g = self.norm.weight * gf.reshape(b, l, di).to(hs.dtype)
        return self.out_proj(g), new_conv_state, new_ssm


class Mamba2Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(cfg)

    def forward(self, h, conv_state=None, ssm_state=None, mode="ssd"):
        out, cs, ss = self.mixer(self.norm(h), conv_state, ssm_state, mode)
        return h + out, cs, ss


# --------------------------------------------------------------------------------------------
# Chunk encoder (Qwen2-style layers with per-head q/k RMSNorm, bidirectional)
# --------------------------------------------------------------------------------------------

def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class EncoderAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.attn_head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * hd, bias=True)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(hd, cfg.encoder_rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.encoder_rms_norm_eps)

    def forward(self, x):
        cfg = self.cfg
        B, S, _ = x.shape
        hd, nq, nk = cfg.attn_head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = self.q_norm(self.q_proj(x).view(B, S, nq, hd))
        k = self.k_norm(self.k_proj(x).view(B, S, nk, hd))
        v = self.v_proj(x).view(B, S, nk, hd)
        # RoPE, positions 0..S-1, rotate-half, theta encoder_rope_theta
        inv_freq = 1.0 / (cfg.encoder_rope_theta ** (
            torch.arange(0, hd, 2, dtype=torch.float64, device=x.device) / hd))
        ang = torch.arange(S, dtype=torch.float64, device=x.device)[:, None] * inv_freq[None, :]
        ang = torch.cat([ang, ang], dim=-1)
        cos = ang.cos().to(x.dtype)[None, :, None, :]
        sin = ang.sin().to(x.dtype)[None, :, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = nq // nk
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        att = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(hd)
        att = torch.softmax(att, dim=-1)  # bidirectional: no mask
        o = torch.einsum("bhst,bthd->bshd", att, v).reshape(B, S, nq * hd)
        return self.o_proj(o)


class EncoderMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = cfg.encoder_intermediate_size
        self.gate_proj = nn.Linear(cfg.hidden_size, w, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, w, bias=False)
        self.down_proj = nn.Linear(w, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = EncoderAttention(cfg)
        self.mlp = EncoderMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.encoder_rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.encoder_rms_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class ChunkEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.encoder_rms_norm_eps)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class ChunkingLayer(nn.Module):
    """Turns completed 64-token chunks of lower-decoder outputs into K, V and landmarks."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        kv = cfg.num_kv_heads * cfg.attn_head_dim
        if cfg.encoder_layers > 0:
            self.encoder = ChunkEncoder(cfg)
        else:
            self.norm = RMSNorm(cfg.hidden_size, cfg.hsa_norm_eps)
        self.proj_k = nn.Linear(cfg.hidden_size, kv, bias=False)
        self.proj_v = nn.Linear(cfg.hidden_size, kv, bias=False)
        self.lmk_ln = nn.Linear(cfg.hidden_size, cfg.retrieval_dim, bias=False)
        if cfg.enable_enc_cls:
            self.cls_emb = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))

    def encode_hidden(self, u):
        """u [N, C, S, d] -> E [N*C, S, d] (encoder outputs of the chunk tokens) and the
        landmark input [N*C, d] (CLS output, or the mean of E without CLS)."""
        cfg = self.cfg
        N, C, S, d = u.shape
        x = u.reshape(N * C, S, d)
        if cfg.enable_enc_cls:
            x = torch.cat([x, self.cls_emb.to(x.dtype).expand(N * C, 1, d)], dim=1)
        if cfg.encoder_layers > 0:
            E = self.encoder(x)
        else:
            E = self.norm(x)
        if cfg.enable_enc_cls:
            return E[:, :S], E[:, S]
        return E, E.mean(dim=1)

    def encode(self, u):
        """u [N, C, S, d] -> K, V [N, C, S, kvh, hd], landmarks [N, C, R, rd/R]."""
        cfg = self.cfg
        N, C, S, d = u.shape
        E, lmk_in = self.encode_hidden(u)
        lmk = self.lmk_ln(lmk_in)
        K = self.proj_k(E).view(N, C, S, cfg.num_kv_heads, cfg.attn_head_dim)
        V = self.proj_v(E).view(N, C, S, cfg.num_kv_heads, cfg.attn_head_dim)
        R = cfg.retrieval_heads
        return K, V, lmk.view(N, C, R, cfg.retrieval_dim // R)


# --------------------------------------------------------------------------------------------
# Retrieval and HSA
# --------------------------------------------------------------------------------------------

class RetrievalLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.hsa_norm_eps)
        self.ln = nn.Linear(cfg.hidden_size, cfg.retrieval_dim, bias=False)

    def scores(self, u, lmk, pos0):
        """u [N, L, d] at absolute positions pos0.., lmk [N, C, R, rd] ->
        scores [N, L, R, C] with ineligible chunks at -inf."""
        cfg = self.cfg
        N, L, _ = u.shape
        R = cfg.retrieval_heads
        with _no_autocast(u):  # scores (and so top-K and stick-breaking) in >= fp32
            r = self.ln(self.pre_norm(u)).view(N, L, R, cfg.retrieval_dim // R)
            s = torch.einsum("nlhd,nchd->nlhc", r, lmk.to(r.dtype)) / math.sqrt(cfg.retrieval_dim // R)
        C = lmk.shape[1]
        t = pos0 + torch.arange(L, device=u.device)
        eligible = (torch.arange(C, device=u.device)[None, :] + 1) * cfg.chunk_size <= t[:, None]  # [L, C]
        return s.masked_fill(~eligible[None, :, None, :], float("-inf"))

    def forward(self, u, lmk, pos0):
        """Returns indices [N, L, R, k] (most recent first, invalid slots = 0) and stick-breaking
        weights [N, L, R, k] (invalid slots 0), k = min(chunk_topk, C); None when C == 0."""
        C = lmk.shape[1]
        if C == 0:
            return None, None
        s = self.scores(u, lmk, pos0)
        k = min(self.cfg.chunk_topk, C)
        top_s, top_i = torch.topk(s, k, dim=-1)  # eligible (finite) scores come first
        valid = torch.isfinite(top_s)
        idx = torch.where(valid, top_i, torch.full_like(top_i, -1))
        idx, order = torch.sort(idx, dim=-1, descending=True)  # most recent chunk first
        sel = torch.gather(top_s, -1, order)
        valid = idx >= 0
        wdt = _at_least_f32(sel.dtype)
        sel = torch.where(valid, sel, torch.zeros_like(sel)).to(wdt)
        # w_j = sigmoid(s_j) prod_{i<j}(1 - sigmoid(s_i)) = exp(s_j - cumsum(softplus(s))_j)
        sp = F.softplus(sel, threshold=15.0)
        w = torch.exp(sel - torch.cumsum(sp, dim=-1))
        w = torch.where(valid, w, torch.zeros_like(w))
        return idx.clamp(min=0), w


class HSALayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.hsa_norm_eps)
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, h, K, V, idx, w, mode="gather", pos0=0):
        """h [N, L, d] at absolute positions pos0..; K, V [N, C, S, kvh, hd]; idx, w [N, L, R, k]
        from RetrievalLayer. mode "gather" gathers the selected chunks slot by slot; "dense"
        (training: matrix products instead of gathers, same result) attends to every eligible
        chunk's keys with the chunk's stick-breaking weight, zero for unselected chunks."""
        if idx is None:
            return h
        cfg = self.cfg
        N, L, d = h.shape
        H, kvh, hd = cfg.num_attention_heads, cfg.num_kv_heads, cfg.attn_head_dim
        q = self.q_proj(self.pre_norm(h)).view(N, L, kvh, H // kvh, hd)
        if idx.shape[2] != kvh:  # single retrieval head shared by all kv heads
            idx = idx.expand(N, L, kvh, idx.shape[-1])
            w = w.expand(N, L, kvh, w.shape[-1])
        if mode == "dense":
            return h + self.o_proj(self._dense(q, K, V, idx, w, pos0).to(h.dtype).reshape(N, L, d))
        if mode != "gather":
            raise ValueError(f"unknown hsa mode {mode}")
        n_idx = torch.arange(N, device=h.device)[:, None, None]
        g_idx = torch.arange(kvh, device=h.device)[None, None, :]
        out = torch.zeros(N, L, kvh, H // kvh, hd, dtype=_at_least_f32(h.dtype), device=h.device)
        for j in range(idx.shape[-1]):  # one selected-chunk slot at a time bounds the memory
            c = idx[..., j]  # [N, L, kvh]
            Kj = K[n_idx, c, :, g_idx, :]  # [N, L, kvh, S, hd]
            Vj = V[n_idx, c, :, g_idx, :]
            a = torch.einsum("nlgrd,nlgsd->nlgrs", q, Kj) / math.sqrt(hd)
            a = torch.softmax(a, dim=-1)
            o = torch.einsum("nlgrs,nlgsd->nlgrd", a, Vj)
            out = out + w[..., j, None, None].to(out.dtype) * o.to(out.dtype)
        return h + self.o_proj(out.to(h.dtype).reshape(N, L, d))

    def _dense(self, q, K, V, idx, w, pos0, block=1024):
        """Dense form of the slot loop: out = sum_c W[c] softmax(q K_c / sqrt(hd)) V_c with W the
        stick-breaking weights scattered over chunks (0 where not selected). Query blocks of
        `block` tokens only visit the chunks eligible for their last token."""
        N, L, kvh, G, hd = q.shape
        C, S = K.shape[1], K.shape[2]
        W = torch.zeros(N, L, kvh, C, dtype=w.dtype, device=w.device).scatter_add(-1, idx, w)
        K2 = K.permute(0, 3, 1, 2, 4)  # [N, kvh, C, S, hd]
        V2 = V.permute(0, 3, 1, 2, 4)
        outs = []
        for t0 in range(0, L, block):
            t1 = min(L, t0 + block)
            Cb = min(C, (pos0 + t1 - 1) // S)  # chunks eligible for the block's last token
            if Cb <= 0:
                outs.append(torch.zeros(N, t1 - t0, kvh, G, hd, dtype=_at_least_f32(q.dtype),
                                        device=q.device))
                continue
            qb = q[:, t0:t1].permute(0, 2, 1, 3, 4).reshape(N, kvh, (t1 - t0) * G, hd)
            Kb = K2[:, :, :Cb].reshape(N, kvh, Cb * S, hd)
            Vb = V2[:, :, :Cb].reshape(N, kvh, Cb * S, hd)
            a = torch.matmul(qb, Kb.transpose(-1, -2)) / math.sqrt(hd)
            a = torch.softmax(a.view(N, kvh, t1 - t0, G, Cb, S), dim=-1)
            Wb = W[:, t0:t1, :, :Cb].permute(0, 2, 1, 3)[:, :, :, None, :, None]  # [N,kvh,l,1,Cb,1]
            p = (a * Wb.to(a.dtype)).reshape(N, kvh, (t1 - t0) * G, Cb * S)
            o = torch.matmul(p.to(Vb.dtype), Vb)
            outs.append(o.view(N, kvh, t1 - t0, G, hd).permute(0, 2, 1, 3, 4).to(_at_least_f32(q.dtype)))
        return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RambaState:
    """Incremental state of one batch of sequences that advance together."""
    conv: List[Optional[torch.Tensor]]   # per Mamba layer (ModuleList order): [N, conv_dim, k-1]
    ssm: List[Optional[torch.Tensor]]    # per Mamba layer: [N, heads, head_dim, d_state] (>= fp32)
    buffer: Optional[torch.Tensor]       # lower-decoder outputs of the partial chunk [N, <64, d]
    K: Optional[torch.Tensor]            # chunk memory [N, C, 64, kvh, hd]
    V: Optional[torch.Tensor]
    landmarks: Optional[torch.Tensor]    # [N, C, R, rd/R]
    position: int = 0                    # tokens consumed

    @property
    def num_chunks(self):
        return 0 if self.K is None else self.K.shape[1]


class RambaBackbone(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers = [Mamba2Block(cfg) for _ in range(cfg.num_lower_layers)]
        layers.append(ChunkingLayer(cfg))
        layers.append(RetrievalLayer(cfg))
        for _ in range(cfg.num_hsa_layers):
            layers.append(HSALayer(cfg))
            layers.extend(Mamba2Block(cfg) for _ in range(cfg.num_mamba_per_gca))
        self.layers = nn.ModuleList(layers)
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.layer_norm_epsilon)


class RambaForCausalLM(nn.Module):
    def __init__(self, cfg: RambaConfig):
        super().__init__()
        self.config = cfg
        self.backbone = RambaBackbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias")) or "norm" in name.split(".")[-2]:
                continue
            if p.dim() >= 2 or name.endswith("bias") or name.endswith("cls_emb"):
                with torch.no_grad():
                    if name.endswith("bias"):
                        p.zero_()
                    else:
                        p.normal_(0.0, std)

    # -- helpers --
    def _lm_head(self, h):
        h = self.backbone.norm_f(h)
        w = self.backbone.embeddings.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(h, w)

    def _parts(self):
        cfg = self.config
        layers = self.backbone.layers
        lower = list(layers[:cfg.num_lower_layers])
        chunking = layers[cfg.num_lower_layers]
        retrieval = layers[cfg.num_lower_layers + 1]
        upper = list(layers[cfg.num_lower_layers + 2:])
        return lower, chunking, retrieval, upper

    def mamba_layer_ids(self):
        return [i for i, m in enumerate(self.backbone.layers) if isinstance(m, Mamba2Block)]

    # -- full sequence --
    def forward(self, input_ids, mamba_mode="ssd", hsa_mode="gather"):
        cfg = self.config
        lower, chunking, retrieval, upper = self._parts()
        N, L = input_ids.shape
        h = self.backbone.embeddings(input_ids)
        for blk in lower:
            h, _, _ = blk(h, mode=mamba_mode)
        u = h
        C = L // cfg.chunk_size
        if C > 0:
            K, V, lmk = chunking.encode(u[:, :C * cfg.chunk_size].reshape(N, C, cfg.chunk_size, -1))
            idx, w = retrieval(u, lmk, 0)
        else:
            K = V = idx = w = None
        for m in upper:
            if isinstance(m, HSALayer):
                h = m(h, K, V, idx, w, mode=hsa_mode)
            else:
                h, _, _ = m(h, mode=mamba_mode)
        return self._lm_head(h)

    # -- incremental --
    def init_state(self, batch_size):
        n = len(self.mamba_layer_ids())
        return RambaState(conv=[None] * n, ssm=[None] * n, buffer=None, K=None, V=None,
                          landmarks=None, position=0)

    def step(self, state: RambaState, input_ids, mamba_mode="ssd"):
        """Consumes input_ids [N, m] (m >= 1) after `state.position` tokens; updates `state`
        in place and returns logits [N, m, V]."""
        cfg = self.config
        lower, chunking, retrieval, upper = self._parts()
        N, m = input_ids.shape
        S = cfg.chunk_size
        h = self.backbone.embeddings(input_ids)
        mi = 0
        for blk in lower:
            h, state.conv[mi], state.ssm[mi] = blk(h, state.conv[mi], state.ssm[mi], mamba_mode)
            mi += 1
        u = h
        # chunk memory: encode every chunk completed by this segment before retrieval, so later
        # tokens of the same segment already see it
        buf = u if state.buffer is None else torch.cat([state.buffer, u], dim=1)
        n_new = buf.shape[1] // S
        if n_new > 0:
            K, V, lmk = chunking.encode(buf[:, :n_new * S].reshape(N, n_new, S, -1))
            if state.K is None:
                state.K, state.V, state.landmarks = K, V, lmk
            else:
                state.K = torch.cat([state.K, K], dim=1)
                state.V = torch.cat([state.V, V], dim=1)
                state.landmarks = torch.cat([state.landmarks, lmk], dim=1)
        state.buffer = buf[:, n_new * S:]
        if state.K is not None:
            idx, w = retrieval(u, state.landmarks, state.position)
        else:
            idx = w = None
        for m_ in upper:
            if isinstance(m_, HSALayer):
                h = m_(h, state.K, state.V, idx, w)
            else:
                h, state.conv[mi], state.ssm[mi] = m_(h, state.conv[mi], state.ssm[mi], mamba_mode)
                mi += 1
        state.position += m
        return self._lm_head(h)

    def retrieval_scores(self, input_ids):
        """Eligible retrieval scores [N, L, R, C] of a full sequence (for tie checks)."""
        cfg = self.config
        lower, chunking, retrieval, _ = self._parts()
        N, L = input_ids.shape
        h = self.backbone.embeddings(input_ids)
        for blk in lower:
            h, _, _ = blk(h)
        C = L // cfg.chunk_size
        _, _, lmk = chunking.encode(h[:, :C * cfg.chunk_size].reshape(N, C, cfg.chunk_size, -1))
        return retrieval.scores(h, lmk, 0)


def load_model(model_dir, dtype=torch.float32):
    """Loads config.json + model.safetensors of `model_dir` into a RambaForCausalLM."""
    import os
    from safetensors_io import load_file
    cfg = RambaConfig.from_json_file(os.path.join(model_dir, "config.json"))
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    cfg.enable_enc_cls = any(k.endswith(".cls_emb") for k in tensors)
    cfg.validate()
    model = RambaForCausalLM(cfg)
    sd = {k: v.to(dtype) for k, v in tensors.items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model.load_state_dict(sd, strict=True)
    return model.to(dtype)
