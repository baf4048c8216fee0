#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) as a peer in q4-bench-generate: same GGUF, same token ids.

Reads {"gguf", "quant", "prompt", "long", "new", "reps"[, "mode": "ppl"]} as JSON on stdin (the token ids come
from q4's tokenizer, so both sides run identical inputs) and prints one JSON line in the
bench's format. `quant` "q4_1" runs the GGUF as shipped; "q4_0" a Q4_0 copy made once with
llama.cpp's own quantizer next to the cached GGUF (the anchors' fastest configuration).
Greedy decoding, 2 threads, batch = whole prompt. Peak RSS is this process's (ru_maxrss).
With "mode": "ppl" it prints the perplexity of the "long" ids instead (one window).
"""
import json
import os
import resource
import sys
import time

import llama_cpp
import numpy as np


def quantized_copy(src: str, quant: str) -> str:
    if quant == "q4_1":
        return src
    dst = os.path.join(os.path.dirname(src), os.path.basename(src).replace(".Q4_1.", f".{quant.upper()}."))
    if dst == src:
        raise SystemExit(f"{src}: cannot name the {quant} copy")
    if not os.path.exists(dst):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[quant]
        params.allow_requantize = True
        params.nthread = 2
        tmp = dst + ".tmp"
        if llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params) != 0:
            raise SystemExit(f"{src}: llama.cpp could not quantize it to {quant}")
        os.replace(tmp, dst)
    return dst


def median(v):
    s = sorted(v)
    return s[len(s) // 2]


def perplexity(path, ids):
    """exp(mean NLL) of ids[1:] given their prefixes, one window, all logits from one eval."""
    llm = llama_cpp.Llama(model_path=path, n_ctx=len(ids) + 8, n_batch=512, n_threads=2,
                          logits_all=True, verbose=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    print(json.dumps({"config": f"llama.cpp-{os.path.basename(path)}", "ppl": float(np.exp(nll)),
                      "tokens": len(ids), "scored": len(ids) - 1,
                      "llama_cpp_python": llama_cpp.__version__}))


def main():
    job = json.load(sys.stdin)
    path = quantized_copy(job["gguf"], job["quant"])
    if job.get("mode") == "ppl":
        return perplexity(path, job["long"])
    prompt, long, new, reps = job["prompt"], job["long"], job["new"], job["reps"]
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=max(len(long), len(prompt) + new) + 8,
        n_batch=512,
        n_threads=2,
        n_threads_batch=2,
        verbose=False,
    )

    n_vocab = llm.n_vocab()

    def last_argmax():
        # Without logits_all, llama-cpp-python keeps no copy: read the context's last row.
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    prefill, decode, long_prefill, out = [], [], [], []
    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        nxt = last_argmax()
        prefill.append(len(prompt) / (time.perf_counter() - t))
        out = [nxt]
        t = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([nxt])
            nxt = last_argmax()
            out.append(nxt)
        decode.append((new - 1) / (time.perf_counter() - t))
    short_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(long)
        long_prefill.append(len(long) / (time.perf_counter() - t))
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    print(json.dumps({
        "config": f"llama.cpp-{job['quant']}",
        "prefill_tok_s": median(prefill),
        "decode_tok_s": median(decode),
        "long_prefill_tok_s": median(long_prefill),
        "prompt_tokens": len(prompt),
        "long_prompt_tokens": len(long),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_rss_short_mib": short_peak / 1024.0,
        "text": text,
        "llama_cpp_python": llama_cpp.__version__,
    }))


if __name__ == "__main__":
    main()
