"""Head pruning on MiniLM by importance: taylor (whole-model gradient) vs taylor-local (each site's own output,
streamable) vs entropy. Mean cosine of sentence embeddings on 300 held-out sentences, calibration 32 others.

    python examples/prune_importance.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import models as M
from rewrite.models import sentences
from rewrite.pass_base import PassContext
enc, text = M.minilm_tokenizer(32), sentences()
gm, cap = M.canonical_graph(M.minilm(), enc(text[:2]))
calib = [enc(text[i:i + 16]) for i in range(0, 32, 16)]
held_out = sorted(text[100:400], key=len)
batches = [enc(held_out[i:i + 100]) for i in range(0, 300, 100)]
fid = M.embedding_fidelity(gm, PassContext(calibration=calib, captured=cap), batches)
for r in (0.25, 0.5):
    for imp in ("taylor", "taylor-local", "entropy"):
        print(r, imp, round(fid(f"prune-heads{{ratio={r},importance={imp}}}"), 3), flush=True)
