"""The fused memory head (Triton) against the torch reference head, and the ``momkd::memory_head`` dispatch.

Without CUDA the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set here before the kernel module
is imported) on tiny CPU tensors; the tests marked ``gpu`` run it compiled, at full size, on a CUDA device.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # tests/conftest.py sets it first in a full run
triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not CUDA and not isinstance(triton.language.max, InterpretedFunction):
    pytest.skip("Triton was imported before TRITON_INTERPRET=1 was set; its interpreter cannot run here",
                allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

from momkd.config import preset  # noqa: E402
from momkd.export.frozen import FrozenEnsemble  # noqa: E402
from momkd.graph import neighbor_table  # noqa: E402
from momkd.kernels import memory_head as kernel  # noqa: E402
from momkd.kernels import ops  # noqa: E402
from momkd.models import build_model  # noqa: E402
from momkd.kernels.reference import head_reference  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def head_inputs(sizes: list[int], dim: int = 8, proj_dim: int = 4, n_codes: int = 3, seed: int = 0,
                device: str = "cpu") -> tuple:
    """Random embeddings (N, dim), projection, unit codes and offsets for packed slides of ``sizes`` rows."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    emb = torch.randn(n, dim, generator=g) * 2
    weight = torch.randn(proj_dim, dim, generator=g) / dim ** 0.5
    bias = torch.randn(proj_dim, generator=g) * 0.1
    pos = F.normalize(torch.randn(n_codes, proj_dim, generator=g), dim=-1)
    neg = F.normalize(torch.randn(n_codes + 2, proj_dim, generator=g), dim=-1)
    offsets = torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64)
    return tuple(t.to(device) for t in (emb, weight, bias, pos, neg, offsets))


def assert_matches(fused: tuple, ref, atol: float = 1e-5) -> None:
    score, attention, pooled = fused
    for name, got, want in (("score", score, ref.score), ("attention", attention, ref.attention),
                            ("pooled", pooled, ref.pooled)):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        err = (got.float() - want.float()).abs().max().item() if got.numel() else 0.0
        assert err <= atol, f"{name}: max |diff| {err:.3g} > {atol:g}"


# --------------------------------------------------------------------------- interpreter (CPU) or GPU, tiny sizes
@pytest.mark.parametrize("tau", [0.2, 0.01, 2.0, 1e-3])
def test_fused_matches_reference_on_packed_slides(tau: float) -> None:
    """Several slides per pack: a 1-patch slide, an empty slide, slides spanning several row blocks."""
    args = head_inputs([5, 1, 40, 0, 17], device=DEVICE)
    ref = head_reference(*args, tau)
    assert_matches(kernel.fused_memory_head(*args, tau, block_n=16), ref)
    assert torch.all(ref.pooled[3] == 0)  # the empty slide pools to zeros in both


def test_fused_single_one_patch_slide_and_odd_dims() -> None:
    """D, D_N and the bank sizes far from the 16-wide tiles; a pack that is one 1-patch slide."""
    for sizes in ([1], [3, 1, 1]):
        args = head_inputs(sizes, dim=40, proj_dim=20, n_codes=5, seed=1, device=DEVICE)
        assert_matches(kernel.fused_memory_head(*args, torch.tensor(0.3)), head_reference(*args, 0.3))


def test_fused_combines_many_blocks_of_one_slide() -> None:
    """More partial blocks in one slide than the combine step takes at once (BLOCK_P)."""
    rows = 16 * (kernel.BLOCK_P + 3) - 5
    args = head_inputs([rows, 2], dim=16, seed=2, device=DEVICE)
    assert_matches(kernel.fused_memory_head(*args, 0.2, block_n=16), head_reference(*args, 0.2))


def test_fused_fp16_operands_stay_close() -> None:
    """fp16 embeddings: projection with fp16 operands (fp32 accumulation); outputs in fp16."""
    args = head_inputs([30, 1, 9], dim=32, proj_dim=16, seed=3, device=DEVICE)
    emb16 = args[0].half()
    score, attention, pooled = kernel.fused_memory_head(emb16, *args[1:], 0.2)
    assert score.dtype == attention.dtype == pooled.dtype == torch.float16
    ref = head_reference(emb16.float(), *args[1:], 0.2)
    assert (score.float() - ref.score).abs().max() < 1e-2
    assert (attention.float() - ref.attention).abs().max() < 2e-2 * ref.attention.max()
    assert (pooled.float() - ref.pooled).abs().max() < 1e-2 * ref.pooled.abs().max()


def test_bad_inputs_are_one_line_errors() -> None:
    emb, weight, bias, pos, neg, offsets = head_inputs([4], device=DEVICE)
    cases = [
        ((emb[0], weight, bias, pos, neg, offsets), "embeddings must be"),
        ((emb, weight[:, :3], bias, pos, neg, offsets), "projection must be"),
        ((emb, weight, bias, pos[:, :2], neg, offsets), "codes_pos must be"),
        ((emb, weight, bias, pos, neg, offsets[:1]), "slide_offsets must be"),
        ((emb.double(), weight, bias, pos, neg, offsets), "float32, float16 or bfloat16"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            kernel.fused_memory_head(*args, 0.2)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        kernel.fused_memory_head(emb, weight, bias, pos, neg, offsets, 0.2, block_n=24)
    with pytest.raises(ValueError, match="input_precision must be"):
        kernel.fused_memory_head(emb, weight, bias, pos, neg, offsets, 0.2, input_precision="fp8")


# --------------------------------------------------------------------------- the operator and its dispatch (CPU)
def test_operator_default_is_the_reference_and_passes_opcheck() -> None:
    args = head_inputs([6, 1, 11])
    tau = ops.tau_tensor(0.2, args[0])
    ref = head_reference(*args, 0.2)
    got = ops.memory_head(*args, tau)
    assert all(torch.equal(a, b) for a, b in zip(got, (ref.score, ref.attention, ref.pooled)))
    torch.library.opcheck(ops.memory_head, (*args, tau))


def test_dispatch_reference_for_training_cpu_and_export_operator_for_tracing() -> None:
    emb, weight = torch.randn(5, 8), torch.randn(4, 8, requires_grad=True)
    assert not ops.use_operator(emb, weight, 0.2)  # CPU eager
    assert not ops.use_operator(emb, weight, torch.tensor(0.2))
    with torch.no_grad():
        assert not ops.use_operator(emb, weight, 0.2)  # CPU eager inference: the reference inline
    cuda_like = torch.empty(5, 8, device="meta")
    assert not ops.use_operator(cuda_like, weight.detach(), 0.2)  # neither CUDA nor tracing


def test_trace_records_the_operator_and_runs_the_reference_on_cpu(monkeypatch) -> None:
    """A frozen model traced for the torch backend holds ``momkd::memory_head``; on CPU it equals eager."""
    cfg = preset("paper")[0].replace(dim=8, heads=2, proj_dim=4, n_codes=3)
    torch.manual_seed(0)
    frozen = FrozenEnsemble([build_model(cfg, 12, 0), build_model(cfg.replace(learnable_tau=True), 12, 0)])
    rng = np.random.default_rng(0)
    sizes = [9, 1, 14]
    features = torch.from_numpy(rng.standard_normal((sum(sizes), 12)).astype(np.float32))
    tables, start = [], 0
    for n in sizes:
        coords = np.stack([np.arange(n) % 4, np.arange(n) // 4], 1).astype(np.int64) * 256
        t = neighbor_table(coords, k=4)
        tables.append(np.where(t >= 0, t + start, -1))
        start += n
    neighbors = torch.from_numpy(np.concatenate(tables))
    offsets = torch.tensor([0, *np.cumsum(sizes).tolist()])
    with torch.no_grad():
        traced = torch.jit.trace(frozen, (features, neighbors, offsets), check_trace=False)
        eager = frozen(features, neighbors, offsets)
        assert str(traced.inlined_graph).count("momkd::memory_head") == 2
        out = traced(features, neighbors, offsets)
    for a, b in zip(out, eager):
        assert torch.allclose(a, b, atol=1e-6)
    monkeypatch.setitem(sys.modules, "momkd.kernels.memory_head", None)  # CPU never needs the kernel module
    with torch.no_grad():
        assert torch.allclose(traced(features, neighbors, offsets)[0], eager[0], atol=1e-6)


# --------------------------------------------------------------------------- GPU: compiled kernel at full size
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("sizes", [[20000], [5000, 1, 14999, 0, 20000], [200000]])
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_gpu_fp32_parity_full_size(sizes: list[int], precision: str) -> None:
    args = head_inputs(sizes, dim=256, proj_dim=128, n_codes=16, seed=4, device="cuda")
    with torch.no_grad():
        ref = head_reference(*args, 0.2)
        assert_matches(kernel.fused_memory_head(*args, 0.2, input_precision=precision), ref, atol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("block_n,num_warps", [(32, 4), (64, 4), (64, 8), (128, 8)])
def test_gpu_launch_configs_agree(block_n: int, num_warps: int) -> None:
    args = head_inputs([7000, 1, 3000], dim=512, proj_dim=64, n_codes=16, seed=5, device="cuda")
    with torch.no_grad():
        assert_matches(kernel.fused_memory_head(*args, 0.05, block_n=block_n, num_warps=num_warps),
                       head_reference(*args, 0.05), atol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,score_tol,rel_tol", [(torch.float16, 1e-2, 2e-2), (torch.bfloat16, 5e-2, 1e-1)])
def test_gpu_half_precision_close_to_fp32(dtype: torch.dtype, score_tol: float, rel_tol: float) -> None:
    args = head_inputs([20000, 3, 999], dim=256, proj_dim=128, n_codes=16, seed=6, device="cuda")
    with torch.no_grad():
        ref = head_reference(*args, 0.2)
        score, attention, pooled = kernel.fused_memory_head(args[0].to(dtype), *args[1:], 0.2)
        with torch.autocast("cuda", dtype=dtype):  # fp32 embeddings under autocast: half operands too
            auto = kernel.fused_memory_head(*args, 0.2)
    for s, a, p in ((score, attention, pooled), auto):
        assert (s.float() - ref.score).abs().max() <= score_tol
        assert ((a.float() - ref.attention).abs().max() / ref.attention.max()) <= rel_tol
        assert ((p.float() - ref.pooled).abs().max() / ref.pooled.abs().max()) <= rel_tol


@pytest.mark.gpu
@gpu
def test_gpu_model_eval_uses_the_kernel_and_matches_cpu(monkeypatch) -> None:
    """forward_wsi on CUDA without autograd goes through the fused operator; same outputs as the CPU reference."""
    cfg = preset("official")[0]
    torch.manual_seed(0)
    model = build_model(cfg, 1536, 0).eval()
    rng = np.random.default_rng(0)
    n = 20000
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * 256
    features = torch.from_numpy(rng.standard_normal((n, 1536)).astype(np.float32))
    neighbors = torch.from_numpy(neighbor_table(coords, k=8, direction="official"))
    offsets = torch.tensor([0, n])
    with torch.no_grad():
        cpu = model.forward_wsi(features, neighbors, offsets)
        model.cuda()
        calls = []
        real = kernel.fused_memory_head
        monkeypatch.setattr(kernel, "fused_memory_head", lambda *a, **k: calls.append(1) or real(*a, **k))
        gpu_out = model.forward_wsi(features.cuda(), neighbors.cuda(), offsets.cuda())
    assert calls and gpu_out.patch_proj is None
    assert (torch.softmax(gpu_out.logits.cpu(), -1) - torch.softmax(cpu.logits, -1)).abs().max() <= 1e-5
    assert (gpu_out.attention.cpu() - cpu.attention).abs().max() <= 1e-6


@pytest.mark.gpu
@gpu
def test_gpu_torch_backend_fused_matches_cpu(tmp_path) -> None:
    """The runtime's torch backend on CUDA (model.pt -> momkd::memory_head -> the kernel) vs the same model.pt on
    CPU in fp32, paper dims, D_in 1536: a 20000-patch slide and a pack of three slides. ``MOMKD_BENCH_MODEL_DIR``
    names an exported folder to use; otherwise a random-weight one is exported here."""
    from momkd.manifest import load_manifest
    from momkd.runtime.backends import TorchBackend
    from momkd.runtime.bench import head_note, synthetic_pack

    model_dir = os.environ.get("MOMKD_BENCH_MODEL_DIR")
    if not model_dir:
        from momkd.export.synthetic import export_random_model

        model_dir = tmp_path / "model"
        export_random_model(model_dir, "paper", 1536, folds=1)
    manifest = load_manifest(model_dir)
    m = manifest.model
    cpu = TorchBackend(manifest.torch_path, "cpu")
    gpu_be = TorchBackend(manifest.torch_path, "cuda")
    assert head_note(gpu_be) == "head: fused Triton kernel"
    for n, slides in ((20000, 1), (6000, 3)):
        pack = synthetic_pack(n, slides, m.feature_dim, m.k, m.graph_direction)
        args = (pack.features, pack.neighbors, pack.slide_offsets)
        want, got = cpu.run(*args), gpu_be.run(*args)
        d = {k: float(np.abs(got[k] - want[k]).max()) for k in ("probability", "attention", "patch_score")}
        print(f"\ntorch cuda (fused head) vs cpu fp32, N={n} x {slides}: {d}")
        assert d["probability"] <= 1e-4 and d["attention"] <= 1e-6 and d["patch_score"] <= 1e-3, d
