"""The vectorised (fused) compress/decode of many layers at once against the per-layer reference, bit for bit.

``Compressor.encode_rows`` / ``decode_rows`` of the base class loop over layers calling ``compress`` / ``decompress``
(the readable reference); the vectorised overrides must give the same bytes and the same decoded floats.
"""

from __future__ import annotations

import math

import pytest
import torch

from ef_lightning import compressors as C

SPECS = ["identity", "top_k:0.1", "top_k:0.5", "top_k:3", "top_k:0.01", "natural", "bf16", "fp16",
         "top_k:0.1+natural", "top_k:0.05+natural", "top_k:0.2+bf16", "top_k:0.5+rand_k:0.5+natural",
         "rank:2", "rank:2+natural", "rand_k:0.2", "qsgd:4", "sign"]
SHAPES = [(7, 9), (64, 33), (1, 1), (5,), (3, 4, 5), (128, 96)]


def _rows(L: int, shape: tuple[int, ...], seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, math.prod(shape), generator=g)
    if ties:  # many exact ties and zeros: top-k must break them the same way everywhere
        x = torch.round(x * 2) / 2
        x[:, ::3] = 0.0
    return x


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_rows_match_per_layer_reference(spec: str, shape: tuple[int, ...], ties: bool) -> None:
    comp = C.build(spec)
    if not comp.supports(shape):
        pytest.skip(f"{spec} does not take shape {shape}")
    L = 4
    x = _rows(L, shape, 11, ties)
    seeds = [1234567 + 17 * i for i in range(L)]
    fused = comp.encode_rows(x, shape, seeds)
    ref = C.Compressor.encode_rows(comp, x, shape, seeds)
    assert [p.shape for p in fused] == [p.shape for p in ref]
    assert [p.shape[1] for p in ref] == comp.part_nbytes(shape, torch.float32)
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)
    # each row is exactly the per-layer packed message
    for i in range(L):
        packed = comp.pack(comp.compress(x[i].view(shape), seed=seeds[i]))
        assert torch.equal(torch.cat([p[i] for p in fused]), packed)
    parts_rt, dec_rt = comp.roundtrip_rows(x, shape, seeds)  # the sender's shortcut: same bytes, same decode
    assert all(torch.equal(a, b) for a, b in zip(parts_rt, ref))
    dec = comp.decode_rows(fused, shape, torch.float32, seeds)
    assert torch.equal(dec_rt, dec)
    dec_ref = C.Compressor.decode_rows(comp, ref, shape, torch.float32, seeds)
    assert dec.dtype == torch.float32 and dec.shape == (L, math.prod(shape))
    assert torch.equal(dec, dec_ref)


def test_topk_ties_go_to_the_lower_index() -> None:
    x = torch.tensor([[1.0, -2.0, 2.0, 0.0, -2.0, 1.0]])
    assert sorted(C.topk_rows(x, 2)[0].tolist()) == [1, 2]
    assert sorted(C.topk_rows(x, 4)[0].tolist()) == [0, 1, 2, 4]


def test_uniform_rows_is_splitmix64() -> None:
    """Independent reference: SplitMix64 in Python integers, top 24 bits."""
    M = (1 << 64) - 1

    def ref(seed: int, k: int) -> float:
        z = (seed + k * 0x9E3779B97F4A7C15) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        z ^= z >> 31
        return (z >> 40) / 2**24

    seeds = [0, 1, 2**62 + 12345, 2**63 - 1]
    u = C.uniform_rows(seeds, 50)
    want = torch.tensor([[ref(s, k) for k in range(1, 51)] for s in seeds], dtype=torch.float32)
    assert torch.equal(u, want)
    assert 0.45 < float(C.uniform_rows([7], 100_000).mean()) < 0.55


def _pack_reference(values: list[int], width: int) -> bytes:
    """The wire format written out: each value's low ``width`` bits, LSB first, value after value, in one
    little-endian bit stream padded with zeros to whole bytes."""
    stream = 0
    for i, v in enumerate(values):
        stream |= (v & ((1 << width) - 1)) << (i * width)
    return stream.to_bytes((len(values) * width + 7) // 8, "little")


@pytest.mark.parametrize("width", [1, 3, 9, 16, 17])
def test_pack_rows_matches_the_bit_stream(width: int) -> None:
    v = torch.randint(0, 2**width, (5, 13))
    packed = C.pack_rows(v, width)
    assert packed.shape == (5, (13 * width + 7) // 8)
    for i in range(5):
        assert bytes(packed[i].tolist()) == _pack_reference(v[i].tolist(), width)
    assert torch.equal(C.unpack_rows(packed, width, 13), v)


@pytest.mark.parametrize("nesterov", [False, True])
def test_direction_without_touching_momentum(nesterov: bool) -> None:
    """The overlap's out-of-place direction equals the in-place step-2 direction bit for bit and leaves M as is."""
    from ef_lightning import kernels as K

    g, M = torch.randn(3, 50), torch.randn(3, 50)
    M0 = M.clone()
    D_out = K.ef21_direction_out(M, g, 0.9, nesterov)
    assert torch.equal(M, M0)
    D_in = K.ef21_direction(M, g, 0.9, nesterov)
    assert torch.equal(D_out, D_in)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["top_k:0.1+natural", "top_k:0.5", "natural", "identity"])
def test_rows_cuda_equals_cpu(spec: str) -> None:
    """Counter-based rounding and canonical top-k: CUDA produces the CPU's messages bit for bit."""
    comp = C.build(spec)
    x = _rows(6, (96, 384), 3, ties=True)
    seeds = list(range(6))
    cpu = comp.encode_rows(x, (96, 384), seeds)
    gpu = comp.encode_rows(x.cuda(), (96, 384), seeds)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
    assert torch.equal(comp.decode_rows(cpu, (96, 384), torch.float32, seeds),
                       comp.decode_rows([p.cuda() for p in gpu], (96, 384), torch.float32, seeds).cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_simulator_fused_equals_per_layer_with_mixed_dtypes(dtype: torch.dtype) -> None:
    """Whole EF21 steps (n = 3 workers, top-k + natural both ways) with parameters of two dtypes in one model:
    the fused and the per-layer paths give bit-identical W, X and worker state."""
    import ef_lightning as efl

    def run(fused: bool) -> tuple[dict, dict, list]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16),
                                    torch.nn.Tanh(), torch.nn.Linear(16, 4))
        model[2].to(dtype)  # a same-shape neighbour in another dtype must not share its group
        model[2].register_forward_pre_hook(lambda m, a: (a[0].to(dtype),))
        model[2].register_forward_hook(lambda m, a, out: out.float())
        opt = efl.build_lmo_optimizer(model, preset="gluon", momentum=0.9, verbose=False)
        sim = efl.Simulator(model, opt, n_workers=3, uplink="top_k:0.25+natural", downlink="top_k:0.5+natural",
                            fused=fused, seed=3)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            batches = [(torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)) for _ in range(3)]
            sim.step(lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batches)
        W = {k: v.detach().clone() for k, v in model.named_parameters()}
        return W, sim.server_model(), [w.state_dict(sim.layers) for w in sim.workers]

    (W1, X1, S1), (W2, X2, S2) = run(True), run(False)
    for a, b in ((W1, W2), (X1, X2)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for s1, s2 in zip(S1, S2):
        for kind in ("M", "G"):
            assert all(torch.equal(v, s2[kind][k]) for k, v in s1[kind].items())
