"""A small run of the CUDA attention kernels for compute-sanitizer (out-of-bounds and misaligned accesses,
races in shared memory with --tool racecheck): forward and backward (the fused-dQ backward in float16, the
deterministic one in bfloat16), every compiled head dim, causal, key lengths with a zero, GQA, dropout, sizes
that leave partial tiles.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_attention.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_attention.py

torch's caching allocator carves these small tensors out of 2 MiB blocks, where an access past a tensor's end
still lands in memory the driver handed out, so memcheck would miss it; the script turns caching off (before
torch is imported) so that every tensor is an allocation of its own.
"""

import os

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

import tfm_kernels  # noqa: E402
from tfm_kernels import rng  # noqa: E402


def main():
    info = tfm_kernels.build_info()
    if not info.get("cuda") or not torch.cuda.is_available():
        raise SystemExit(f"needs the CUDA build and a GPU; build_info={info}")
    head_dims = [int(d) for d in info["head_dims"].split(",")]
    B, Hq, Hk, L, S = 3, 4, 2, 37, 70
    lengths = torch.tensor([S, 0, 23], device="cuda")
    for dtype, deterministic in ((torch.float16, False), (torch.bfloat16, True)):
        torch.use_deterministic_algorithms(deterministic, warn_only=True)  # fused-dQ backward, then three-pass
        for head_dim in head_dims:
            for is_causal in (False, True):
                q, k, v = (torch.randn(B, h, n, head_dim, dtype=dtype, device="cuda", requires_grad=True)
                           for h, n in ((Hq, L), (Hk, S), (Hk, S)))
                out, _ = torch.ops.tfm_kernels.attention_forward(q, k, v, None, lengths, 0.25, is_causal,
                                                                 head_dim**-0.5, rng.draw_seed("cuda"))
                out.backward(torch.randn_like(out))
                torch.cuda.synchronize()
                assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    print(f"sanitize_attention: ran forward and both backwards for head dims {head_dims}")


if __name__ == "__main__":
    main()
