"""The stock DeepSeek-V3 folder (``model_type: deepseek_v3``) of a LLaMA-like decoder converted to MLA.

Every layer's MLP is dense (``first_k_dense_replace = num_hidden_layers``), the query is full rank
(``q_lora_rank = None``), and per site, with r = kv_rank, dn/dr/dv the nope/RoPE/value head dims:

- ``q_proj`` = [W_q^nope; W_q^rope] per head, times scale/(dn + dr)^-0.5 (DeepSeek's softmax scale);
- ``kv_a_proj_with_mqa`` = [W_dkv; 0; W_kr] with bias [b_dkv; M; b_kr]: the latent gets one constant channel M;
- ``kv_a_layernorm``: DeepSeek always applies RMSNorm to the latent. With weight M/sqrt(r+1) on the r real
  channels (0 on the constant one), RMSNorm([c; M]) = c·M/sqrt(M² + ‖c‖² + (r+1)ε) ≈ c (relative error
  ≈ ‖c‖²/(2M²)); M = 2^14 (exact in fp16 and bf16), so ``kv_lora_rank = r + 1``;
- ``kv_b_proj`` = [W_uk; W_uv] per head, 0 on the constant channel. b_uk adds q_nope·b_uk, the same for every
  key, which softmax ignores: dropped (exact). b_uv folds into the ``o_proj`` bias: b_o + Σ_i W_o^i b_uv^i;
- RoPE: the shared key keeps the first dr/2 frequency pairs of the source's rotary dims rd; DeepSeek's RoPE over
  ``qk_rope_head_dim = dr`` with theta' = theta^(dr/rd) has exactly those frequencies
  (theta'^(-2j/dr) = theta^(-2j/rd)); ``rope_interleave`` follows the source layout.

``deepseek_stock(conv, model)`` gives (config, state dict) or (None, the reason it cannot be expressed).
"""
from __future__ import annotations

import math
import re

import torch

from .graph import sites
from .latent import is_latent

__all__ = ["deepseek_stock", "CONSTANT", "remapped_theta"]

CONSTANT = 2.0 ** 14  # the latent's constant channel M
ATTN = ("q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias", "kv_a_layernorm.weight",
        "kv_b_proj.weight", "o_proj.weight", "o_proj.bias")


def remapped_theta(theta: float, rope_dims: int, rotary_dims: int) -> float:
    """theta' with theta'^(-2j/rope_dims) = theta^(-2j/rotary_dims): the first rope_dims/2 frequencies."""
    return float(theta) ** (rope_dims / rotary_dims)


def _first_pairs(op, base) -> bool:
    """The site's RoPE is the source's on its first dr/2 frequency pairs, laid out as DeepSeek reads them."""
    from .passes.mla import PartialRope, _pairs

    dr, rd = op.rope_dim, base.info.rotary_dims
    if op.q_rope is base.q_transform and op.k_rope is base.k_transform:
        return dr == rd == base.head_dim
    if not (isinstance(op.q_rope, PartialRope) and isinstance(op.k_rope, PartialRope)) \
            or op.q_rope.transform is not base.q_transform or op.k_rope.transform is not base.k_transform:
        return False
    if _pairs(base) is None:
        return False
    want = _pairs(base)[:dr // 2].reshape(-1).sort().values
    return all(torch.equal(idx, want) for idx in (*op.q_rope.index, *op.k_rope.index))


def _site_refusal(op, base):
    name = op.info.name
    checks = [
        (op.rope_dim == 0, "no RoPE key (qk_rope_head_dim = 0)"),
        (op.rope_heads != 1 or bool(op.rope_map.any()),
         f"{op.rope_heads} RoPE key heads (mha2mla keeps one per KV head); DeepSeek-V3 has one shared RoPE key: "
         "use mla{method=transmla}"),
        (op.w_dq is not None or op.q_norm is not None, "a low-rank query from a conversion"),
        (op.b_q is not None, "a query bias (DeepSeek's q_proj has none)"),
        (op.kv_norm is not None, "a latent norm from a conversion"),
        (op.softcap or op.window is not None or op.sinks is not None or op.score_fn is not None
         or op.head_gate is not None, "a score modifier, span, sink or gate"),
        (not (op.causal or op.info.causal_mask), "non-causal attention"),
        (base.info.rope not in ("rotate_half", "interleaved") or base.info.qk_norm, "no plain RoPE"),
        (op.q_rope is not None and not _first_pairs(op, base),
         "RoPE on other frequency pairs than the first rope_dims/2 (the only ones DeepSeek's RoPE expresses)"),
    ]
    for bad, why in checks:
        if bad:
            return f"{name}: the DeepSeek-V3 form cannot hold {why}"
    return None


def _rms_like(mod, eps: float) -> bool:
    w = getattr(mod, "weight", None)
    if w is None or w.dim() != 1 or getattr(mod, "bias", None) is not None:
        return False
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    with torch.no_grad():
        return torch.allclose(mod(x), w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps), rtol=1e-5, atol=1e-6)


def _swiglu_like(mod, act) -> bool:
    parts = [getattr(mod, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(not isinstance(p, torch.nn.Linear) or p.bias is not None for p in parts):
        return False
    x = torch.randn(3, parts[0].in_features, generator=torch.Generator().manual_seed(0), dtype=parts[0].weight.dtype)
    with torch.no_grad():
        return torch.allclose(mod(x), parts[2](act(parts[0](x)) * parts[1](x)), rtol=1e-5, atol=1e-6)


def _body_refusal(model, layers: list):
    """Why the source's non-attention parts are not LLaMA's (RMSNorm, SwiGLU MLP), or None."""
    from transformers.activations import ACT2FN

    cfg = model.config
    eps, act = getattr(cfg, "rms_norm_eps", None), getattr(cfg, "hidden_act", None)
    if eps is None or act not in ACT2FN:
        return f"{cfg.model_type}: no rms_norm_eps/hidden_act in its config (not a LLaMA-like decoder)"
    prefix = layers[0].rsplit(".", 2)[0]  # "model.layers"
    mods = dict(model.named_modules())
    for layer in layers:
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not _rms_like(mods.get(f"{layer}.{norm}"), eps):
                return f"{layer}.{norm} is not an RMSNorm w·x/rms(x) with eps={eps} (DeepSeek-V3 has only those)"
        if not _swiglu_like(mods.get(f"{layer}.mlp"), ACT2FN[act]):
            return f"{layer}.mlp is not down(act(gate(x))·up(x)) without biases (DeepSeek-V3's dense MLP)"
    final = prefix.rsplit(".", 1)[0] + ".norm"
    if not _rms_like(mods.get(final), eps):
        return f"{final} is not an RMSNorm with eps={eps}"
    return None


def _attention_state(op, prefix: str) -> dict:
    h, dqk, d = op.w_q.shape
    r, dr, dn, dv = op.kv_rank, op.rope_dim, op.nope_dim, op.v_head_dim
    fold = op.scale / (dn + dr) ** -0.5
    zero = op.w_dkv.new_zeros
    b_dkv = zero(r) if op.b_dkv is None else op.b_dkv.detach()
    b_kr = zero(dr) if op.b_kr is None else op.b_kr.detach()[0]
    kv_b = torch.cat([op.w_uk.detach(), op.w_uv.detach()], dim=1)  # [H, dn + dv, r]
    bo = zero(op.wo.shape[0]) if op.bo is None else op.bo.detach()
    if op.b_uv is not None:
        bo = bo + torch.einsum("ohd,hd->o", op.wo.detach(), op.b_uv.detach())
    values = [(op.w_q.detach() * fold).reshape(h * dqk, d),
              torch.cat([op.w_dkv.detach(), zero(1, d), op.w_kr.detach()[0]]),
              torch.cat([b_dkv, b_dkv.new_full((1,), CONSTANT), b_kr]),
              torch.cat([b_dkv.new_full((r,), CONSTANT / math.sqrt(r + 1)), zero(1)]),
              torch.cat([kv_b, zero(h, dn + dv, 1)], dim=2).reshape(h * (dn + dv), r + 1),
              op.wo.detach().reshape(op.wo.shape[0], h * dv), bo]
    return {f"{prefix}.{k}": v.contiguous() for k, v in zip(ATTN, values)}


def deepseek_stock(conv, model):
    """(DeepseekV3Config, state dict) of the converted decoder, or (None, the reason it cannot be written)."""
    import transformers

    ops, base_ops = conv.sites, sites(conv._captured.gm)
    for op, base in zip(ops, base_ops):
        if not is_latent(op) or is_latent(base):
            return None, f"{op.info.name}: a DeepSeek-V3 folder needs every site converted by mla (this one is not)"
        why = _site_refusal(op, base)
        if why:
            return None, why
    shapes = {(op.q_heads, op.kv_rank, op.nope_dim, op.rope_dim, op.v_head_dim) for op in ops}
    if len(shapes) > 1:
        return None, f"the latent shapes differ between layers ({sorted(shapes)}); one DeepSeek-V3 config holds one"
    names = [op.info.name for op in ops]
    if not all(re.fullmatch(r"model\.layers\.\d+\.self_attn", n) for n in names) or \
            names != [f"model.layers.{i}.self_attn" for i in range(len(names))]:
        return None, f"{names[0]}: the sites are not model.layers.<i>.self_attn in order (DeepSeek-V3's names)"
    src = model.config
    rope = dict(getattr(src, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        return None, (f"{src.model_type}: RoPE type {rope['rope_type']!r}; only the default RoPE is remapped to "
                      "DeepSeek's qk_rope_head_dim")
    why = _body_refusal(model, [n.rsplit(".", 1)[0] for n in names])
    if why:
        return None, why
    (h, r, dn, dr, dv), = shapes
    rd = base_ops[0].info.rotary_dims
    config = transformers.DeepseekV3Config(
        vocab_size=src.vocab_size, hidden_size=src.hidden_size, intermediate_size=src.intermediate_size,
        num_hidden_layers=len(ops), first_k_dense_replace=len(ops), num_attention_heads=h, num_key_value_heads=h,
        q_lora_rank=None, kv_lora_rank=r + 1, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv,
        hidden_act=src.hidden_act, max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
        initializer_range=getattr(src, "initializer_range", 0.02), tie_word_embeddings=src.tie_word_embeddings,
        bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id, pad_token_id=src.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": remapped_theta(rope.get("rope_theta", 10000.0), dr, rd)},
        rope_interleave=base_ops[0].info.rope == "interleaved", attention_bias=True, attention_dropout=0.0,
        num_mtp_layers=0, architectures=["DeepseekV3ForCausalLM"])
    state = {k: v for k, v in conv.hf_model().state_dict().items() if not any(k.startswith(n + ".") for n in names)}
    for op in ops:
        state.update(_attention_state(op, op.info.name))
    from .hf_checkpoint import build_model

    want = set(build_model(config, meta=True).state_dict())
    if set(state) != want:
        odd = sorted(set(state) ^ want)
        return None, f"{odd[0]}: {'not in' if odd[0] in state else 'missing from'} the DeepSeek-V3 model's tensors"
    return config, state
