"""Converts a reference RAMba checkpoint (pytorch_model.bin, usually bf16) to model.safetensors
with the tensor names our engine and model/reference/ramba_ref.py accept.

    /usr/bin/python3 model/reference/convert_checkpoint.py CKPT_DIR_OR_BIN OUT_DIR [--dtype keep|f32|bf16|f16]

Renames: strips a leading `module.`; `backbone.embedding.weight` (older name) ->
`backbone.embeddings.weight`; adds the `backbone.` prefix when a checkpoint lacks it. Drops
non-persistent buffers (rotary `inv_freq`) and `lm_head.weight` when the config ties it to the
embedding and it is identical. Keeps each tensor's dtype unless --dtype says otherwise (F64 and
other types become F32). Copies config.json when it sits next to the checkpoint, and with
--check loads the result into RambaForCausalLM (strict names and shapes).
"""
import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import save_file  # noqa: E402

_TOP = ("embeddings.", "embedding.", "layers.", "norm_f.")


def rename(name):
    if name.startswith("module."):
        name = name[len("module."):]
    if name.startswith(_TOP):
        name = "backbone." + name
    if name == "backbone.embedding.weight":
        name = "backbone.embeddings.weight"
    return name


def convert_state_dict(sd, tie_word_embeddings=True, dtype="keep"):
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v) or k.endswith("inv_freq"):
            continue
        name = rename(k)
        if name in out:
            raise ValueError(f"two tensors map to {name}")
        if dtype == "f32":
            v = v.float()
        elif dtype == "bf16":
            v = v.to(torch.bfloat16)
        elif dtype == "f16":
            v = v.half()
        elif v.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            v = v.float()
        out[name] = v.contiguous()
    if tie_word_embeddings and "lm_head.weight" in out:
        if torch.equal(out["lm_head.weight"], out["backbone.embeddings.weight"]):
            del out["lm_head.weight"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="pytorch_model.bin or the directory holding it")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", choices=["keep", "f32", "bf16", "f16"], default="keep")
    ap.add_argument("--check", action="store_true", help="load the result into RambaForCausalLM")
    args = ap.parse_args()
    src = args.src
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    if os.path.isdir(src):
        src = os.path.join(src, "pytorch_model.bin")
    cfg_path = os.path.join(src_dir, "config.json")
    tie = True
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            tie = bool(json.load(f).get("tie_word_embeddings", True))
    sd = torch.load(src, map_location="cpu")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    out = convert_state_dict(sd, tie, args.dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    save_file(out, os.path.join(args.out_dir, "model.safetensors"), metadata={"format": "pt"})
    if os.path.exists(cfg_path) and os.path.abspath(src_dir) != os.path.abspath(args.out_dir):
        shutil.copy(cfg_path, os.path.join(args.out_dir, "config.json"))
    print(f"wrote {len(out)} tensors to {os.path.join(args.out_dir, 'model.safetensors')}")
    if args.check:
        from ramba_ref import load_model
        load_model(args.out_dir)
        print("check: loads into RambaForCausalLM (strict)")


if __name__ == "__main__":
    main()
