"""Self-checks of the RAMba reference. Run: /usr/bin/python3 model/reference/test_reference.py"""
import math
import os
import sys
import tempfile
import unittest

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ramba_ref import (RambaConfig, RambaForCausalLM, load_model, ssd_chunked,  # noqa: E402
                       ssm_recurrent)
from safetensors_io import load_file, save_file  # noqa: E402
from export_fixtures import randomize_weights  # noqa: E402

torch.set_default_dtype(torch.float64)


def small_model(seed=0, **over):
    cfg = dict(hidden_size=32, vocab_size=64, num_lower_layers=1, num_upper_layers=2,
               num_mamba_per_gca=1, state_size=8, head_dim=16, expand=2, n_groups=2,
               mamba_chunk_size=16, chunk_topk=2, retrieval_dim=64, encoder_layers=1,
               num_attention_heads=4, num_key_value_heads=2, num_kv_heads=2)
    cfg.update(over)
    model = RambaForCausalLM(RambaConfig.from_dict(cfg)).double()
    randomize_weights(model, seed)
    return model


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


class SSDTest(unittest.TestCase):
    def test_chunked_equals_recurrence(self):
        g = torch.Generator().manual_seed(0)
        for l, block, init in ((1, 4, False), (37, 8, True), (64, 16, False), (50, 64, True), (9, 1, True)):
            b, h, p, n = 2, 3, 5, 4
            x = torch.randn(b, l, h, p, generator=g)
            dt = F.softplus(torch.randn(b, l, h, generator=g))
            A = -torch.rand(h, generator=g) * 3
            B = torch.randn(b, l, h, n, generator=g)
            C = torch.randn(b, l, h, n, generator=g)
            s0 = torch.randn(b, h, p, n, generator=g) if init else None
            y1, f1 = ssd_chunked(x, dt, A, B, C, block, s0)
            y2, f2 = ssm_recurrent(x, dt, A, B, C, s0)
            self.assertLess(rel(y1, y2), 1e-12, (l, block))
            self.assertLess(rel(f1, f2), 1e-12, (l, block))


class ModelTest(unittest.TestCase):
    def check_paths(self, model, T=300, N=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (N, T), generator=g)
        with torch.no_grad():
            full = model(ids)
            full_rec = model(ids, mamba_mode="recurrent")
            self.assertLess(rel(full_rec, full), 1e-10, "ssd vs recurrent forward")
            self.assertLess(rel(model(ids, hsa_mode="dense"), full), 1e-12, "dense vs gather HSA")
            # token by token, recurrence
            st = model.init_state(N)
            tok = torch.cat([model.step(st, ids[:, t:t + 1], mamba_mode="recurrent")
                             for t in range(T)], dim=1)
            self.assertLess(rel(tok, full), 1e-10, "token-by-token vs full")
            self.assertEqual(st.position, T)
            self.assertEqual(st.num_chunks, T // 64)
            self.assertEqual(st.buffer.shape[1], T % 64)
            # odd segments
            st = model.init_state(N)
            outs, b = [], 0
            for n in [1, 2, 60, 1, 1, 64, 3, 65, 7, 129, 1000]:
                n = min(n, T - b)
                if n == 0:
                    break
                outs.append(model.step(st, ids[:, b:b + n]))
                b += n
            self.assertEqual(b, T)
            self.assertLess(rel(torch.cat(outs, 1), full), 1e-10, "segments vs full")
        # batch rows are independent
        with torch.no_grad():
            one = model(ids[1:2])
        self.assertLess(rel(one[0], full[1]), 1e-12)
        return ids, full

    def test_paths_enc1_gqa(self):
        self.check_paths(small_model(0))

    def test_paths_cls_singlehead(self):
        self.check_paths(small_model(1, singlehead_retrieval=True, enable_enc_cls=True, n_groups=1,
                                     encoder_layers=2, chunk_topk=3))

    def test_paths_enc0_untied(self):
        self.check_paths(small_model(2, encoder_layers=0, tie_word_embeddings=False, num_kv_heads=1,
                                     num_mamba_per_gca=2, num_upper_layers=4), T=270)

    def test_retrieval_matches_naive(self):
        """Top-K, recency order and stick-breaking against a per-token loop of the spec."""
        model = small_model(3, chunk_topk=3)
        cfg = model.config
        ids = torch.randint(0, cfg.vocab_size, (1, 400), generator=torch.Generator().manual_seed(3))
        lower, chunking, retrieval, _ = model._parts()
        with torch.no_grad():
            h = model.backbone.embeddings(ids)
            for blk in lower:
                h, _, _ = blk(h)
            C = 400 // 64
            _, _, lmk = chunking.encode(h[:, :C * 64].reshape(1, C, 64, -1))
            idx, w = retrieval(h, lmk, 0)
            R = cfg.retrieval_heads
            r = retrieval.ln(retrieval.pre_norm(h))[0].view(400, R, -1)
            for t in range(0, 400, 7):
                for hd in range(R):
                    elig = [c for c in range(C) if (c + 1) * 64 <= t]
                    sc = {c: (r[t, hd] @ lmk[0, c, hd]).item() / math.sqrt(cfg.retrieval_dim // R)
                          for c in elig}
                    top = sorted(elig, key=lambda c: -sc[c])[:cfg.chunk_topk]
                    top.sort(reverse=True)
                    rest, ws = 1.0, []
                    for c in top:
                        sg = 1 / (1 + math.exp(-sc[c]))
                        ws.append(sg * rest)
                        rest *= 1 - sg
                    k = len(top)
                    self.assertEqual(idx[0, t, hd, :k].tolist(), top)
                    for a, b in zip(w[0, t, hd, :k].tolist(), ws):
                        self.assertAlmostEqual(a, b, places=12)
                    self.assertTrue(bool((w[0, t, hd, k:] == 0).all()))

    def test_hsa_matches_naive(self):
        """HSA layer output for a few tokens against a per-head, per-chunk loop of the spec."""
        model = small_model(7, chunk_topk=3, num_kv_heads=2, num_attention_heads=4)
        cfg = model.config
        ids = torch.randint(0, cfg.vocab_size, (1, 330), generator=torch.Generator().manual_seed(7))
        lower, chunking, retrieval, upper = model._parts()
        hsa = upper[0]
        with torch.no_grad():
            h = model.backbone.embeddings(ids)
            for blk in lower:
                h, _, _ = blk(h)
            K, V, lmk = chunking.encode(h[:, :320].reshape(1, 5, 64, -1))
            idx, w = retrieval(h, lmk, 0)
            out = hsa(h, K, V, idx, w)
            q = hsa.q_proj(hsa.pre_norm(h))[0]
            hd, H, G = cfg.attn_head_dim, cfg.num_attention_heads, cfg.num_kv_heads
            for t in (0, 63, 64, 100, 200, 329):
                o = torch.zeros(cfg.hidden_size)
                for head in range(H):
                    g = head // (H // G)
                    rh = g if cfg.retrieval_heads > 1 else 0
                    for j in range(idx.shape[-1]):
                        c = idx[0, t, rh, j].item()
                        qh = q[t, head * hd:(head + 1) * hd]
                        a = torch.softmax(K[0, c, :, g] @ qh / math.sqrt(hd), dim=0)
                        o[head * hd:(head + 1) * hd] += w[0, t, rh, j] * (a @ V[0, c, :, g])
                want = h[0, t] + hsa.o_proj(o)
                self.assertLess(rel(out[0, t], want), 1e-12, t)
                if t < 64:
                    self.assertTrue(torch.equal(out[0, t], h[0, t]))

    def test_gradients(self):
        model = small_model(4).float()
        ids = torch.randint(0, 64, (2, 200), generator=torch.Generator().manual_seed(4))
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
        loss.backward()
        for name in ("backbone.layers.2.ln.weight", "backbone.layers.1.lmk_ln.weight",
                     "backbone.layers.3.q_proj.weight", "backbone.layers.0.mixer.A_log"):
            p = dict(model.named_parameters())[name]
            self.assertTrue(p.grad is not None and p.grad.abs().sum() > 0, name)

    def test_dense_hsa_gradients(self):
        """hsa_mode="dense" (training) gives the gather path's loss and gradients."""
        for seed, over in ((9, {}), (10, dict(singlehead_retrieval=True, enable_enc_cls=True))):
            model = small_model(seed, **over)
            ids = torch.randint(0, 64, (2, 300), generator=torch.Generator().manual_seed(seed))
            grads = []
            for mode in ("gather", "dense"):
                model.zero_grad()
                logits = model(ids, hsa_mode=mode)
                F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
                grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            self.assertEqual(set(grads[0]), set(grads[1]))
            for n in grads[0]:
                self.assertLess(rel(grads[1][n], grads[0][n]), 1e-10, n)

    def test_state_dict_names(self):
        model = small_model(5, enable_enc_cls=True, tie_word_embeddings=False)
        names = set(model.state_dict())
        for n in ("backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight",
                  "backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.mixer.dt_bias",
                  "backbone.layers.1.encoder.layers.0.self_attn.q_norm.weight",
                  "backbone.layers.1.encoder.layers.0.mlp.gate_proj.weight",
                  "backbone.layers.1.encoder.norm.weight", "backbone.layers.1.cls_emb",
                  "backbone.layers.1.proj_k.weight", "backbone.layers.2.pre_norm.weight",
                  "backbone.layers.2.ln.weight", "backbone.layers.3.q_proj.weight",
                  "backbone.layers.4.mixer.out_proj.weight"):
            self.assertIn(n, names)
        self.assertEqual(tuple(model.state_dict()["backbone.layers.0.mixer.conv1d.weight"].shape),
                         (model.config.conv_dim, 1, 4))
        model0 = small_model(5, encoder_layers=0)
        self.assertIn("backbone.layers.1.norm.weight", model0.state_dict())
        self.assertFalse(any("cls_emb" in k for k in model0.state_dict()))


class SafetensorsTest(unittest.TestCase):
    def test_roundtrip_and_load_model(self):
        t = {"a": torch.randn(3, 5).float(), "b": torch.randn(7).to(torch.bfloat16),
             "c": torch.randn(2, 2, 2).half(), "s": torch.tensor(2.5, dtype=torch.float32)}
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "x.safetensors")
            save_file(t, p, metadata={"k": "v"})
            back, meta = load_file(p, with_metadata=True)
            self.assertEqual(meta, {"k": "v"})
            for k in t:
                self.assertEqual(back[k].dtype, t[k].dtype)
                self.assertTrue(torch.equal(back[k], t[k]), k)
            model = small_model(6)
            with open(os.path.join(d, "config.json"), "w") as f:
                f.write(model.config.to_json_string())
            with open(os.path.join(d, "config.json")) as f:
                self.assertIn("Infinity", f.read())
            save_file({k: v.float() for k, v in model.state_dict().items()},
                      os.path.join(d, "model.safetensors"))
            m2 = load_model(d, torch.float64)
            ids = torch.randint(0, 64, (1, 130))
            with torch.no_grad():
                self.assertLess(rel(m2(ids), model.float().double()(ids)), 1e-12)


    def test_convert_checkpoint(self):
        import subprocess
        model = small_model(8)
        sd = {("module." + k).replace("embeddings.", "embedding."): v.to(torch.bfloat16)
              for k, v in model.state_dict().items()}
        sd["module.lm_head.weight"] = sd["module.backbone.embedding.weight"]
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(os.path.join(d, "src"))
            torch.save(sd, os.path.join(d, "src", "pytorch_model.bin"))
            with open(os.path.join(d, "src", "config.json"), "w") as f:
                f.write(model.config.to_json_string())
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert_checkpoint.py")
            subprocess.run([sys.executable, script, os.path.join(d, "src"), os.path.join(d, "out"),
                            "--check"], check=True, stdout=subprocess.DEVNULL)
            t = load_file(os.path.join(d, "out", "model.safetensors"))
            self.assertEqual(set(t), set(model.state_dict()))
            self.assertEqual(t["backbone.embeddings.weight"].dtype, torch.bfloat16)

if __name__ == "__main__":
    unittest.main(verbosity=2)
