#!/usr/bin/env python3
"""An exact (float64) Llama forward pass over a GGUF file's dequantized weights.

Development-time only (needs `pip install gguf numpy`). It re-computes the
rows of a reference file made by make_llamacpp_reference.py, teacher-forced on
the same tokens, and writes the top-K logits of every row: the ground truth
that the engine's reference kernels are tested against, free of the 8-bit
activation rounding that fast kernels (ours and llama.cpp's) apply.

Supports GGUF `llama` checkpoints (adjacent-pair RoPE on permuted Q/K rows),
tied or untied output.
"""
import argparse
import json

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class GgufLlama:
    def __init__(self, path):
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        arch = self.field("general.architecture")
        if arch != "llama":
            raise SystemExit(f"unsupported architecture {arch}")
        self.hidden = self.field("llama.embedding_length")
        self.layers = self.field("llama.block_count")
        self.heads = self.field("llama.attention.head_count")
        self.kv_heads = self.field("llama.attention.head_count_kv", self.heads)
        self.head_dim = self.hidden // self.heads
        self.eps = self.field("llama.attention.layer_norm_rms_epsilon")
        theta = self.field("llama.rope.freq_base", 10000.0)
        self.inv_freq = theta ** (-np.arange(0, self.head_dim, 2) / self.head_dim)
        self.embedding = self.matrix("token_embd.weight")
        self.output = (self.matrix("output.weight") if "output.weight" in self.tensors
                       else self.embedding)

    def field(self, key, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def matrix(self, name):
        t = self.tensors[name]
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64)
        rows = int(t.shape[1]) if len(t.shape) > 1 else 1
        return values.reshape(rows, -1) if rows > 1 else values.reshape(-1)

    def rms_norm(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        angle = pos[:, None] * self.inv_freq[None, :]
        c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return out

    def forward(self, tokens):
        n = len(tokens)
        x = self.embedding[tokens]
        pos = np.arange(n, dtype=np.float64)
        causal = np.triu(np.full((n, n), -np.inf), 1)
        group = self.heads // self.kv_heads
        for layer in range(self.layers):
            p = f"blk.{layer}."
            xn = self.rms_norm(x, self.matrix(p + "attn_norm.weight"))
            q = (xn @ self.matrix(p + "attn_q.weight").T).reshape(n, self.heads, self.head_dim)
            k = (xn @ self.matrix(p + "attn_k.weight").T).reshape(n, self.kv_heads, self.head_dim)
            v = (xn @ self.matrix(p + "attn_v.weight").T).reshape(n, self.kv_heads, self.head_dim)
            q, k = self.rope(q, pos), self.rope(k, pos)
            attn = np.zeros((n, self.heads, self.head_dim))
            for h in range(self.heads):
                scores = q[:, h, :] @ k[:, h // group, :].T / np.sqrt(self.head_dim) + causal
                scores = np.exp(scores - scores.max(-1, keepdims=True))
                attn[:, h, :] = (scores / scores.sum(-1, keepdims=True)) @ v[:, h // group, :]
            x = x + attn.reshape(n, -1) @ self.matrix(p + "attn_output.weight").T
            xn = self.rms_norm(x, self.matrix(p + "ffn_norm.weight"))
            gate = xn @ self.matrix(p + "ffn_gate.weight").T
            up = xn @ self.matrix(p + "ffn_up.weight").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self.matrix(p + "ffn_down.weight").T
        return self.rms_norm(x, self.matrix("output_norm.weight")) @ self.output.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--reference", required=True, help="file from make_llamacpp_reference.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    model = GgufLlama(args.model)
    ref = json.load(open(args.reference))
    out = {"format": "morphserve-reference-v1", "model_file": ref["model_file"],
           "generator": "float64 numpy forward pass over the dequantized GGUF weights "
                        "(scripts/dev/exact_llama_reference.py)", "cases": []}
    for case in ref["cases"]:
        tokens = case["prompt_tokens"] + case["greedy_tokens"][:-1]
        logits = model.forward(np.array(tokens))
        n = len(case["prompt_tokens"])
        steps = []
        for k in range(len(case["steps"])):
            row = logits[n - 1 + k]
            m = row.max()
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))[: args.top]
            steps.append({"token": int(order[0]),
                          "logsumexp": float(m + np.log(np.exp(row - m).sum())),
                          "top": [[int(j), float(row[j])] for j in order]})
        out["cases"].append({"index": case["index"], "prompt_tokens": case["prompt_tokens"],
                             "input_tokens": tokens, "steps": steps})
        print(f"case {case['index']}: {len(tokens)} tokens", flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
