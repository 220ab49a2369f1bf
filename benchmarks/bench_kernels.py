"""Micro-benchmarks of the Triton kernels at bench-preset shapes, against their PyTorch twins.

Reports median time (triton.testing.do_bench), achieved TFLOP/s and GB/s (minimum bytes: each input read once,
each output written once; gathered latent rows counted once per query) and, with --sweep, a few launch configs.

    python benchmarks/bench_kernels.py --out kernels.json [--sweep] [--only mla,masked,indexer,fp8,moe]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _bench(fn, warmup=25, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _selection(batch, seq, total, topk, past_len):
    scores = torch.rand(batch, seq, total, device="cuda")
    pos = past_len + torch.arange(seq, device="cuda")
    allowed = torch.arange(total, device="cuda")[None, None, :] <= pos[None, :, None]
    values, indices = scores.masked_fill(~allowed, -1.0).topk(topk, dim=-1)
    return indices, values >= 0


def bench_mla(results, sweep):
    from modeling_deepseek_v32.attention import DeepseekV32Attention
    from modeling_deepseek_v32.configuration import DeepseekV32Config
    from modeling_deepseek_v32.indexer import IndexSelection
    from modeling_deepseek_v32.kernels.mla_kernel import flops_and_bytes, sparse_mla_attention

    config = DeepseekV32Config.from_preset("bench")
    attn = DeepseekV32Attention(config, 0).cuda().to(torch.bfloat16).eval()
    heads, rank, rope, topk = 16, 512, 64, 2048
    cases = [("prefill", 1, 4096, 4096), ("prefill", 1, 16384, 16384), ("decode", 1, 1, 32767),
             ("decode", 8, 1, 32767), ("decode", 1, 1, 131071), ("mtp-verify", 8, 2, 32766)]  # fmt: skip
    for name, batch, seq, past in cases:
        total = past + (seq if name != "prefill" else 0)
        if name == "prefill":
            past, total = 0, seq
        q_latent = torch.randn(batch, seq, heads, rank, device="cuda", dtype=torch.bfloat16)
        q_rope = torch.randn(batch, seq, heads, rope, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(batch, total, rank + rope, device="cuda", dtype=torch.bfloat16)
        latent, k_rope = kv.split((rank, rope), dim=-1)
        indices, valid = _selection(batch, seq, total, topk, past)
        flops, nbytes = flops_and_bytes(batch, seq, heads, topk, rank, rope)
        configs = [dict()]
        if sweep and (batch, seq) in ((1, 4096), (1, 1), (8, 1)) and total < 100000:
            configs += [dict(block_n=bn, num_warps=w, num_stages=st) for bn in (32, 64) for w in (4, 8) for st in (1, 2, 3)]
        for cfg in configs:
            try:
                ms = _bench(lambda: sparse_mla_attention(q_latent, q_rope, latent, k_rope, indices, valid, 0.1, **cfg))
            except Exception as error:  # a config that does not fit (shared memory) is reported, not fatal
                results.append({"kernel": "sparse_mla", "case": name, "config": cfg, "error": str(error)[:200]})
                continue
            row = {"kernel": "sparse_mla", "case": name, "batch": batch, "seq": seq, "context": total, "topk": topk,
                   "config": cfg, "ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6}  # fmt: skip
            results.append(row)
            print(json.dumps(row), flush=True)
        # the PyTorch twin (absorbed form, same inputs) for comparison, where it fits comfortably
        if batch * seq * topk * (rank + rope) * 2 <= 8 << 30:
            q_nope = torch.randn(batch, seq, heads, 128, device="cuda", dtype=torch.bfloat16)
            selection = IndexSelection(indices, valid)
            import os

            os.environ["DEEPSEEK_V32_KERNELS"] = "0"
            with torch.no_grad():
                ms = _bench(lambda: attn._absorbed(q_nope, q_rope, latent, k_rope, selection, past, None), 5, 20)
            os.environ.pop("DEEPSEEK_V32_KERNELS")
            row = {"kernel": "sparse_mla_twin", "case": name, "batch": batch, "seq": seq, "context": total, "ms": ms}
            results.append(row)
            print(json.dumps(row), flush=True)


def bench_indexer(results, sweep):
    from modeling_deepseek_v32.fp8 import quantize_blockwise_1d
    from modeling_deepseek_v32.kernels.indexer_kernel import indexer_score_keys, lightning_indexer_topk

    heads, dim, topk = 64, 128, 2048
    cases = [("prefill", 4096, 0), ("prefill", 16384, 0), ("chunk", 2048, 30720), ("decode", 1, 32767),
             ("decode", 1, 131071)]  # fmt: skip
    for fp8 in (True, False):
        for name, seq, past in cases:
            total = past + seq
            q = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
            k = torch.randn(1, total, dim, device="cuda", dtype=torch.bfloat16)
            if fp8:
                q, q_scale = quantize_blockwise_1d(q, 128)
                k, k_scale = quantize_blockwise_1d(k, 128)
            else:
                q_scale = k_scale = None
            weights = torch.randn(1, seq, heads, device="cuda")
            # causal work only: pairs (s, t) with t <= past + s
            pairs = seq * past + seq * (seq + 1) / 2
            flops = 2 * pairs * heads * dim
            qs = None if q_scale is None else q_scale.reshape(1, seq, heads)
            ks = None if k_scale is None else k_scale.reshape(1, total)
            n_keys = max(topk, total)
            out = torch.empty(1, seq, n_keys, dtype=torch.int64, device="cuda")
            configs = [dict()]
            if sweep and fp8 and name in ("prefill", "decode") and total <= 32768 and seq != 16384:
                configs += [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                            for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for st in (2, 3)]  # fmt: skip
            for cfg in configs:
                if seq * n_keys * 8 > (4 << 30):
                    break
                try:
                    ms = _bench(lambda: indexer_score_keys(q, qs, k, ks, weights, past, None, 0, seq, n_keys, out, **cfg))
                except Exception as error:
                    results.append({"kernel": "indexer_scores", "case": name, "config": cfg, "error": str(error)[:200]})
                    continue
                row = {"kernel": "indexer_scores", "fp8": fp8, "case": name, "seq": seq, "context": total,
                       "config": cfg, "ms": ms, "tflops": flops / ms / 1e9,
                       "gbps": (q.numel() * q.element_size() + k.numel() * k.element_size() + out.numel() * 8) / ms / 1e6}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
            ms = _bench(lambda: lightning_indexer_topk(q, q_scale, k, k_scale, weights, past, None, topk), 5, 20)
            row = {"kernel": "indexer_topk_total", "fp8": fp8, "case": name, "seq": seq, "context": total, "ms": ms}
            results.append(row)
            print(json.dumps(row), flush=True)


def _chunked_selection(seq, topk, chunk=4096):
    """Random ``topk`` causal picks per query (all causal keys for the first ``topk``), built a chunk at a time."""
    indices, valid = [], []
    for start in range(0, seq, chunk):
        stop = min(seq, start + chunk)
        part = _selection(1, stop - start, stop, topk, start)
        indices.append(part[0])
        valid.append(part[1])
    return torch.cat(indices, 1), torch.cat(valid, 1)


def bench_masked(results, sweep):
    """Prefill attention at S = T: the masked expanded kernel over a bitmap of 2048 random picks per query vs the
    absorbed gathering kernel over the same lists; and the indexer's bitmap output vs its sorted top-k lists.
    Masked FLOPs count every causal pair it computes (tiles without a selected bit are skipped, but random picks
    leave none empty): 2 x 16 heads x (128 + 64 + 128) per pair."""
    from modeling_deepseek_v32.fp8 import quantize_blockwise_1d
    from modeling_deepseek_v32.indexer import indices_to_words
    from modeling_deepseek_v32.kernels.indexer_kernel import lightning_indexer_mask, lightning_indexer_topk
    from modeling_deepseek_v32.kernels.masked_mla_kernel import flops as masked_flops
    from modeling_deepseek_v32.kernels.masked_mla_kernel import masked_mla_attention
    from modeling_deepseek_v32.kernels.mla_kernel import flops_and_bytes, sparse_mla_attention

    heads, nope, rope, rank, topk = 16, 128, 64, 512, 2048
    for seq in (4096, 8192, 16384, 32768, 65536):
        indices, valid = _chunked_selection(seq, topk)
        q_nope = torch.randn(1, seq, heads, nope, device="cuda", dtype=torch.bfloat16)
        q_rope = torch.randn(1, seq, heads, rope, device="cuda", dtype=torch.bfloat16)
        k_rope = torch.randn(1, seq, rope, device="cuda", dtype=torch.bfloat16)
        pairs = seq * (seq + 1) / 2
        if seq <= 32768:
            words = indices_to_words(indices, valid, seq)
            kv = torch.randn(1, seq, heads, nope + 128, device="cuda", dtype=torch.bfloat16)
            k_nope, values = kv.split((nope, 128), dim=-1)
            configs = [dict()]
            if sweep and seq == 8192:
                configs += [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                            for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (1, 2, 3)]  # fmt: skip
            for cfg in configs:
                try:
                    ms = _bench(lambda: masked_mla_attention(q_nope, q_rope, k_nope, k_rope, values, words, 0.1, **cfg))
                except Exception as error:
                    results.append({"kernel": "masked_mla", "seq": seq, "config": cfg, "error": str(error)[:200]})
                    continue
                row = {"kernel": "masked_mla", "seq": seq, "config": cfg, "ms": ms,
                       "tflops": masked_flops(1, seq, heads, pairs) / ms / 1e9}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
            del kv, k_nope, values, words
        q_latent = torch.randn(1, seq, heads, rank, device="cuda", dtype=torch.bfloat16)
        latent = torch.randn(1, seq, rank, device="cuda", dtype=torch.bfloat16)
        ms = _bench(lambda: sparse_mla_attention(q_latent, q_rope, latent, k_rope, indices, valid, 0.1), 5, 20)
        row = {"kernel": "sparse_mla_same_selection", "seq": seq, "ms": ms,
               "tflops": flops_and_bytes(1, seq, heads, topk, rank, rope)[0] / ms / 1e9}  # fmt: skip
        results.append(row)
        print(json.dumps(row), flush=True)
        del q_latent, latent, indices, valid
        if seq <= 16384:
            q, q_scale = quantize_blockwise_1d(torch.randn(1, seq, 64, 128, device="cuda", dtype=torch.bfloat16), 128)
            k, k_scale = quantize_blockwise_1d(torch.randn(1, seq, 128, device="cuda", dtype=torch.bfloat16), 128)
            weights = torch.randn(1, seq, 64, device="cuda")
            args = (q, q_scale, k, k_scale, weights, 0, None, topk)
            for name, fn in (("indexer_topk_lists", lightning_indexer_topk), ("indexer_bitmap", lightning_indexer_mask)):
                ms = _bench(lambda: fn(*args), 3, 10)
                row = {"kernel": name, "fp8": True, "seq": seq, "ms": ms}
                results.append(row)
                print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()


def bench_fp8(results, sweep):
    from modeling_deepseek_v32.fp8 import FP8Linear
    from modeling_deepseek_v32.kernels.fp8_gemm import fp8_linear

    for m in (1, 8, 64, 512, 4096, 16384):
        for k, n in ((2048, 2816), (2048, 2048), (1408, 2048), (2048, 576)):
            dense = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            layer = FP8Linear.from_linear(dense)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            configs = [None]
            if sweep and m == 4096 and (k, n) == (2048, 2816):
                configs += [(bm, bn, w, st) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for st in (3, 4)]
            if sweep and m == 1 and (k, n) == (2048, 2816):
                configs += [(16, bn, w, st) for bn in (32, 64, 128) for w in (2, 4) for st in (3, 4, 5)]
            for cfg in configs:
                try:
                    ms = _bench(lambda: fp8_linear(x, layer.weight, layer.weight_scale_inv, None, cfg))
                except Exception as error:
                    results.append({"kernel": "fp8_gemm", "m": m, "config": cfg, "error": str(error)[:200]})
                    continue
                row = {"kernel": "fp8_gemm", "m": m, "k": k, "n": n, "config": cfg, "ms": ms,
                       "tflops": 2 * m * n * k / ms / 1e9, "gbps": (m * k * 2 + n * k + m * n * 2) / ms / 1e6}  # fmt: skip
                results.append(row)
                print(json.dumps(row), flush=True)
            ms_bf16 = _bench(lambda: dense(x))
            row = {"kernel": "bf16_matmul", "m": m, "k": k, "n": n, "ms": ms_bf16, "tflops": 2 * m * n * k / ms_bf16 / 1e9}
            results.append(row)
            print(json.dumps(row), flush=True)


def bench_moe(results, sweep):
    """One bench MoE layer's routed experts (64 x SwiGLU 2048 -> 1408, top-6): grouped kernel vs the per-expert loop
    (the loop's linears use cuBLAS bf16 / the FP8 GEMM kernel). Bytes: the weights of the experts that received
    tokens, read once, plus activations in and out; FLOPs: 3 GEMMs per routed slot."""
    import modeling_deepseek_v32.kernels as kernels
    from modeling_deepseek_v32.configuration import DeepseekV32Config
    from modeling_deepseek_v32.kernels.moe_kernel import grouped_experts
    from modeling_deepseek_v32.moe import DeepseekV32MoE

    for fp8 in (False, True):
        quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        config = DeepseekV32Config.from_preset("bench", quantization_config=quant if fp8 else None)
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            moe = DeepseekV32MoE(config).eval()
        torch.set_default_dtype(previous)
        if fp8:
            from modeling_deepseek_v32.fp8 import FP8Linear, quantize_weight_blockwise

            for module in moe.modules():
                if isinstance(module, FP8Linear):
                    w, s = quantize_weight_blockwise(torch.randn(module.weight.shape, device="cuda") * 0.02)
                    module.weight.data.copy_(w)
                    module.weight_scale_inv.data.copy_(s)
        hidden, inter, top_k, n_exp = config.hidden_size, config.moe_intermediate_size, 6, config.n_routed_experts
        for tokens in (1, 8, 64, 512, 4096, 8192):
            x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
            experts = torch.rand(tokens, n_exp, device="cuda").topk(top_k, dim=-1).indices
            weights = torch.rand(tokens, top_k, device="cuda")
            used = int(experts.unique().numel())
            flops = 2 * tokens * top_k * 3 * hidden * inter
            nbytes = used * 3 * hidden * inter * (1 if fp8 else 2) + tokens * hidden * (2 + 4)
            with torch.no_grad():
                moe.run_experts(x, weights, experts)  # builds the pointer tables
                tables = moe._grouped_moe_tables[1]
                configs = [None]
                if sweep and tokens in (1, 8192):
                    configs += [(16, 64, 64, 4, 4), (16, 32, 64, 4, 4), (16, 128, 128, 4, 4)] if tokens == 1 else [
                        (64, 64, 128, 4, 3), (128, 128, 128, 8, 3), (128, 64, 64, 4, 3), (64, 128, 128, 4, 4),
                        (128, 128, 128, 8, 4), (128, 128, 64, 8, 4), (128, 64, 128, 8, 4), (128, 256, 128, 8, 3)]
                for cfg in configs:
                    try:
                        ms = _bench(lambda: grouped_experts(x, weights, experts, tables, inter, fp8, cfg))
                    except Exception as error:
                        results.append({"kernel": "grouped_moe", "tokens": tokens, "config": cfg, "error": str(error)[:200]})
                        continue
                    row = {"kernel": "grouped_moe", "fp8": fp8, "tokens": tokens, "experts_used": used, "config": cfg,
                           "ms": ms, "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6}  # fmt: skip
                    results.append(row)
                    print(json.dumps(row), flush=True)
                kernels._broken.add("grouped_moe")  # time the twin loop (its linears still use the GEMM kernels)
                try:
                    ms = _bench(lambda: moe.run_experts(x, weights, experts), warmup=5, rep=20)
                finally:
                    kernels._broken.discard("grouped_moe")
                row = {"kernel": "moe_loop", "fp8": fp8, "tokens": tokens, "ms": ms, "tflops": flops / ms / 1e9}
                results.append(row)
                print(json.dumps(row), flush=True)
        del moe
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_kernels.json")
    parser.add_argument("--sweep", action="store_true", help="also time a few launch configurations")
    parser.add_argument("--only", default="mla,masked,indexer,fp8,moe")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    results = []
    start = time.time()
    for name in args.only.split(","):
        benches = {"mla": bench_mla, "masked": bench_masked, "indexer": bench_indexer, "fp8": bench_fp8, "moe": bench_moe}
        benches[name](results, args.sweep)
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seconds": time.time() - start}
    with open(args.out, "w") as handle:
        json.dump({"meta": meta, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
