#!/usr/bin/env python3
"""Records llama.cpp's logits and greedy tokens for a GGUF model as test data.

Development-time only: needs `pip install llama-cpp-python`. The output is
committed (tests/data/); the tests never run llama.cpp.

For each prompt: tokenize with llama.cpp (add_special, parse_special as given),
decode the prompt in one batch, then N greedy steps of one token each, and
record the top-K logits, the logsumexp and the argmax of every row.
"""
import argparse
import json
import math

import numpy as np
from llama_cpp import Llama

PROMPTS = [
    {"text": "The capital of France is", "parse_special": False},
    {"text": "Once upon a time, in a small village by the sea,", "parse_special": False},
    {"text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
     "parse_special": False},
    {"text": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
             "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
             "<|im_end|>\n<|im_start|>assistant\n", "parse_special": True},
    {"text": "Prices rose 3.5% in 2024: €12,99 → €13,44 (naïve café résumé) 🦙", "parse_special": False},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()

    llm = Llama(model_path=args.model, n_ctx=512, n_batch=512, n_threads=1, logits_all=True,
                verbose=False)
    cases = []
    for i, p in enumerate(PROMPTS):
        tokens = llm.tokenize(p["text"].encode(), add_bos=True, special=p["parse_special"])
        llm.reset()
        llm.eval(tokens)
        steps = []
        for k in range(args.steps + 1):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            m = row.max()
            lse = float(m + math.log(np.exp(row - m).sum()))
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))[: args.top]
            tok = order[0]
            steps.append({"token": tok, "logsumexp": lse,
                          "top": [[j, float(row[j])] for j in order]})
            if k < args.steps:
                llm.eval([tok])
        cases.append({"index": i, "prompt": p["text"], "parse_special": p["parse_special"],
                      "prompt_tokens": tokens, "steps": steps,
                      "greedy_tokens": [s["token"] for s in steps]})
    out = {"format": "morphserve-reference-v1", "model_file": args.model.split("/")[-1],
           "generator": "llama.cpp via llama-cpp-python, CPU, 1 thread, prompt in one batch",
           "cases": cases}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
