"""Compressors for the EF21 / EF21-P messages, with exact bit accounting and real packing (docs/algorithm.md §3).

``build(spec)`` parses a spec string into a :class:`Compressor`::

    identity            x                                     bits f·d
    top_k:<r>           K largest |x_i|          α = K/d      bits min(K·(f + ⌈log2 d⌉), f·K + d)
    rand_k:<r>          K seeded random entries  α = K/d (in expectation)             bits f·K
    rand_k:<r>:unbiased the same, scaled by d/K  ω = d/K − 1                          bits f·K
    natural             random power of two      ω = 1/8                              bits 9·d
    sign                (‖x‖₁/d)·sign(x)         α = ‖x‖₁²/(d‖x‖₂²) ≥ 1/d             bits d + f
    rank:<r>            best rank-r (SVD)        α = r/min(m, n)                      bits f·r·(m + n)
    qsgd:<s>            QSGD, s levels           ω = min(d/s², √d/s)                  bits f + d·(1 + ⌈log2(s+1)⌉)
    bf16 / fp16         cast                     α = 1 − 2⁻¹⁶ / 1 − 2⁻²²              bits 16·d
    a+b(+c…)            b applied to the values a sends (e.g. ``top_k:0.05+natural``, α = 7K/(8d))

d = numel (a 0-D tensor counts as d = 1), f = bits of one value as it travels = 8 × element size of the input dtype
(32 for float32, 16 for bf16/fp16; 16 for the values after a ``bf16``/``fp16`` cast in a composition).
``<r>`` ≤ 1 is a ratio of d (K = ⌈r·d⌉, computed exactly from the decimal text); ``<r>`` > 1 is an integer count
(K = min(r, d)). ``rank:<r>`` and ``qsgd:<s>`` take integers ≥ 1.

Every compressor turns a tensor into a :class:`Message` (the payload tensors that would travel, their theoretical size
in bits and their real size in bytes) and back. Payload sizes depend only on (shape, dtype) (:meth:`Compressor.layout`),
so ranks can exchange fixed-size uint8 buffers (:meth:`Compressor.pack` / :meth:`Compressor.unpack`). Randomness comes
only from the ``seed`` argument, never the global RNG: ``natural`` draws counter-based uniforms
(:func:`uniform_rows`, the same stream on CPU and CUDA and for one layer or a whole group of layers at once);
``rand_k`` and ``qsgd`` use a ``torch.Generator`` created on the tensor's device, so their compress and decompress
must run on the same device type. The seed is shared by all ranks and is not counted in the bits. Top-k breaks ties
towards the lower index (:func:`topk_mask_rows`), so a message is a function of the values alone.

References: EF21 (Richtárik, Sokolov, Fatkhullin 2021, arXiv 2106.05203); top-k / rand-k sparsification (Stich,
Cordonnier, Jaggi 2018, arXiv 1809.07599); natural compression (Horváth et al. 2019, arXiv 1905.10988);
QSGD (Alistarh et al. 2017, arXiv 1610.02132); scaled sign (Karimireddy et al. 2019, arXiv 1901.09847);
low-rank / PowerSGD (Vogels, Karimireddy, Jaggi 2019, arXiv 1905.13727).
"""

from __future__ import annotations

import abc
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "Message",
    "Compressor",
    "Identity",
    "TopK",
    "RandK",
    "Natural",
    "Sign",
    "Rank",
    "QSGD",
    "Cast",
    "Composed",
    "build",
    "pack_bits",
    "unpack_bits",
    "pack_rows",
    "unpack_rows",
    "uniform_rows",
    "topk_mask_rows",
    "topk_rows",
    "NAMES",
]

#: compressor names a spec may use
NAMES = ("identity", "top_k", "rand_k", "natural", "sign", "rank", "qsgd", "bf16", "fp16")
_FORMS = (
    "identity, top_k:<r>, rand_k:<r>, rand_k:<r>:unbiased, natural, sign, rank:<r>, qsgd:<s>, bf16, fp16, "
    "or a composition 'a+b' whose first elements are top_k / rand_k / rank, e.g. 'top_k:0.05+natural'"
)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ShapeLike = Sequence[int]


# ----------------------------------------------------------------------------------------------------------------
# pure helpers


def pack_rows(values: Tensor, width: int) -> Tensor:
    """Pack the low ``width`` bits of each integer of every row of a 2-D tensor (LSB first, value after value):
    shape (L, n) -> (L, ⌈n·width/8⌉) uint8, row i = ``pack_bits(values[i], width)``.

    Vectorised with broadcasting: a constant number of tensor ops whatever ``width``, n or L. ``width == 0`` gives
    zero bytes per row.
    """
    L, n = values.shape
    nbytes = (n * width + 7) // 8
    bits = torch.zeros(L, nbytes * 8, dtype=torch.uint8, device=values.device)
    if n and width == 1:  # bitmaps (top-k masks, signs): the values are the bits
        bits[:, :n] = values.to(torch.uint8) & 1
    elif n and width:
        shifts = torch.arange(width, device=values.device)
        bits[:, : n * width] = ((values.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(L, n * width)
    weights = torch.ones(8, dtype=torch.uint8, device=values.device) << torch.arange(8, device=values.device)
    return (bits.view(L, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)  # distinct bits: no carry, no overflow


def unpack_rows(buf: Tensor, width: int, n: int) -> Tensor:
    """Inverse of :func:`pack_rows`: (L, >= ⌈n·width/8⌉) uint8 -> the first ``n`` values of each row, int64 (L, n)."""
    L = buf.shape[0]
    if not n or not width:
        return torch.zeros(L, n, dtype=torch.int64, device=buf.device)
    need = (n * width + 7) // 8
    bits = (buf[:, :need].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=buf.device)) & 1
    bits = bits.reshape(L, need * 8)
    if width == 1:
        return bits[:, :n].to(torch.int64)
    B = bits[:, : n * width].reshape(L, n, width).to(torch.int64)
    return (B << torch.arange(width, device=buf.device)).sum(-1)


def pack_bits(values: Tensor, width: int) -> Tensor:
    """Pack the low ``width`` bits of each integer (LSB first, value after value) into ⌈n·width/8⌉ uint8 bytes
    (one row of :func:`pack_rows`). ``width == 0`` gives an empty tensor."""
    return pack_rows(values.reshape(1, -1), width)[0]


def unpack_bits(buf: Tensor, width: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values of ``width`` bits each, as int64."""
    need = (n * width + 7) // 8
    if buf.dtype != torch.uint8 or buf.numel() < need:
        raise ValueError(
            f"unpack_bits needs >= {need} uint8 bytes for {n} values of {width} bits, got {buf.numel()} {buf.dtype}"
        )
    return unpack_rows(buf.reshape(1, -1), width, n)[0]


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """View uint8 bytes (last dim) as ``dtype`` (a copy when the storage offset is not aligned for it)."""
    if dtype == torch.uint8:
        return t
    if t.storage_offset() % dtype.itemsize or not t.is_contiguous():
        t = t.clone()
    return t.view(dtype)


def _index_bits(d: int) -> int:
    """⌈log2 d⌉: bits of one index into d entries (0 for d = 1)."""
    return max(d - 1, 0).bit_length()


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed % 2**63)
    return g


def _subseed(seed: int, position: int) -> int:
    """Seed of the inner compressor of a composition for value tensor ``position``, independent of the outer one."""
    return (seed * 1_000_003 + 1 + position) % 2**63


def _f(dtype: torch.dtype) -> int:
    return 8 * dtype.itemsize


def _numel(shape: ShapeLike) -> int:
    return math.prod(shape)


_M64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """A 64-bit constant as the signed int64 with the same bits (tensors are signed)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed integers)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def uniform_rows(seeds: Sequence[int], n: int, device: torch.device | str = "cpu") -> Tensor:
    """Counter-based uniforms: row i, column k is SplitMix64(seed_i + (k + 1)·γ) → [0, 1) with 24 bits, float32.

    Shape (len(seeds), n). A pure function of (seed, position) in int64 tensor arithmetic (wrapping multiply), so
    one call draws every layer of a group at once, a single layer draws the same numbers as its row, and CPU and
    CUDA give the same stream. ``seeds`` are 63-bit ints (:func:`ef_lightning.kernels.seed_for`).
    """
    s = torch.tensor([_i64(int(x) & _M64) for x in seeds], dtype=torch.int64).to(device, non_blocking=True)
    s = s.unsqueeze(1)
    k = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    z = s + k * _i64(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _i64(0x94D049BB133111EB)
    z = z ^ _shr(z, 31)
    return _shr(z, 40).to(torch.float32) * 2.0**-24


def topk_mask_rows(x: Tensor, K: int) -> Tensor:
    """Mask (L, d) bool of the K largest |x| in each row of a 2-D float tensor, ties broken towards the lower index.

    Canonical (a function of the values only, not of the top-k algorithm, the device or how many rows are selected
    at once): a float ``topk`` finds each row's K-th largest |x| = t; the mask is |x| > t plus the first (lowest
    index) entries equal to t that make up K. Without ties at t (the usual case) that is just |x| >= t.
    """
    a = x.float().abs()
    L, d = a.shape
    if d <= K:
        return torch.ones(L, d, dtype=torch.bool, device=x.device)
    t = torch.topk(a, K, dim=1, sorted=False).values.amin(1, keepdim=True)
    ge = a >= t
    if not x.is_cuda and bool((ge.sum(1) == K).all()):  # on CUDA no host sync: always the tie-safe form
        return ge
    gt = a > t
    eq = ge & ~gt
    return gt | (eq & (eq.cumsum(1) <= K - gt.sum(1, keepdim=True)))


def topk_rows(x: Tensor, K: int) -> Tensor:
    """Indices (L, K), ascending, of :func:`topk_mask_rows`."""
    return topk_mask_rows(x, K).nonzero()[:, 1].view(x.shape[0], K)


def _pow2(e: Tensor) -> Tensor:
    """2**e as float32 for an integer tensor e (inf above 127)."""
    return torch.ldexp(torch.ones(e.shape, dtype=torch.float32, device=e.device), e.to(torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# message and base class


@dataclass
class Message:
    """One compressed tensor.

    Attributes:
        payload: the tensors that travel, each contiguous and 1-D (bit-packed uint8 indices/codes, values, ...).
        bits: theoretical size in bits, the closed form of docs/algorithm.md §3 (seeds are not counted).
        shape, dtype: of the original tensor.
        seed: the shared seed compress used; not sent (every rank knows it), needed by rand_k to decompress.
    """

    payload: list[Tensor]
    bits: int
    shape: torch.Size
    dtype: torch.dtype
    seed: int = 0

    @property
    def nbytes(self) -> int:
        """Real size in bytes: sum of the payload tensors' bytes."""
        return sum(t.numel() * t.element_size() for t in self.payload)


class Compressor(abc.ABC):
    """Base class: a subclass defines ``layout``, ``bits``, ``constant``, ``_encode`` and ``_decode``.

    Attributes:
        spec: canonical spec string (``build(c.spec)`` rebuilds an equal compressor).
        kind: ``"contractive"`` (E‖C(x) − x‖² ≤ (1 − α)‖x‖²), ``"unbiased"`` (E Q(x) = x, E‖Q(x) − x‖² ≤ ω‖x‖²)
            or ``"identity"``.
        n_aux: for value carriers (top_k, rand_k, rank), how many leading payload tensors are not values; the
            remaining ones are values in the input dtype that a composition may compress further. None otherwise.
    """

    spec: str = ""
    kind: str = "contractive"
    n_aux: int | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    # -- per compressor ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def constant(self, shape: ShapeLike) -> float:
        """α (contractive, worst case over inputs of this shape), ω (unbiased) or 1.0 (identity)."""
        ...

    @abc.abstractmethod
    def layout(self, shape: ShapeLike, dtype: torch.dtype) -> list[tuple[int, torch.dtype]]:
        """(numel, dtype) of each payload tensor: a function of shape and dtype only, never of the values."""
        ...

    @abc.abstractmethod
    def bits(self, shape: ShapeLike, dtype: torch.dtype) -> int:
        """Theoretical message size in bits (docs/algorithm.md §3), equal to ``message.bits``."""
        ...

    @abc.abstractmethod
    def _encode(self, x: Tensor, seed: int) -> list[Tensor]: ...

    @abc.abstractmethod
    def _decode(self, payload: list[Tensor], shape: torch.Size, dtype: torch.dtype, seed: int) -> Tensor:
        """Any float tensor with numel d; the base class reshapes and casts."""
        ...

    def value_numels(self, shape: ShapeLike) -> list[int]:
        """Value carriers: numel of each value tensor (after the ``n_aux`` auxiliary ones)."""
        raise ValueError(f"{self.spec!r} sends no plain values")

    def supports(self, shape: ShapeLike) -> bool:
        """Whether tensors of this shape can be compressed (False e.g. for rank on a vector)."""
        return True

    def _unsupported(self, shape: ShapeLike) -> str:
        return f"{self.spec} cannot compress shape {tuple(shape)}"

    # -- shared machinery ----------------------------------------------------------------------------------------
    def _check_shape(self, shape: ShapeLike) -> torch.Size:
        shape = torch.Size(shape)
        if not self.supports(shape):
            raise ValueError(self._unsupported(shape))
        return shape

    def wire_nbytes(self, shape: ShapeLike, dtype: torch.dtype) -> int:
        """Bytes of the packed buffer (sum of the layout's tensors)."""
        return sum(n * dt.itemsize for n, dt in self.layout(shape, dtype))

    def compress(self, x: Tensor, seed: int = 0) -> Message:
        """Compress ``x`` (float32/bf16/fp16/float64, any shape, contiguous or not) with the shared ``seed``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"compress expects a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"compress expects a float tensor ({', '.join(map(str, _FLOAT_DTYPES))}), got {x.dtype}")
        try:
            seed = operator.index(seed)  # Python / numpy / 0-D integer tensor seeds
        except TypeError:
            raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
        shape = self._check_shape(x.shape)
        if x.numel() == 0:
            raise ValueError(f"{self.spec} cannot compress an empty tensor (shape {tuple(shape)}); skip it instead")
        payload = [t.reshape(-1).contiguous() for t in self._encode(x.detach().contiguous(), seed)]
        return Message(payload, self.bits(shape, x.dtype), shape, x.dtype, seed)

    def decompress(self, msg: Message) -> Tensor:
        """The compressed tensor C(x): same shape, dtype and device as the input of :meth:`compress`."""
        self._check_payload(msg)
        return self._decode(msg.payload, msg.shape, msg.dtype, msg.seed).reshape(msg.shape).to(msg.dtype)

    def _check_payload(self, msg: Message) -> None:
        if not isinstance(msg, Message):
            raise TypeError(f"expected a Message, got {type(msg).__name__}")
        want = self.layout(msg.shape, msg.dtype)
        got = [(t.numel(), t.dtype) for t in msg.payload]
        if got != want:
            raise ValueError(
                f"message payload {got} does not match the layout {want} of {self.spec} for shape "
                f"{tuple(msg.shape)} {msg.dtype}"
            )

    def pack(self, msg: Message) -> Tensor:
        """One 1-D uint8 tensor of length ``wire_nbytes``: the payload tensors' bytes, concatenated."""
        self._check_payload(msg)
        parts = [t.contiguous().reshape(-1).view(torch.uint8) for t in msg.payload]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)

    def unpack(self, buf: Tensor, shape: ShapeLike, dtype: torch.dtype, seed: int = 0) -> Message:
        """Inverse of :meth:`pack`; ``buf`` is a 1-D uint8 tensor (the payload tensors may be views into it)."""
        if not isinstance(buf, Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
            raise TypeError(f"unpack expects a 1-D uint8 tensor, got {getattr(buf, 'dtype', type(buf).__name__)}")
        shape = self._check_shape(shape)
        layout = self.layout(shape, dtype)
        total = sum(n * dt.itemsize for n, dt in layout)
        if buf.numel() != total:
            raise ValueError(
                f"{self.spec} for shape {tuple(shape)} {dtype} packs into {total} bytes, got {buf.numel()}"
            )
        payload, o = [], 0
        for n, dt in layout:
            chunk = buf[o : o + n * dt.itemsize]
            o += n * dt.itemsize
            payload.append(_as_dtype(chunk, dt))  # a view when the storage offset is aligned for dt
        return Message(payload, self.bits(shape, dtype), shape, dtype, seed)

    # -- many layers at once --------------------------------------------------------------------------------------
    def encode_rows(self, x: Tensor, shape: ShapeLike, seeds: Sequence[int]) -> list[Tensor]:
        """Compress every row of ``x`` (L, d): L tensors of ``shape`` (flattened, same dtype), row i with ``seeds[i]``.

        Returns each payload part as an (L, nbytes) uint8 tensor: row i of part p holds the bytes of part p of
        ``pack(compress(x[i].view(shape), seeds[i]))``, so the result is the per-layer messages, bit for bit. This base
        version loops over the rows (the readable per-layer reference); the vectorised compressors override it with
        a number of tensor ops that does not depend on L.
        """
        msgs = [self.compress(x[i].view(shape), seed=seeds[i]) for i in range(x.shape[0])]
        return [
            torch.stack([m.payload[p].reshape(-1).view(torch.uint8) for m in msgs]) for p in range(len(msgs[0].payload))
        ]

    def decode_rows(
        self, parts: Sequence[Tensor], shape: ShapeLike, dtype: torch.dtype, seeds: Sequence[int]
    ) -> Tensor:
        """Inverse of :meth:`encode_rows`: the decompressed rows as float32 (L, d). The base version loops over rows."""
        shape = torch.Size(shape)
        layout = self.layout(shape, dtype)
        rows = []
        for i, seed in enumerate(seeds):
            payload = [_as_dtype(part[i], dt) for part, (_, dt) in zip(parts, layout)]
            msg = Message(payload, self.bits(shape, dtype), shape, dtype, seed)
            rows.append(self.decompress(msg).float().reshape(-1))
        return torch.stack(rows)

    def roundtrip_rows(self, x: Tensor, shape: ShapeLike, seeds: Sequence[int]) -> tuple[list[Tensor], Tensor]:
        """:meth:`encode_rows` and the rows its receiver decodes (float32), as ``decode_rows`` would return them;
        the sender's EF21 update needs both. Sparsifiers override it to skip unpacking what they just packed."""
        parts = self.encode_rows(x, shape, seeds)
        return parts, self.decode_rows(parts, shape, torch.float32, seeds)

    def part_nbytes(self, shape: ShapeLike, dtype: torch.dtype) -> list[int]:
        """Bytes of each payload part of one message (the row width of each :meth:`encode_rows` part)."""
        return [n * dt.itemsize for n, dt in self.layout(shape, dtype)]


# ----------------------------------------------------------------------------------------------------------------
# the compressors


class Identity(Compressor):
    """No compression: payload = [x] in its dtype; f·d bits."""

    spec, kind = "identity", "identity"

    def constant(self, shape: ShapeLike) -> float:
        return 1.0

    def layout(self, shape, dtype):
        return [(_numel(self._check_shape(shape)), dtype)]

    def bits(self, shape, dtype):
        return _f(dtype) * _numel(self._check_shape(shape))

    def _encode(self, x, seed):
        return [x.reshape(-1)]

    def _decode(self, payload, shape, dtype, seed):
        return payload[0]

    def encode_rows(self, x, shape, seeds):
        return [x.contiguous().view(torch.uint8)]

    def decode_rows(self, parts, shape, dtype, seeds):
        return _as_dtype(parts[0], dtype).float()


class _Sparsifier(Compressor):
    """K entries of x; ``r`` is a ratio (K = ⌈r·d⌉) or a count (K = min(r, d))."""

    name = ""

    def __init__(self, r: Fraction, is_count: bool) -> None:
        self.r, self.is_count = r, is_count
        self.spec = f"{self.name}:{_fmt_ratio(r, is_count)}"
        self._k_cache: dict[int, int] = {}

    def k(self, shape: ShapeLike) -> int:
        """Number of kept entries for this shape (memoised: exact Fraction arithmetic is slow in a hot path)."""
        d = _numel(shape)
        K = self._k_cache.get(d)
        if K is None:
            K = self._k_cache[d] = min(int(self.r), d) if self.is_count else min(math.ceil(self.r * d), d)
        return K


class TopK(_Sparsifier):
    """Top-K (Stich et al. 2018): the K largest |x_i|; deterministic, α = K/d.

    Payload: [index part (uint8), values (K, input dtype)], indices ascending. The index part is the cheaper of a
    d-bit bitmap and K bit-packed indices of ⌈log2 d⌉ bits (decided by shape only), so
    bits = f·K + min(K·⌈log2 d⌉, d) = min(K·(f + ⌈log2 d⌉), f·K + d).
    """

    name, n_aux = "top_k", 1

    def _bitmap(self, d: int, K: int) -> bool:
        return d < K * _index_bits(d)

    def constant(self, shape):
        shape = self._check_shape(shape)
        return self.k(shape) / _numel(shape)

    def value_numels(self, shape):
        return [self.k(shape)]

    def layout(self, shape, dtype):
        d, K = _numel(shape), self.k(shape)
        aux = (d + 7) // 8 if self._bitmap(d, K) else (K * _index_bits(d) + 7) // 8
        return [(aux, torch.uint8), (K, dtype)]

    def bits(self, shape, dtype):
        d, K = _numel(shape), self.k(shape)
        return _f(dtype) * K + min(K * _index_bits(d), d)

    def select_rows(self, x: Tensor, shape: ShapeLike) -> tuple[Tensor, Tensor]:
        """Each row's index part (L, nbytes) uint8 and its K values (L, K) in ascending index order."""
        aux, vals, _ = self._select(x, shape)
        return aux, vals

    def _select(self, x: Tensor, shape: ShapeLike) -> tuple[Tensor, Tensor, Tensor]:
        """(index part, values (L, K) in ascending index order, selection mask (L, d))."""
        L, d = x.shape
        K = self.k(shape)
        mask = topk_mask_rows(x, K)  # canonical set (ties to the lower index)
        vals = x.masked_select(mask).view(L, K)  # row-major: ascending indices in each row
        if self._bitmap(d, K):
            return pack_rows(mask, 1), vals, mask
        return pack_rows(mask.nonzero()[:, 1].view(L, K), _index_bits(d)), vals, mask

    def roundtrip_rows(self, x, shape, seeds):
        aux, vals, mask = self._select(x, shape)
        return [aux, vals.contiguous().view(torch.uint8)], torch.where(mask, x, 0.0).float()

    def place_rows(self, aux: Tensor, vals: Tensor, shape: ShapeLike) -> Tensor:
        """Inverse of :meth:`select_rows`: dense (L, d) rows in ``vals``' dtype, zero where not selected."""
        L, K = vals.shape
        d = _numel(shape)
        out = vals.new_zeros(L, d)
        if self._bitmap(d, K):
            return out.masked_scatter_(unpack_rows(aux, 1, d).bool(), vals)
        return out.scatter_(1, unpack_rows(aux, _index_bits(d), K), vals)

    def _encode(self, x, seed):
        aux, vals = self.select_rows(x.reshape(1, -1), x.shape)
        return [aux[0], vals[0]]

    def _decode(self, payload, shape, dtype, seed):
        aux, vals = payload
        return self.place_rows(aux.reshape(1, -1), vals.reshape(1, -1), shape)[0]

    def encode_rows(self, x, shape, seeds):
        aux, vals = self.select_rows(x, shape)
        return [aux, vals.contiguous().view(torch.uint8)]

    def decode_rows(self, parts, shape, dtype, seeds):
        aux, vals = parts
        return self.place_rows(aux, _as_dtype(vals, dtype), shape).float()


class RandK(_Sparsifier):
    """Rand-K (Stich et al. 2018): K entries drawn without replacement from a generator seeded with the shared seed.

    Only the K values travel (f·K bits; the seed is common knowledge and not counted). Unscaled it is contractive
    in expectation, E‖C(x) − x‖² = (1 − K/d)‖x‖², α = K/d. With ``unbiased`` the decoder scales by d/K:
    unbiased, ω = d/K − 1.
    """

    name, n_aux = "rand_k", 0

    def __init__(self, r: Fraction, is_count: bool, unbiased: bool = False) -> None:
        super().__init__(r, is_count)
        self.unbiased = unbiased
        self.kind = "unbiased" if unbiased else "contractive"
        if unbiased:
            self.spec += ":unbiased"

    def indices(self, d: int, K: int, seed: int, device: torch.device) -> Tensor:
        """The K sorted indices every rank derives from ``seed``."""
        return torch.randperm(d, generator=_generator(seed, device), device=device)[:K].sort().values

    def constant(self, shape):
        shape = self._check_shape(shape)
        d, K = _numel(shape), self.k(shape)
        return d / K - 1.0 if self.unbiased else K / d

    def value_numels(self, shape):
        return [self.k(shape)]

    def layout(self, shape, dtype):
        return [(self.k(shape), dtype)]

    def bits(self, shape, dtype):
        return _f(dtype) * self.k(shape)

    def _encode(self, x, seed):
        v = x.reshape(-1)
        return [v[self.indices(v.numel(), self.k(x.shape), seed, v.device)]]

    def _decode(self, payload, shape, dtype, seed):
        (vals,) = payload
        d, K = _numel(shape), self.k(shape)
        if self.unbiased:
            vals = vals.float() * (d / K)
        out = vals.new_zeros(d)
        out[self.indices(d, K, seed, vals.device)] = vals
        return out


class Natural(Compressor):
    """Natural compression (Horváth et al. 2019): each value rounded at random to one of its two neighbouring powers
    of two, with probabilities making it unbiased; ω = 1/8.

    The rounding draws come from :func:`uniform_rows` (seeded, counter-based). 9 bits a value, bit-packed: bit 8 = sign,
    bits 0-7 = biased exponent e + 127 as in the IEEE float32 exponent field, 0 encoding zero. Computed in float32
    (bf16/fp16 inputs included). Exponents are limited to what the input dtype represents exactly: [-126, 127] for
    float32/bf16, [-24, 15] for fp16. Below the range a value rounds to 0 or the smallest power (still unbiased, but the
    ω bound no longer holds); at the top, values ≥ 2^e_max round down to 2^e_max (biased there, never overflowing to
    inf). Non-finite inputs are not supported.
    """

    spec, kind = "natural", "unbiased"
    _RANGE: ClassVar[dict[torch.dtype, tuple[int, int]]] = {torch.float16: (-24, 15)}

    def constant(self, shape):
        self._check_shape(shape)
        return 1.0 / 8.0

    def layout(self, shape, dtype):
        return [((9 * _numel(shape) + 7) // 8, torch.uint8)]

    def bits(self, shape, dtype):
        return 9 * _numel(shape)

    def codes_rows(self, x: Tensor, seeds: Sequence[int]) -> Tensor:
        """The 9-bit codes (L, d) int64 of every row of ``x`` (L, d), row i rounded with ``seeds[i]``."""
        v = x.float()
        e_min, e_max = self._RANGE.get(x.dtype, (-126, 127))
        a = v.abs()
        e = torch.frexp(a).exponent.to(torch.int64) - 1  # a = m·2^e with m in [1, 2)
        below = e < e_min
        low = torch.where(below, 0.0, _pow2(e))
        high = torch.where(below, 2.0**e_min, _pow2(e + 1))
        p_up = (a - low) / (high - low)  # unbiased: E = low + p_up·(high − low) = a
        up = uniform_rows(seeds, v.shape[1], v.device) < p_up
        E = torch.where(below, torch.full_like(e, e_min), e + up).clamp(max=e_max)
        zero = (a == 0) | (below & ~up)
        return torch.where(zero, 0, E + 127) | ((v < 0).to(torch.int64) << 8)

    @staticmethod
    def values_rows(code: Tensor) -> Tensor:
        """Decode 9-bit codes to float32 values."""
        E = code & 255
        mag = torch.where(E == 0, 0.0, _pow2(E - 127))
        return torch.where((code >> 8).bool(), -mag, mag)

    def _encode(self, x, seed):
        return [pack_bits(self.codes_rows(x.reshape(1, -1), [seed]), 9)]

    def _decode(self, payload, shape, dtype, seed):
        return self.values_rows(unpack_bits(payload[0], 9, _numel(shape)))

    def encode_rows(self, x, shape, seeds):
        return [pack_rows(self.codes_rows(x, seeds), 9)]

    def decode_rows(self, parts, shape, dtype, seeds):
        return self.values_rows(unpack_rows(parts[0], 9, _numel(shape))).to(dtype).float()


class Sign(Compressor):
    """Scaled sign (Karimireddy et al. 2019): C(x) = (‖x‖₁/d)·sign(x), with sign(0) := +1.

    Payload: [sign bitmap (1 bit a value, 1 = negative), scale (1 value, input dtype)]: d + f bits.
    ‖C(x) − x‖² = ‖x‖² − ‖x‖₁²/d for any choice of sign(0) because ⟨x, s⟩ = ‖x‖₁ still holds, so C is contractive
    with the data-dependent α(x) = ‖x‖₁²/(d‖x‖₂²) (:meth:`alpha_for`) and worst case α = 1/d (:meth:`constant`).
    """

    spec = "sign"

    def constant(self, shape):
        return 1.0 / _numel(self._check_shape(shape))

    @staticmethod
    def alpha_for(x: Tensor) -> float:
        """The data-dependent contraction α(x) = ‖x‖₁²/(d‖x‖₂²) (1 for x = 0)."""
        v = x.detach().reshape(-1).double()
        sq = float(v.square().sum())
        return float(v.abs().sum()) ** 2 / (v.numel() * sq) if sq > 0 else 1.0

    def layout(self, shape, dtype):
        return [((_numel(shape) + 7) // 8, torch.uint8), (1, dtype)]

    def bits(self, shape, dtype):
        return _numel(shape) + _f(dtype)

    def _encode(self, x, seed):
        v = x.reshape(-1).float()
        scale = (v.abs().sum() / v.numel()).to(x.dtype)
        return [pack_bits(v < 0, 1), scale.reshape(1)]

    def _decode(self, payload, shape, dtype, seed):
        neg = unpack_bits(payload[0], 1, _numel(shape))
        return (1 - 2 * neg).float() * payload[1].float()


class Rank(Compressor):
    """Best rank-r approximation (Eckart–Young; the exact-SVD counterpart of PowerSGD, Vogels et al. 2019).

    A tensor with ndim > 2 is viewed as (shape[0], -1) = (m, n); r is capped at min(m, n). The SVD runs in float32.
    Payload: P = U_r·S_r (m×r) and Q = V_r (n×r), in the input dtype: f·r·(m + n) bits. Deterministic,
    ‖C(x) − x‖² = Σ_{k>r} σ_k² ≤ (1 − r/min(m, n))‖x‖², α = r/min(m, n). Vectors are not supported.
    """

    n_aux = 0

    def __init__(self, r: int) -> None:
        self.r = r
        self.spec = f"rank:{r}"

    def supports(self, shape):
        return len(shape) >= 2

    def _unsupported(self, shape):
        return (
            f"{self.spec} needs a matrix, got shape {tuple(shape)} (a {len(shape)}-D tensor); use a per-role "
            f"mapping so vectors use 'identity' (e.g. {{'default': '{self.spec}', 'vector': 'identity'}})"
        )

    def _mnr(self, shape: ShapeLike) -> tuple[int, int, int]:
        shape = self._check_shape(shape)
        m = shape[0]
        n = _numel(shape) // m if m else 0
        return m, n, min(self.r, m, n)

    def constant(self, shape):
        m, n, r = self._mnr(shape)
        return r / min(m, n)

    def value_numels(self, shape):
        m, n, r = self._mnr(shape)
        return [m * r, n * r]

    def layout(self, shape, dtype):
        return [(k, dtype) for k in self.value_numels(shape)]

    def bits(self, shape, dtype):
        m, n, r = self._mnr(shape)
        return _f(dtype) * r * (m + n)

    def _encode(self, x, seed):
        m, n, r = self._mnr(x.shape)
        U, S, Vh = torch.linalg.svd(x.reshape(m, n).float(), full_matrices=False)
        return [(U[:, :r] * S[:r]).to(x.dtype), Vh[:r].T.to(x.dtype)]  # P (m, r), Q (n, r)

    def _decode(self, payload, shape, dtype, seed):
        *_, r = self._mnr(shape)
        P, Q = (t.float().reshape(-1, r) for t in payload)
        return P @ Q.T


class QSGD(Compressor):
    """QSGD (Alistarh et al. 2017) with s levels: Q(x)_i = ‖x‖·sign(x_i)·ξ_i/s, ξ_i ∈ {⌊s|x_i|/‖x‖⌋, +1} drawn
    so that E Q(x) = x; ω = min(d/s², √d/s).

    Payload: [norm (1 value, input dtype), sign bits (d), levels (d × ⌈log2(s+1)⌉ bits)]:
    f + d·(1 + ⌈log2(s+1)⌉) bits. The norm is rounded *up* to the input dtype and the levels are computed against that
    rounded norm, so the message stays exactly unbiased; only the final cast of the output to bf16/fp16 rounds.
    """

    kind = "unbiased"

    def __init__(self, s: int) -> None:
        self.s = s
        self.spec = f"qsgd:{s}"

    def constant(self, shape):
        d = _numel(self._check_shape(shape))
        return min(d / self.s**2, math.sqrt(d) / self.s)

    def layout(self, shape, dtype):
        d = _numel(shape)
        return [(1, dtype), ((d + 7) // 8, torch.uint8), ((d * self.s.bit_length() + 7) // 8, torch.uint8)]

    def bits(self, shape, dtype):
        return _f(dtype) + _numel(shape) * (1 + self.s.bit_length())  # s.bit_length() = ⌈log2(s+1)⌉

    def _encode(self, x, seed):
        v = x.reshape(-1).float()
        norm = v.norm()
        N = norm.to(x.dtype)
        if N.float() < norm:
            N = torch.nextafter(N, torch.full_like(N, math.inf))
        Nf = N.float()
        r = torch.where(Nf > 0, v.abs() / Nf * self.s, 0.0)
        lo = r.floor()
        u = torch.rand(v.numel(), generator=_generator(seed, v.device), device=v.device)
        level = (lo + (u < r - lo)).clamp(max=self.s).to(torch.int64)
        return [N.reshape(1), pack_bits(v < 0, 1), pack_bits(level, self.s.bit_length())]

    def _decode(self, payload, shape, dtype, seed):
        d = _numel(shape)
        neg = unpack_bits(payload[1], 1, d)
        level = unpack_bits(payload[2], self.s.bit_length(), d)
        return payload[0].float() * (1 - 2 * neg).float() * level.float() / self.s


class Cast(Compressor):
    """Cast to bf16 or fp16 and back: 16·d bits.

    Round-to-nearest has relative error ≤ u (u = 2⁻⁸ for bf16, 2⁻¹¹ for fp16), so ‖C(x) − x‖² ≤ u²‖x‖²:
    contractive with α = 1 − u² (1 − 2⁻¹⁶ / 1 − 2⁻²²). Holds in the normal range only: fp16 overflow
    (|x| > 65504 → inf) and underflow (subnormals, flush to 0) are not handled.
    """

    _U: ClassVar[dict[torch.dtype, float]] = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

    def __init__(self, to: torch.dtype) -> None:
        self.to = to
        self.spec = "bf16" if to == torch.bfloat16 else "fp16"

    def constant(self, shape):
        self._check_shape(shape)
        return 1.0 - self._U[self.to] ** 2

    def layout(self, shape, dtype):
        return [(_numel(shape), self.to)]

    def bits(self, shape, dtype):
        return 16 * _numel(shape)

    def _encode(self, x, seed):
        return [x.reshape(-1).to(self.to)]

    def _decode(self, payload, shape, dtype, seed):
        return payload[0]

    def encode_rows(self, x, shape, seeds):
        return [x.to(self.to).view(torch.uint8)]

    def decode_rows(self, parts, shape, dtype, seeds):
        return _as_dtype(parts[0], self.to).to(dtype).float()


class Composed(Compressor):
    """``outer+inner``: ``outer`` (top_k, rand_k or rank) runs first; ``inner`` compresses each of its value tensors
    (1-D, input dtype; inner seed = :func:`_subseed`), while outer's index part travels unchanged.

    bits = bits(outer) − f·(#values) + Σ bits(inner on each value tensor).

    Class (α_a, ω_a of outer; for rank the two factors multiply, so the inner errors compound as a product):
      - outer contractive, inner contractive: α = α_a·α_b (sparsifiers: kept and dropped parts have disjoint
        supports, so the errors add);
      - outer contractive, inner a cast: α = α_a·(1 − ε²), ε = Π(1 + u) − 1 over the value tensors
        (= α_a·α_cast for sparsifiers; first-order for rank);
      - outer contractive, inner unbiased: ω_b' = Π(1 + ω_b) − 1 over the value tensors; if ω_b' < 1 the values are
        used unscaled and α = α_a·(1 − ω_b') (docs/algorithm.md §3: top_k + natural has α = 7K/(8d)); otherwise each
        value tensor is scaled by 1/(1 + ω_b) on decode and α = α_a/(1 + ω_b');
      - outer unbiased (rand_k:unbiased), inner unbiased: unbiased, ω = (ω_a + 1)(ω_b + 1) − 1.
    """

    def __init__(self, outer: Compressor, inner: Compressor) -> None:
        self.outer, self.inner = outer, inner
        self.spec = f"{outer.spec}+{inner.spec}"
        self.kind = "unbiased" if outer.kind == "unbiased" else "contractive"

    def supports(self, shape):
        return self.outer.supports(shape)

    def _unsupported(self, shape):
        return self.outer._unsupported(shape)

    def _values(self, shape: ShapeLike) -> list[torch.Size]:
        return [torch.Size([n]) for n in self.outer.value_numels(self._check_shape(shape))]

    def _inner_omega(self, shape: ShapeLike) -> tuple[float, list[float]]:
        omegas = [self.inner.constant(v) for v in self._values(shape)]
        return math.prod(1.0 + w for w in omegas) - 1.0, omegas

    def scales(self, shape: ShapeLike) -> list[float]:
        """Factor applied to each decoded value tensor (1/(1 + ω_b) when an unbiased inner needs scaling)."""
        if self.outer.kind != "unbiased" and self.inner.kind == "unbiased":
            w, omegas = self._inner_omega(shape)
            if w >= 1.0:
                return [1.0 / (1.0 + o) for o in omegas]
        return [1.0] * len(self._values(shape))

    def constant(self, shape):
        a = self.outer.constant(shape)
        if self.inner.kind == "unbiased":
            w, _ = self._inner_omega(shape)
            if self.outer.kind == "unbiased":
                return (1.0 + a) * (1.0 + w) - 1.0
            return a * (1.0 - w) if w < 1.0 else a / (1.0 + w)
        consts = [self.inner.constant(v) for v in self._values(shape)]
        if isinstance(self.inner, Cast):
            eps = math.prod(1.0 + math.sqrt(1.0 - c) for c in consts) - 1.0
            return a * (1.0 - eps**2)
        return a * math.prod(consts)

    def layout(self, shape, dtype):
        out = self.outer.layout(shape, dtype)[: self.outer.n_aux]
        for v in self._values(shape):
            out += self.inner.layout(v, dtype)
        return out

    def bits(self, shape, dtype):
        vals = self._values(shape)
        b = self.outer.bits(shape, dtype) - _f(dtype) * sum(v.numel() for v in vals)
        return b + sum(self.inner.bits(v, dtype) for v in vals)

    def _encode(self, x, seed):
        p = self.outer._encode(x, seed)
        out = list(p[: self.outer.n_aux])
        for k, v in enumerate(p[self.outer.n_aux :]):
            out += [t.reshape(-1) for t in self.inner._encode(v.reshape(-1).contiguous(), _subseed(seed, k))]
        return out

    def encode_rows(self, x, shape, seeds):
        if not isinstance(self.outer, TopK):
            return super().encode_rows(x, shape, seeds)
        aux, vals = self.outer.select_rows(x, shape)
        K = vals.shape[1]
        return [aux, *self.inner.encode_rows(vals.contiguous(), (K,), [_subseed(s, 0) for s in seeds])]

    def roundtrip_rows(self, x, shape, seeds):
        if not isinstance(self.outer, TopK):
            return super().roundtrip_rows(x, shape, seeds)
        aux, vals, mask = self.outer._select(x, shape)
        K = vals.shape[1]
        subseeds = [_subseed(s, 0) for s in seeds]
        inner_parts, inner_vals = self.inner.roundtrip_rows(vals.contiguous(), (K,), subseeds)
        (scale,) = self.scales(shape)
        v = inner_vals.to(x.dtype)
        if scale != 1.0:
            v = v.float() * scale
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).masked_scatter_(mask, v.float())
        return [aux, *inner_parts], out

    def decode_rows(self, parts, shape, dtype, seeds):
        if not isinstance(self.outer, TopK):
            return super().decode_rows(parts, shape, dtype, seeds)
        K = self.outer.k(shape)
        vals = self.inner.decode_rows(parts[1:], (K,), dtype, [_subseed(s, 0) for s in seeds]).to(dtype)
        (scale,) = self.scales(shape)
        if scale != 1.0:
            vals = vals.float() * scale
        return self.outer.place_rows(parts[0], vals, shape).float()

    def _decode(self, payload, shape, dtype, seed):
        n_aux = self.outer.n_aux
        assert n_aux is not None  # _compose admits value carriers (top_k, rand_k, rank) as outer only
        parts, i = list(payload[:n_aux]), n_aux
        for k, (v, scale) in enumerate(zip(self._values(shape), self.scales(shape))):
            n = len(self.inner.layout(v, dtype))
            val = self.inner._decode(payload[i : i + n], v, dtype, _subseed(seed, k)).reshape(-1).to(dtype)
            parts.append(val if scale == 1.0 else val.float() * scale)
            i += n
        return self.outer._decode(parts, shape, dtype, seed)


# ----------------------------------------------------------------------------------------------------------------
# spec parser


def _fmt_ratio(r: Fraction, is_count: bool) -> str:
    if is_count:
        return str(int(r))
    s = repr(float(r))
    return s[:-2] if s.endswith(".0") else s


def _parse_number(arg: str, text: str, spec: str) -> Fraction:
    try:
        value = float(arg)
        frac = Fraction(arg)
    except (ValueError, ZeroDivisionError):
        value, frac = math.nan, None
    if frac is None or not math.isfinite(value):
        raise ValueError(
            f"{arg!r} in {text!r} (spec {spec!r}) is not a number; write e.g. "
            f"'{text.split(':')[0]}:0.05' (ratio) or '{text.split(':')[0]}:1000' (count)"
        )
    return frac


def _parse_element(text: str, spec: str) -> Compressor:
    name, *args = [t.strip() for t in text.split(":")]
    if name not in NAMES:
        raise ValueError(
            f"unknown compressor {name!r} in spec {spec!r}; valid names: {', '.join(NAMES)} (forms: {_FORMS})"
        )
    simple = {
        "identity": Identity,
        "natural": Natural,
        "sign": Sign,
        "bf16": lambda: Cast(torch.bfloat16),
        "fp16": lambda: Cast(torch.float16),
    }
    if name in simple:
        if args:
            raise ValueError(f"{name!r} takes no argument, got {text!r} in spec {spec!r}; write just '{name}'")
        return simple[name]()
    example = {"top_k": "top_k:0.05", "rand_k": "rand_k:0.05", "rank": "rank:4", "qsgd": "qsgd:4"}[name]
    if not args or not args[0]:
        raise ValueError(f"{name} needs an argument, got {text!r} in spec {spec!r}; write e.g. '{example}'")
    arg, opts = args[0], args[1:]
    valid_opts = ("unbiased",) if name == "rand_k" else ()
    for o in opts:
        if o not in valid_opts:
            raise ValueError(
                f"unknown option {o!r} in {text!r} (spec {spec!r}); valid options for {name}: "
                f"{', '.join(valid_opts) or 'none'} (e.g. 'rand_k:0.1:unbiased')"
            )
    r = _parse_number(arg, text, spec)
    if name in ("rank", "qsgd"):
        if r < 1 or r.denominator != 1:
            raise ValueError(
                f"{name} takes an integer >= 1, got {arg!r} in {text!r} (spec {spec!r}); write e.g. '{example}'"
            )
        return Rank(int(r)) if name == "rank" else QSGD(int(r))
    if r <= 0:
        raise ValueError(
            f"{name} needs a ratio in (0, 1] or an integer count > 1, got {arg!r} in {text!r} "
            f"(spec {spec!r}); write e.g. '{example}'"
        )
    if r > 1 and r.denominator != 1:
        raise ValueError(
            f"{arg!r} in {text!r} (spec {spec!r}) is > 1, so it is a count of entries and must be an "
            f"integer; write e.g. '{name}:{math.floor(r)}' or a ratio <= 1 like '{example}'"
        )
    if name == "top_k":
        return TopK(r, r > 1)
    return RandK(r, r > 1, unbiased="unbiased" in opts)


def _compose(outer: Compressor, inner: Compressor, spec: str) -> Compressor:
    head = inner.outer if isinstance(inner, Composed) else inner
    if outer.n_aux is None:
        raise ValueError(
            f"{outer.spec!r} cannot be followed by {inner.spec!r} in spec {spec!r}: 'a+b' applies b to "
            f"the values a sends, and {outer.spec} sends no plain values; only top_k, rand_k and rank "
            f"may be followed (e.g. 'top_k:0.05+natural', 'rank:4+bf16'). Valid forms: {_FORMS}"
        )
    if isinstance(head, Rank):
        raise ValueError(
            f"{head.spec!r} must come first in spec {spec!r}: later elements see 1-D value vectors, "
            f"not matrices (e.g. 'rank:4+bf16')"
        )
    if isinstance(outer, Rank) and not isinstance(inner, (Natural, Cast)):
        raise ValueError(
            f"{outer.spec!r} can only be followed by natural, bf16 or fp16 (entrywise on both factors), "
            f"got {inner.spec!r} in spec {spec!r}"
        )
    if outer.kind == "unbiased" and inner.kind != "unbiased":
        raise ValueError(
            f"{outer.spec!r} is unbiased and {inner.spec!r} is not, so {spec!r} would be neither; "
            f"follow it with natural, qsgd:<s> or rand_k:<r>:unbiased, or drop ':unbiased'"
        )
    return Composed(outer, inner)


def build(spec: str) -> Compressor:
    """Build a compressor from a spec string such as ``"top_k:0.05"``, ``"rand_k:0.1:unbiased"`` or
    ``"top_k:0.05+natural"`` (see the module docstring for the table). ``identity`` inside a composition is dropped
    (``build("top_k:0.1+identity").spec == "top_k:0.1"``). A Compressor is returned as is.

    Raises:
        TypeError: ``spec`` is not a string.
        ValueError: unknown name, malformed number, bad option or a composition that makes no sense; the message
            names the bad value and the valid choices.
    """
    if isinstance(spec, Compressor):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"compressor spec must be a str such as 'top_k:0.05', got {type(spec).__name__}")
    parts = [p.strip() for p in spec.split("+")]
    if not all(parts):
        raise ValueError(f"malformed compressor spec {spec!r}: empty element around '+'; valid forms: {_FORMS}")
    elems = [e for e in (_parse_element(p, spec) for p in parts) if not isinstance(e, Identity)] or [Identity()]
    comp = elems[-1]
    for outer in reversed(elems[:-1]):
        comp = _compose(outer, comp, spec)
    return comp
