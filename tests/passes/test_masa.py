"""masa: exact with atoms = layers on the whole support matrix; parameter counts with fewer atoms; shared
atoms really shared; drift grouping; export; lossy error on the real MiniLM; refusals."""
import pytest
import torch
from torch import nn

import models as M
from models import first_output
import rewrite
from rewrite.errors import PassError, SpecError
from rewrite.graph import count_params
from rewrite.passes.masa import SharedAtoms, drift_groups, matrix_pca
from test_roundtrip import CASES

TOL = 1e-5
MATRIX = M.support_matrix()


def converted(name):
    return M.converted_case(name, f"masa{{atoms={CASES[name][2]}}}")


@pytest.mark.parametrize("name", MATRIX)
def test_atoms_equal_to_layers_is_exact_at_other_shapes(name):
    model, conv = converted(name)
    n_sites = CASES[name][2]
    stage = conv.report.to_json()["stages"][-1]
    if n_sites == 1:  # one layer: nothing to share, said so
        assert stage["sites_changed"] == 0 and "group 0-0 has one layer" in stage["diagnostics"][0]
        return
    assert stage["sites_changed"] == n_sites
    inputs = M.case_inputs(name, 3, 13, True)
    with torch.no_grad():
        ref, out = first_output(model, inputs), first_output(conv, inputs)
    assert float((ref - out).abs().max()) <= TOL * max(1.0, float(ref.abs().max())), name
    errs = [v for site in stage["stats"].values() if isinstance(site, dict) for k, v in site.items()
            if k.endswith("_rel_err")]
    assert len(errs) == 4 * n_sites and max(errs) < 1e-5


def test_default_atoms_is_exact_and_verified():
    conv = rewrite.convert(M.llama(2), "masa", example_inputs={"input_ids": M.ids()}, progress=False)
    stage = conv.report.to_json()["stages"][-1]
    assert stage["exact"] and stage["max_abs_err"] < 1e-5


def test_fewer_atoms_save_the_expected_parameters_and_share_one_dictionary():
    torch.manual_seed(0)
    model = M.llama(2, layers=4)  # wq, wo: 64·64 per layer; wk, wv: 2·16·64
    conv = rewrite.convert(model, "masa{atoms=2}", example_inputs={"input_ids": M.ids()}, progress=False)
    report = conv.report.to_json()
    L, S = 4, 2
    expected = sum((L - S) * p - L * S for p in (64 * 64, 32 * 64, 32 * 64, 64 * 64))
    assert report["stages"][0]["params"] - report["stages"][-1]["params"] == expected
    assert report["stages"][-1]["stats"]["params_saved"] == expected
    ops = conv.sites
    for name in ("wq", "wk", "wv", "wo"):
        shared = {id(op.weights.shared[name]) for op in ops}
        assert len(shared) == 1  # one SharedAtoms module for the whole group
        assert ops[0].weights.shared[name].atoms.shape == (S, *getattr(ops[0], name).shape)
    assert count_params(conv.gm) == report["stages"][-1]["params"]
    # biases stay per layer: the op still reads the original q weight shape and its own (absent) biases
    assert ops[0].wq.shape == (4, 16, 64) and "wq" not in dict(ops[0].named_parameters(recurse=False))
    errs = [report["stages"][-1]["stats"][op.info.name]["wq_rel_err"] for op in ops]
    assert all(0 < e < 1 for e in errs)


def test_matrix_pca_reconstructs_the_top_subspace():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 5, 7, generator=g) for _ in range(4)]
    atoms, coeff = matrix_pca(ws, 4)
    rebuilt = SharedAtoms(atoms, coeff)
    for i, w in enumerate(ws):
        assert torch.allclose(rebuilt(i), w, atol=1e-5)
    atoms, coeff = matrix_pca(ws, 1)
    flat = torch.stack([w.reshape(-1) for w in ws], 1).double()
    u = torch.linalg.svd(flat, full_matrices=False).U[:, :1]
    best = u @ (u.T @ flat)  # the optimal rank-1 fit (Eckart-Young)
    ours = torch.stack([SharedAtoms(atoms, coeff)(i).reshape(-1) for i in range(4)], 1).double()
    assert torch.allclose(ours, best, atol=1e-4)
    # a rank-deficient group (two equal layers) keeps only the atoms it needs and stays exact
    atoms, coeff = matrix_pca([ws[0], ws[0], ws[1]], 3)
    assert atoms.shape[0] == 2 and torch.allclose(SharedAtoms(atoms, coeff)(1), ws[0], atol=1e-5)


def test_exported_program_keeps_the_sharing_and_matches():
    torch.manual_seed(0)
    model = M.llama(2, layers=3)
    conv = rewrite.convert(model, "masa{atoms=2}", example_inputs={"input_ids": M.ids()}, progress=False)
    ep = conv.exported_program()
    x = M.ids(3, 11, seed=1)
    with torch.no_grad():
        assert torch.allclose(ep.module()(input_ids=x, use_cache=False).logits, conv(x).logits, atol=1e-5)
    atoms = {t.data_ptr() for k, t in ep.state_dict.items() if k.endswith("shared.wq.atoms")}
    assert len(atoms) == 1


def test_drift_groups_cut_at_jumps_and_keep_groups_larger_than_atoms():
    assert drift_groups([0.1, 0.1, 0.9, 0.1, 0.1], 1) == [[0, 1, 2], [3, 4, 5]]
    assert drift_groups([0.1, 0.1, 0.9, 0.1, 0.1], 3) == [[0, 1, 2, 3, 4, 5]]
    assert drift_groups([0.5, 0.1, 0.1, 0.1, 0.1], 1) == [[0, 1, 2, 3, 4, 5]]  # a lone layer joins its neighbour
    assert drift_groups([0.1, 0.1, 0.1, 0.1, 0.1], 1) == [[0, 1, 2, 3, 4, 5]]  # no jump, no cut


def test_group_auto_needs_calibration_and_reports_its_groups():
    torch.manual_seed(0)
    model = M.llama(2, layers=4)
    ex = {"input_ids": M.ids()}
    with pytest.raises(PassError, match="needs calibration"):
        rewrite.convert(model, "masa{atoms=1,group=auto}", example_inputs=ex, progress=False)
    conv = rewrite.convert(model, "masa{atoms=1,group=auto}", example_inputs=ex,
                           calibration=[{"input_ids": M.ids(2, 8, seed=s)} for s in range(2)], progress=False)
    groups = conv.report.to_json()["stages"][-1]["stats"]["groups"]
    covered = [i for g in groups for i in range(int(g.split("-")[0]), int(g.split("-")[1]) + 1)]
    assert covered == [0, 1, 2, 3] and all(g.split("-")[0] != g.split("-")[1] for g in groups)


def test_lossy_error_on_minilm_is_reported_per_layer():
    import test_roundtrip as R

    model = M.minilm()
    conv = rewrite.convert(model, "masa{atoms=3}", example_inputs=R._hf_inputs(2, 8), progress=False)
    stage = conv.report.to_json()["stages"][-1]
    before = conv._captured.gm.rewrite_sites  # the captured stage's ops
    for name in ("wq", "wk", "wv", "wo"):
        w = [getattr(before.get_submodule(str(i)), name).detach().double() for i in range(6)]
        w_hat = [getattr(op, name).detach().double() for op in conv.sites]
        errs = [float((a - b).norm() / a.norm()) for a, b in zip(w, w_hat)]
        reported = [stage["stats"][f"encoder.layer.{i}.attention"][f"{name}_rel_err"] for i in range(6)]
        assert reported == pytest.approx(errs, abs=1e-4)
        # uncentred PCA keeps the top 3 of 6 directions: at least half of the group's energy
        lost = sum(float((a - b).norm() ** 2) for a, b in zip(w, w_hat)) / sum(float(a.norm() ** 2) for a in w)
        assert 0.05 < lost <= 0.5 + 1e-6
    expected = 4 * (3 * 384 * 384 - 6 * 3)
    assert stage["params"] == conv.report.stages[0].params - expected
    assert 0.2 < stage["cosine"] < 0.99  # lossy without refinement or distillation (see test_distill)


class TwoWidths(nn.Module):
    """Two self-attention layers with different head counts: wq shapes differ."""

    def __init__(self):
        super().__init__()
        self.a = nn.MultiheadAttention(64, 4, batch_first=True)
        self.b = nn.MultiheadAttention(64, 8, batch_first=True)

    def forward(self, x):
        x = x + self.a(x, x, x, need_weights=False)[0]
        return x + self.b(x, x, x, need_weights=False)[0]


def test_refusals():
    ex = {"input_ids": M.ids()}
    with pytest.raises(SpecError, match="atoms=3 exceeds the 2 layers of group 0-1"):
        rewrite.convert(M.llama(2), "masa{atoms=3}", example_inputs=ex, progress=False)
    with pytest.raises(SpecError, match="atoms must be at least 1"):
        rewrite.convert(M.llama(2), "masa{atoms=0}", example_inputs=ex, progress=False)
    with pytest.raises(SpecError, match="group must be 'all' or 'auto'"):
        rewrite.parse_pipeline("masa{group=layers}")[0].check_options()
    conv = rewrite.convert(TwoWidths().eval(), "masa", example_inputs=(torch.randn(2, 8, 64),), progress=False)
    stage = conv.report.to_json()["stages"][-1]
    assert stage["sites_changed"] == 0
    assert any("wq shapes differ within group 0-1" in d for d in stage["diagnostics"])
