"""Reading a Hugging Face model directory's tensors, shared by the conversion tests."""

import json
import os

from safetensors import safe_open


def read_all(hf_dir):
    """name -> tensor of every safetensors file of ``hf_dir`` (sharded or not)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(os.path.join(hf_dir, name), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
