#!/usr/bin/env bash
# GPU check for a lent machine (H200): install, run the Triton tests on the GPU (compiled kernels, not the
# interpreter), then time the Triton attention kernel against SDPA's flash backend for causal GQA in bf16,
# and the Triton MLA decode kernel over the latent cache against eager absorbed decode (DeepSeek-V3 shapes).
# Needs torch (CUDA), triton and transformers already installed (the machine has no network).
# Finishes in well under 10 minutes:   bash examples/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export TRITON_INTERPRET=0          # compiled kernels (tests/conftest.py would default to the interpreter)
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== install"
$PY -m pip install --no-deps --no-build-isolation -q -e . 2>/dev/null \
  || echo "(editable install failed offline; running from the source tree via PYTHONPATH)"
$PY - <<'PYEOF'
import torch, triton
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
PYEOF

echo "== Triton tests on the GPU"
timeout 360 $PY -m pytest -q -x -p no:cacheprovider \
  tests/backends/test_triton_kernels.py tests/backends/test_triton_lowering.py tests/backends/test_triton_spans.py \
  tests/backends/test_triton_mla.py

echo "== Triton kernel vs SDPA flash: causal GQA, bf16, batch 1, 32 q heads / 8 kv heads, head size 128"
timeout 180 $PY - <<'PYEOF'
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from rewrite.backends.triton import attention_forward

B, HQ, HK, D = 1, 32, 8, 128
kv_map = torch.arange(HQ, device="cuda") // (HQ // HK)  # HF repeat_kv order


import sys
sys.path.insert(0, "examples")
from gpu_timing import median_ms  # noqa: E402


def sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except RuntimeError:  # flash without native GQA in this torch: repeat the KV heads
            g = HQ // HK
            return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                  is_causal=True)


print(f"{'tokens':>7} {'triton ms':>10} {'sdpa-flash ms':>14} {'triton TFLOP/s':>15} {'flash/triton':>13} {'max err':>9}")
for S in (4096, 8192, 16384):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, HQ, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HK, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HK, S, D, device="cuda", dtype=torch.bfloat16, generator=g)

    def tri():
        return attention_forward(q, k, v, k_map=kv_map, v_map=kv_map, scale=D ** -0.5, causal=True)

    err = (tri().float() - sdpa(q, k, v).float()).abs().max().item()
    t_tri, t_ref = median_ms(tri), median_ms(lambda: sdpa(q, k, v))
    flops = 4 * B * HQ * S * S * D / 2  # QK^T and PV, causal half
    print(f"{S:>7} {t_tri:>10.3f} {t_ref:>14.3f} {flops / t_tri / 1e9:>15.1f} {t_ref / t_tri:>13.2f} {err:>9.3g}")
    del q, k, v
    torch.cuda.empty_cache()
print("ratio = SDPA-flash time / Triton time (> 1: the Triton kernel is faster)")
PYEOF

echo "== Triton kernel with streaming heads (local-heads): 75% of heads window 256 + 4 sinks vs all full, bf16"
timeout 120 $PY - <<'PYEOF'
import torch

from rewrite.backends.triton import attention_forward, attention_reference

B, HQ, HK, D = 1, 32, 8, 128
kv_map = torch.arange(HQ, device="cuda") // (HQ // HK)
window = torch.where(torch.arange(HQ) < HQ // 4, 0, 256)  # KV groups 0-1 full, 2-7 streaming
sinks = torch.where(window > 0, 4, 0)


import sys
sys.path.insert(0, "examples")
from gpu_timing import median_ms  # noqa: E402


for S in (2048, 8192):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, h, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (HQ, HK, HK))
    kw = dict(k_map=kv_map, v_map=kv_map, scale=D ** -0.5, causal=True)
    span = lambda: attention_forward(q, k, v, window=window, sinks=sinks, **kw)  # noqa: E731
    full = lambda: attention_forward(q, k, v, **kw)  # noqa: E731
    if S == 2048:
        err = (span().float() - attention_reference(q, k, v, window=window, sinks=sinks, **kw).float()).abs().max()
        print(f"max err vs reference: {err.item():.3g}")
    print(f"{S:>6} tokens: full {median_ms(full):.3f} ms, 75% streaming {median_ms(span):.3f} ms")
    del q, k, v
    torch.cuda.empty_cache()
PYEOF
echo "== Triton MLA decode over the latent cache vs eager absorbed decode: DeepSeek-V3 shapes, bf16"
echo "   (128 heads, kv_rank 512, one shared RoPE key of 64; one new token; left padding on the first sequence)"
timeout 150 $PY - <<'PYEOF'
import torch

from rewrite.backends.triton.mla import head_table, mla_attention, mla_reference

H, R, DR = 128, 512, 64
SCALE = (128 + 64) ** -0.5
rope_map = torch.zeros(H, dtype=torch.long, device="cuda")
heads = head_table(rope_map, 1)  # once per site, as LatentTritonSite does


import sys
sys.path.insert(0, "examples")
from gpu_timing import median_ms  # noqa: E402


def eager(q_lat, q_rope, c, kr, keep):  # rewrite.latent.LatentAttention.absorbed's core, bf16 matmuls
    s = (q_lat @ c.transpose(-1, -2) + q_rope @ kr.transpose(-1, -2)) * SCALE
    s = s.masked_fill(~keep[:, None, None, :], torch.finfo(s.dtype).min)
    return torch.softmax(s.float(), -1).to(c.dtype) @ c


print(f"{'batch':>5} {'tokens':>7} {'triton ms':>10} {'eager ms':>9} {'eager/triton':>13} {'cache GB/s':>11} "
      f"{'err vs fp32':>12}")
for B, T in ((1, 4096), (1, 32768), (16, 4096), (16, 32768)):
    g = torch.Generator(device="cuda").manual_seed(0)
    q_lat, q_rope = (torch.randn(B, H, 1, d, device="cuda", dtype=torch.bfloat16, generator=g) for d in (R, DR))
    c = torch.randn(B, 1, T, R, device="cuda", dtype=torch.bfloat16, generator=g)
    kr = torch.randn(B, 1, T, DR, device="cuda", dtype=torch.bfloat16, generator=g)
    keep = torch.ones(B, T, dtype=torch.bool, device="cuda")
    keep[0, : T // 4] = False
    kw = dict(rope_map=rope_map, scale=SCALE, key_padding_mask=keep)
    tri = lambda: mla_attention(q_lat, q_rope, c, kr, heads=heads, **kw)  # noqa: E731
    ref = mla_reference(q_lat.float(), q_rope.float(), c.float(), kr.float(), **kw)
    err = (tri().float() - ref).abs().max().item()
    assert err < 2e-2, f"MLA kernel error {err:.3g} at batch {B}, {T} tokens"
    t_tri, t_eager = median_ms(tri), median_ms(lambda: eager(q_lat, q_rope, c, kr, keep))
    gbs = (c.numel() + kr.numel()) * 2 / t_tri / 1e6
    print(f"{B:>5} {T:>7} {t_tri:>10.3f} {t_eager:>9.3f} {t_eager / t_tri:>13.2f} {gbs:>11.1f} {err:>12.3g}")
    del q_lat, q_rope, c, kr, ref
    torch.cuda.empty_cache()
print("ratio = eager time / Triton time (> 1: the Triton kernel is faster); cache GB/s = latent + RoPE key bytes read")
PYEOF
echo "== done"
