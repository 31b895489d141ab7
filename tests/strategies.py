"""Hypothesis strategies: random, valid, tiny architectures for property tests of etp_fx.

Two families, each an interpreter module (:class:`Net`) that runs a drawn list of block specs:

- ``cnn``: input ``[B, C, H, W]``; blocks conv-bn-act (with group / depthwise convs), depthwise
  conv, residual, channel concat, split/chunk/slice, pooling, norms (BatchNorm, GroupNorm,
  LayerNorm / RMSNorm over channels via permute), squeeze-excitation, convs whose weight is
  standardised or normalised over its fan-in (weight standardisation, weight norm); heads
  pool / mean / flatten (channels first or last) -> Linear, or a 1x1 conv.
- ``token``: input ``[B, T, D]`` (or token ids through an ``nn.Embedding``); blocks Linear,
  MLP and gated-MLP residuals, LayerNorm / RMSNorm / GroupNorm, statistics over the features
  (a Hugging Face style RMSNorm of pow/mean/rsqrt, standardisation by mean and variance, a
  softmax gate, logsumexp, an abs-max scale), multi-head and grouped-query
  attention (fused q/k/v split or unbound, or separate; ``scaled_dot_product_attention``,
  explicit matmul/softmax or einsum; kv heads repeated with ``enable_gqa``, ``expand+reshape`` or
  ``repeat_interleave``), concat, einsum / matmul with a raw ``nn.Parameter``, token mixing
  over a transposed dim; heads mean/flatten/per-token Linear or a tied-embedding LM head.

Everything is tiny (channels 2..16, spatial 4..8, sequence 1..5) and float32; weights, norm
statistics and inputs are random but fixed by a seed that is part of the drawn spec.

Public API
----------
``architectures(families=("cnn", "token"), max_blocks=4)``
    strategy of :class:`Arch` ``(model, example_input, description)``; ``arch.spec`` is the
    :class:`Spec`. ``repr(arch)`` is the description, which is also Python source:
    ``rebuild(description)`` gives back the same model and input (same weights).
``specs(...)``, ``build(spec)``
    the spec strategy and the builder behind ``architectures``.
``removal_plan(draw, graph, ...)`` / ``removal_plans(graph, ...)``
    ``{group_id: sorted unit indices}``: for random exact groups, a random non-empty strict
    subset of their units (never all units). Use ``removal_plan(data.draw, g)`` with
    ``st.data()``, or ``data.draw(removal_plans(g))``.

Profiles: ``ci`` (default, 60 examples), ``soak`` (10,000), ``dev`` (10), chosen by the
``HYPOTHESIS_PROFILE`` environment variable.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = [
    "B", "Spec", "Arch", "Net", "architectures", "specs", "build", "rebuild", "removal_plan",
    "removal_plans", "MAX_C", "TIE_STYLES",
]

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=_HEALTH,
                          print_blob=True)
settings.register_profile("soak", max_examples=10_000, deadline=None,
                          suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=_HEALTH,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MAX_C = 16  # widest channel / feature dim a block may produce

# How a tied LM head reads the embedding table: "matmul" (x @ emb.weight.t()) or "alias"
# (lm.weight = emb.weight, as Hugging Face ties weights).
TIE_STYLES: tuple[str, ...] = ("matmul", "alias")


# --- specs -------------------------------------------------------------------------------------

class B:
    """One block spec: a kind and its keyword parameters. ``repr`` is Python source."""

    __slots__ = ("kind", "kw")

    def __init__(self, kind: str, **kw: Any) -> None:
        self.kind = kind
        self.kw = kw

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") or k == "kw":  # copy/pickle probe dunders before kw is set
            raise AttributeError(k)
        try:
            return self.kw[k]
        except KeyError:
            raise AttributeError(k) from None

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kw.items())
        return f"B({self.kind!r}{args})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, B) and (self.kind, self.kw) == (other.kind, other.kw)

    def __hash__(self) -> int:
        return hash((self.kind, tuple(sorted(self.kw.items()))))


class Spec:
    """A whole architecture: family, input shape, seed, blocks (the last one is the head)."""

    def __init__(self, family: str, input_shape: Sequence[int], seed: int,
                 blocks: Sequence[B], ids: int = 0) -> None:
        self.family = family
        self.input_shape = tuple(input_shape)
        self.seed = seed
        self.blocks = list(blocks)
        self.ids = ids  # > 0: the input is token ids below this vocabulary size

    def __repr__(self) -> str:
        blocks = "".join(f"\n    {b!r}," for b in self.blocks)
        ids = f", ids={self.ids}" if self.ids else ""
        return (f"Spec({self.family!r}, input_shape={self.input_shape!r}, seed={self.seed}{ids}, "
                f"blocks=[{blocks}\n])")

    def with_seed(self, seed: int) -> "Spec":
        return Spec(self.family, self.input_shape, seed, self.blocks, self.ids)


class Arch(tuple):
    """``(model, example_input, description)`` whose repr is the readable, rebuildable
    description (hypothesis prints it for a failing example)."""

    def __new__(cls, model: nn.Module, x: torch.Tensor, description: str, spec: Spec):
        self = super().__new__(cls, (model, x, description))
        self.spec = spec
        return self

    model = property(lambda self: self[0])
    x = property(lambda self: self[1])
    description = property(lambda self: self[2])

    def __repr__(self) -> str:
        return self[2]


# --- block modules -----------------------------------------------------------------------------

def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "silu": nn.SiLU(), "gelu": nn.GELU(), "tanh": nn.Tanh(),
            "none": nn.Identity()}[name]


def _norm2d(kind: str, c: int, groups: int = 1) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(groups, c)
    return nn.Identity()


class ConvBlock(nn.Module):
    """conv (any groups) -> norm -> act."""

    def __init__(self, c: int, b: B) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, b.out, b.k, stride=b.stride, padding=b.k // 2, groups=b.groups,
                              bias=b.bias)
        self.norm = _norm2d(b.norm, b.out, b.kw.get("gn_groups", 1))
        self.act = _act(b.act)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class Residual2d(nn.Module):
    """x + body(x); body is conv-bn-act-conv or a depthwise then pointwise conv."""

    def __init__(self, c: int, b: B) -> None:
        super().__init__()
        if b.body == "convs":
            self.body = nn.Sequential(nn.Conv2d(c, b.mid, b.k, padding=b.k // 2),
                                      nn.BatchNorm2d(b.mid), _act(b.act),
                                      nn.Conv2d(b.mid, c, b.k, padding=b.k // 2, bias=False))
        else:  # depthwise then pointwise
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), _act(b.act),
                                      nn.Conv2d(c, c, 1))
        self.post = _act(b.post)

    def forward(self, x):
        return self.post(x + self.body(x))


class Concat2d(nn.Module):
    """cat([conv_a(x), conv_b(x)], 1), or dense: cat([x, conv_a(x)], 1)."""

    def __init__(self, c: int, b: B) -> None:
        super().__init__()
        self.dense = b.dense
        self.a = nn.Sequential(nn.Conv2d(c, b.a, b.k, padding=b.k // 2), _act(b.act))
        self.b = None if b.dense else nn.Conv2d(c, b.b, 1)

    def forward(self, x):
        other = x if self.dense else self.b(x)
        return torch.cat([other, self.a(x)] if self.dense else [self.a(x), other], dim=1)


class Split2d(nn.Module):
    """chunk or split along channels, then glu (a * sigmoid(b)), convs+cat, or convs+add."""

    def __init__(self, c: int, b: B) -> None:
        super().__init__()
        self.sizes, self.mode, self.how = list(b.sizes), b.mode, b.how
        if b.mode != "glu":
            self.pa = nn.Conv2d(self.sizes[0], b.wa, 1)
            self.pb = nn.Conv2d(self.sizes[1], b.wb, 1)

    def forward(self, x):
        if self.how == "chunk":
            p, q = torch.chunk(x, 2, dim=1)
        elif self.how == "slice":
            p, q = x[:, :self.sizes[0]], x[:, self.sizes[0]:]
        else:
            p, q = torch.split(x, self.sizes, dim=1)
        if self.mode == "glu":
            return p * torch.sigmoid(q)
        p, q = self.pa(p), self.pb(q)
        return torch.cat([p, q], 1) if self.mode == "cat" else p + q


class Pool2d(nn.Module):
    def __init__(self, c: int, b: B) -> None:
        super().__init__()
        self.kind = b.pool

    def forward(self, x):
        if self.kind == "max":
            return F.max_pool2d(x, 2)
        if self.kind == "avg":
            return F.avg_pool2d(x, 2)
        return F.adaptive_avg_pool2d(x, (x.shape[-2] // 2, x.shape[-1] // 2))


class Norm2d(nn.Module):
    """BatchNorm, GroupNorm, or LayerNorm / RMSNorm over channels through a permute."""

    def __init__(self, c: int, b: B) -> None:
        super().__init__()
        self.kind = b.norm
        self.norm = {"bn": lambda: nn.BatchNorm2d(c), "gn": lambda: nn.GroupNorm(b.groups, c),
                     "ln": lambda: nn.LayerNorm(c), "rms": lambda: nn.RMSNorm(c)}[b.norm]()

    def forward(self, x):
        if self.kind in ("ln", "rms"):
            return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.norm(x)


class SE2d(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc2(relu(fc1(mean_hw(x)))))[:, :, None, None]."""

    def __init__(self, c: int, b: B) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, b.hidden), nn.Linear(b.hidden, c)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        return x * s[:, :, None, None]


class StdConv2d(nn.Module):
    """A conv whose weight is standardised over its fan-in (the previous layer's channels):
    ``F.batch_norm`` on the reshaped weight (timm's StdConv2d), ``var_mean``, or weight norm
    ``g * v / ||v||``. Reductions over a pruned dim applied to a weight."""

    def __init__(self, c: int, b: B) -> None:
        super().__init__()
        self.how = b.how
        self.conv = nn.Conv2d(c, b.out, b.k, padding=b.k // 2, bias=b.bias)
        self.gain = nn.Parameter(torch.rand(b.out, 1, 1, 1) + 0.5) if b.how == "wn" else None
        self.act = _act(b.act)

    def weight(self) -> torch.Tensor:
        w = self.conv.weight
        if self.how == "bn":
            return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True,
                                momentum=0.0, eps=1e-5).reshape_as(w)
        if self.how == "var_mean":
            v, m = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, correction=0)
            return (w - m) / torch.sqrt(v + 1e-5)
        return self.gain * w / torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)

    def forward(self, x):
        return self.act(F.conv2d(x, self.weight(), self.conv.bias, padding=self.conv.padding))


class Head2d(nn.Module):
    def __init__(self, c: int, s: int, b: B) -> None:
        super().__init__()
        self.kind = b.head
        if b.head == "conv":
            self.out = nn.Conv2d(c, b.classes, 1)
            self.hidden = nn.Identity()
            return
        feat = c * s * s if b.head in ("flatten_linear", "cl_flatten_linear") else c
        if b.hidden:
            self.hidden = nn.Sequential(nn.Linear(feat, b.hidden), nn.ReLU())
            feat = b.hidden
        else:
            self.hidden = nn.Identity()
        self.out = nn.Linear(feat, b.classes)

    def forward(self, x):
        if self.kind == "conv":
            return self.out(x)
        if self.kind == "pool_linear":
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        elif self.kind == "mean_linear":
            x = x.mean(dim=(2, 3))
        elif self.kind == "cl_flatten_linear":  # channels last: channel is the minor factor
            x = x.permute(0, 2, 3, 1).flatten(1)
        else:
            x = torch.flatten(x, 1)
        return self.out(self.hidden(x))


class Embed(nn.Module):
    def __init__(self, d: int, b: B) -> None:
        super().__init__()
        self.emb = nn.Embedding(b.vocab, b.out)

    def forward(self, ids):
        return self.emb(ids)


class LinearBlock(nn.Module):
    def __init__(self, d: int, b: B) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(d, b.out, bias=b.bias), _act(b.act)

    def forward(self, x):
        return self.act(self.fc(x))


class MLPRes(nn.Module):
    """x + fc2(act(fc1(x))), or the gated form x + down(silu(gate(x)) * up(x)) with gate/up
    fused into one Linear and chunked."""

    def __init__(self, d: int, b: B) -> None:
        super().__init__()
        self.gated, self.fused = b.gated, b.kw.get("fused", False)
        if b.gated and self.fused:
            self.gate_up = nn.Linear(d, 2 * b.hidden)
        elif b.gated:
            self.gate, self.up = nn.Linear(d, b.hidden, bias=False), nn.Linear(d, b.hidden)
        else:
            self.fc1 = nn.Linear(d, b.hidden)
        self.act = _act(b.act)
        self.fc2 = nn.Linear(b.hidden, d)

    def forward(self, x):
        if self.gated and self.fused:
            g, u = self.gate_up(x).chunk(2, dim=-1)
            h = F.silu(g) * u
        elif self.gated:
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = self.act(self.fc1(x))
        return x + self.fc2(h)


class Norm1d(nn.Module):
    def __init__(self, d: int, b: B) -> None:
        super().__init__()
        self.kind = b.norm
        self.norm = {"ln": lambda: nn.LayerNorm(d, elementwise_affine=b.affine, bias=b.affine),
                     "rms": lambda: nn.RMSNorm(d, elementwise_affine=b.affine),
                     "gn": lambda: nn.GroupNorm(b.kw.get("groups", 1), d, affine=b.affine)}[b.norm]()

    def forward(self, x):
        if self.kind == "gn":  # GroupNorm wants channels at dim 1
            return self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x)


class Stat1d(nn.Module):
    """Statistics over the feature dim, written out as models do: a Hugging Face RMSNorm
    (pow, mean, rsqrt, weight), standardisation by mean and variance, a softmax gate
    ``x * softmax(x)``, ``x - logsumexp(x)``, or ``x / (max |x| + 1)``."""

    def __init__(self, d: int, b: B) -> None:
        super().__init__()
        self.kind = b.stat
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        if self.kind == "hf_rms":
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + 1e-6))
        if self.kind == "standardise":
            v, m = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
            return (x - m) / torch.sqrt(v + 1e-5) * self.weight
        if self.kind == "softmax_gate":
            return x * torch.softmax(x, dim=-1) * self.weight
        if self.kind == "logsumexp":
            return x - torch.logsumexp(x, dim=-1, keepdim=True)
        return x / (x.abs().amax(-1, keepdim=True) + 1.0) * self.weight


class Attention(nn.Module):
    """Multi-head / grouped-query attention built from Linear + reshape into heads."""

    def __init__(self, d: int, b: B) -> None:
        super().__init__()
        self.h, self.kvh, self.hd = b.heads, b.kv_heads, b.head_dim
        self.fused, self.kernel, self.repeat = b.fused, b.kernel, b.repeat
        self.causal, self.residual = b.causal, b.residual
        q, kv = self.h * self.hd, self.kvh * self.hd
        if self.fused:
            self.qkv = nn.Linear(d, q + 2 * kv, bias=b.bias)
        else:
            self.q = nn.Linear(d, q, bias=b.bias)
            self.k = nn.Linear(d, kv, bias=b.bias)
            self.v = nn.Linear(d, kv, bias=b.bias)
        self.o = nn.Linear(q, b.out)

    def _repeat(self, t):
        r = self.h // self.kvh
        if r == 1 or self.repeat == "sdpa_gqa":
            return t
        if self.repeat == "repeat_interleave":
            return t.repeat_interleave(r, dim=1)
        bsz, kvh, n, hd = t.shape  # expand + reshape (the Llama "repeat_kv")
        return t[:, :, None].expand(bsz, kvh, r, n, hd).reshape(bsz, kvh * r, n, hd)

    def forward(self, x):
        bsz, n, _ = x.shape
        q_w, kv_w = self.h * self.hd, self.kvh * self.hd
        if self.fused == "unbind":  # [B, T, 3, H, hd] -> three [B, T, H, hd]
            q, k, v = self.qkv(x).view(bsz, n, 3, self.h, self.hd).unbind(2)
        elif self.fused:
            q, k, v = self.qkv(x).split([q_w, kv_w, kv_w], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(bsz, n, self.h, self.hd).transpose(1, 2)
        k = k.view(bsz, n, self.kvh, self.hd).transpose(1, 2)
        v = v.view(bsz, n, self.kvh, self.hd).transpose(1, 2)
        k, v = self._repeat(k), self._repeat(v)
        if self.kernel == "sdpa":
            gqa = self.repeat == "sdpa_gqa" and self.h != self.kvh
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=gqa)
        else:
            if self.kernel == "einsum":
                s = torch.einsum("bhqd,bhkd->bhqk", q, k) * (1.0 / math.sqrt(self.hd))
            else:
                s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.hd))
            if self.causal:
                s = s + torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
            p = torch.softmax(s, dim=-1)
            y = torch.einsum("bhqk,bhkd->bhqd", p, v) if self.kernel == "einsum" else p @ v
        y = self.o(y.transpose(1, 2).reshape(bsz, n, q_w))
        return x + y if self.residual else y


class Concat1d(nn.Module):
    def __init__(self, d: int, b: B) -> None:
        super().__init__()
        self.dense = b.dense
        self.a = nn.Linear(d, b.a)
        self.b = None if b.dense else nn.Linear(d, b.b)

    def forward(self, x):
        a = torch.relu(self.a(x))
        return torch.cat([x, a] if self.dense else [a, self.b(x)], dim=-1)


class RawParam(nn.Module):
    """einsum('btd,od->bto', x, W) or x @ P with raw nn.Parameters, then an activation."""

    def __init__(self, d: int, b: B) -> None:
        super().__init__()
        self.op = b.op
        if b.op == "einsum":
            self.weight = nn.Parameter(torch.randn(b.out, d) / math.sqrt(d))
        else:
            self.weight = nn.Parameter(torch.randn(d, b.out) / math.sqrt(d))
        self.act = _act(b.act)

    def forward(self, x):
        if self.op == "einsum":
            return self.act(torch.einsum("btd,od->bto", x, self.weight))
        return self.act(x @ self.weight)


class TokenMix(nn.Module):
    """MLP-Mixer token mixing: x + (fc2(act(fc1(x^T))))^T over the sequence dim."""

    def __init__(self, d: int, t: int, b: B) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(t, b.hidden), nn.Linear(b.hidden, t), _act(b.act)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x.transpose(1, 2)))).transpose(1, 2)


class Head1d(nn.Module):
    def __init__(self, d: int, t: int, b: B, embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        self.kind = b.head
        self.tie = b.kw.get("tie", "matmul")
        if b.head == "tied_lm":  # project back to the embedding width, then logits
            self.proj = nn.Linear(d, b.emb_dim, bias=False)
            if self.tie == "alias":  # Hugging Face style: lm.weight = embedding.weight
                self.lm = nn.Linear(b.emb_dim, embedding.num_embeddings, bias=False)
                self.lm.weight = embedding.weight
        else:
            self.out = nn.Linear(d * t if b.head == "flatten_linear" else d, b.classes)

    def forward(self, x, embedding=None):
        if self.kind == "tied_lm" and self.tie == "alias":
            return self.lm(self.proj(x))
        if self.kind == "tied_lm":  # logits against the input embedding table
            return self.proj(x) @ embedding.weight.t()
        if self.kind == "mean_linear":
            x = x.mean(dim=1)
        elif self.kind == "flatten_linear":
            x = x.flatten(1)
        return self.out(x)


_CNN_BLOCKS = {"conv": ConvBlock, "residual": Residual2d, "concat": Concat2d, "split": Split2d,
               "pool": Pool2d, "norm": Norm2d, "se": SE2d, "stdconv": StdConv2d}
_TOKEN_BLOCKS = {"embed": Embed, "linear": LinearBlock, "mlp": MLPRes, "norm": Norm1d,
                 "stat": Stat1d,
                 "attn": Attention, "concat": Concat1d, "raw": RawParam}


class Net(nn.Module):
    """Runs ``spec.blocks`` in order; ``blocks.<i>`` holds the parameters of block ``i``."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        mods = []
        if spec.family == "cnn":
            c, s = spec.input_shape[1], spec.input_shape[2]
            for b in spec.blocks:
                if b.kind == "head":
                    mods.append(Head2d(c, s, b))
                else:
                    mods.append(_CNN_BLOCKS[b.kind](c, b))
                c, s = b.kw.get("c_out", c), b.kw.get("s_out", s)
        else:
            t = spec.input_shape[1]
            d = 0 if spec.ids else spec.input_shape[2]
            for b in spec.blocks:
                if b.kind == "head":
                    mods.append(Head1d(d, t, b, getattr(mods[0], "emb", None) if mods else None))
                elif b.kind == "mix":
                    mods.append(TokenMix(d, t, b))
                else:
                    mods.append(_TOKEN_BLOCKS[b.kind](d, b))
                d = b.kw.get("c_out", d)
        self.blocks = nn.ModuleList(mods)

    def forward(self, x):
        for m in self.blocks:
            if isinstance(m, Head1d) and m.kind == "tied_lm":
                x = m(x, self.blocks[0].emb)
            else:
                x = m(x)
        return x

    # slots that sit on the model's interface and so can never be in a group
    def interface_slots(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        first, head = self.blocks[0], self.blocks[-1]
        if isinstance(head, Head1d):
            if head.kind == "tied_lm":
                out.append(("blocks.0.emb.weight", 0))
                if head.tie == "alias":
                    out.append(("blocks.%d.lm.weight" % (len(self.blocks) - 1), 0))
            else:
                out += [("blocks.%d.out.weight" % (len(self.blocks) - 1), 0),
                        ("blocks.%d.out.bias" % (len(self.blocks) - 1), 0)]
        else:
            out += [("blocks.%d.out.weight" % (len(self.blocks) - 1), 0),
                    ("blocks.%d.out.bias" % (len(self.blocks) - 1), 0)]
        if isinstance(first, Embed):
            out.append(("blocks.0.emb.weight", 0))
        elif isinstance(first, (ConvBlock, StdConv2d)):
            out.append(("blocks.0.conv.weight", 1))
        elif isinstance(first, LinearBlock):
            out.append(("blocks.0.fc.weight", 1))
        elif isinstance(first, RawParam):
            out.append(("blocks.0.weight", 1 if first.op == "einsum" else 0))
        elif isinstance(first, Head2d) and first.kind == "conv":
            out.append(("blocks.0.out.weight", 1))
        return out


# --- drawing blocks ----------------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


_ACTS = st.sampled_from(["relu", "silu", "gelu", "tanh", "none"])
_W = st.integers(2, MAX_C)


@st.composite
def _cnn_block(draw, c: int, s: int) -> B:
    kinds = ["conv", "conv", "residual", "concat", "norm", "se", "stdconv"]
    if c >= 2:
        kinds.append("split")
    if s >= 4:
        kinds.append("pool")
    kind = draw(st.sampled_from(kinds))
    if kind == "conv":
        style = draw(st.sampled_from(["dense", "group", "depthwise"]))
        if style == "depthwise":
            mult = draw(st.integers(1, max(1, MAX_C // c)))
            out, groups = c * mult, c
        else:
            out = draw(_W)
            common = _divisors(math.gcd(c, out))
            groups = draw(st.sampled_from(common)) if style == "group" else 1
        k = draw(st.sampled_from([1, 3]))
        stride = draw(st.sampled_from([1, 2])) if s >= 6 else 1
        norm = draw(st.sampled_from(["bn", "gn", "none"]))
        kw = {}
        if norm == "gn":
            kw["gn_groups"] = draw(st.sampled_from(_divisors(out)))
        s_out = (s + 2 * (k // 2) - k) // stride + 1
        return B("conv", out=out, k=k, stride=stride, groups=groups, norm=norm, **kw,
                 act=draw(_ACTS), bias=draw(st.booleans()), c_out=out, s_out=s_out)
    if kind == "residual":
        body = draw(st.sampled_from(["convs", "dw"]))
        return B("residual", body=body, mid=draw(_W), k=draw(st.sampled_from([1, 3])),
                 act=draw(_ACTS), post=draw(st.sampled_from(["relu", "none"])))
    if kind == "concat":
        dense = c <= MAX_C - 2 and draw(st.booleans())
        a = draw(st.integers(2, MAX_C - c)) if dense else draw(st.integers(2, MAX_C // 2))
        b = 0 if dense else draw(st.integers(1, MAX_C - a))
        return B("concat", dense=dense, a=a, b=b, k=draw(st.sampled_from([1, 3])),
                 act=draw(_ACTS), c_out=c + a if dense else a + b)
    if kind == "split":
        how = draw(st.sampled_from(["chunk", "split", "slice"] if c % 2 == 0 else ["split", "slice"]))
        if how == "chunk":
            sizes = (c // 2, c // 2)
        else:
            first = draw(st.integers(1, c - 1))
            sizes = (first, c - first)
        mode = draw(st.sampled_from(["glu", "cat", "add"] if sizes[0] == sizes[1] else ["cat", "add"]))
        if mode == "glu":
            return B("split", how=how, sizes=sizes, mode=mode, c_out=sizes[0])
        wa = draw(st.integers(1, MAX_C - 1)) if mode == "cat" else draw(_W)
        wb = draw(st.integers(1, MAX_C - wa)) if mode == "cat" else wa
        return B("split", how=how, sizes=sizes, mode=mode, wa=wa, wb=wb,
                 c_out=wa + wb if mode == "cat" else wa)
    if kind == "pool":
        return B("pool", pool=draw(st.sampled_from(["max", "avg", "adaptive"])), s_out=s // 2)
    if kind == "norm":
        norm = draw(st.sampled_from(["bn", "gn", "ln", "rms"]))
        groups = draw(st.sampled_from(_divisors(c))) if norm == "gn" else 0
        return B("norm", norm=norm, groups=groups)
    if kind == "stdconv":
        out, k = draw(_W), draw(st.sampled_from([1, 3]))
        # batch statistics need more than one value: a fan-in of one has no batch_norm form
        hows = ["bn", "var_mean", "wn"] if c * k * k > 1 else ["var_mean", "wn"]
        return B("stdconv", how=draw(st.sampled_from(hows)), out=out, k=k,
                 bias=draw(st.booleans()), act=draw(_ACTS), c_out=out)
    return B("se", hidden=draw(st.integers(1, 8)))


@st.composite
def _cnn_head(draw, c: int, s: int) -> B:
    head = draw(st.sampled_from(["pool_linear", "mean_linear", "flatten_linear",
                                 "cl_flatten_linear", "conv"]))
    hidden = 0 if head == "conv" else draw(st.sampled_from([0, 0, 2, 5, 8]))
    return B("head", head=head, hidden=hidden, classes=draw(st.integers(2, 6)))


@st.composite
def _token_block(draw, d: int, t: int) -> B:
    kind = draw(st.sampled_from(["linear", "mlp", "norm", "stat", "attn", "attn", "concat", "raw",
                                 "mix"]))
    if kind == "linear":
        out = draw(_W)
        return B("linear", out=out, act=draw(_ACTS), bias=draw(st.booleans()), c_out=out)
    if kind == "mlp":
        gated = draw(st.booleans())
        return B("mlp", hidden=draw(_W), gated=gated,
                 fused=gated and draw(st.booleans()), act=draw(_ACTS))
    if kind == "norm":
        # GroupNorm needs more than one value per group: (d / groups) * t > 1
        gn_groups = [g for g in _divisors(d) if (d // g) * t > 1]
        norm = draw(st.sampled_from(["ln", "rms"] + (["gn"] if gn_groups else [])))
        kw = {"groups": draw(st.sampled_from(gn_groups))} if norm == "gn" else {}
        return B("norm", norm=norm, affine=draw(st.booleans()), **kw)
    if kind == "stat":
        return B("stat", stat=draw(st.sampled_from(["hf_rms", "standardise", "softmax_gate",
                                                    "logsumexp", "absmax"])))
    if kind == "attn":
        heads = draw(st.integers(1, 4))
        kv_heads = draw(st.sampled_from(_divisors(heads)))
        head_dim = draw(st.integers(1, max(1, MAX_C // heads)))
        if heads * head_dim < 2:
            head_dim = 2
        kernel = draw(st.sampled_from(["sdpa", "explicit", "einsum"]))
        repeats = ["expand", "repeat_interleave"] + (["sdpa_gqa"] if kernel == "sdpa" else [])
        repeat = draw(st.sampled_from(repeats)) if heads != kv_heads else "none"
        residual = draw(st.booleans())
        out = d if residual else draw(_W)
        return B("attn", heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                 fused=draw(st.sampled_from([False, True] + (["unbind"] if heads == kv_heads else []))),
                 kernel=kernel, repeat=repeat,
                 causal=draw(st.booleans()), bias=draw(st.booleans()), residual=residual,
                 out=out, c_out=out)
    if kind == "concat":
        dense = d <= MAX_C - 2 and draw(st.booleans())
        a = draw(st.integers(2, MAX_C - d)) if dense else draw(st.integers(1, MAX_C // 2))
        b = 0 if dense else draw(st.integers(1, MAX_C - a))
        return B("concat", dense=dense, a=a, b=b, c_out=d + a if dense else a + b)
    if kind == "raw":
        out = draw(_W)
        return B("raw", op=draw(st.sampled_from(["einsum", "matmul"])), out=out,
                 act=draw(_ACTS), c_out=out)
    return B("mix", hidden=draw(_W), act=draw(_ACTS))


@st.composite
def _token_head(draw, emb_dim: int) -> B:
    heads = ["mean_linear", "token_linear", "flatten_linear"] + (["tied_lm"] if emb_dim else [])
    head = draw(st.sampled_from(heads))
    if head == "tied_lm":
        return B("head", head=head, emb_dim=emb_dim, tie=draw(st.sampled_from(TIE_STYLES)))
    return B("head", head=head, classes=draw(st.integers(2, 6)))


@st.composite
def specs(draw, families: Sequence[str] = ("cnn", "token"), max_blocks: int = 4) -> Spec:
    """Strategy of :class:`Spec` (pure data; :func:`build` makes the module)."""
    family = draw(st.sampled_from(list(families)))
    seed = draw(st.integers(0, 2**31 - 1))
    batch = draw(st.integers(1, 2))
    n = draw(st.integers(1, max_blocks))
    blocks: list[B] = []
    if family == "cnn":
        c, s = draw(st.integers(1, 4)), draw(st.integers(4, 8))
        shape, ids = (batch, c, s, s), 0
        for _ in range(n):
            b = draw(_cnn_block(c, s))
            blocks.append(b)
            c, s = b.kw.get("c_out", c), b.kw.get("s_out", s)
        blocks.append(draw(_cnn_head(c, s)))
        return Spec(family, shape, seed, blocks)
    t = draw(st.integers(1, 5))
    ids = draw(st.sampled_from([0, 0, draw(st.integers(3, 12))]))
    if ids:
        d = draw(_W)
        blocks.append(B("embed", vocab=ids, out=d, c_out=d))
        shape = (batch, t)
    else:
        d = draw(st.integers(1, 8))
        shape = (batch, t, d)
    for _ in range(n):
        b = draw(_token_block(d, t))
        blocks.append(b)
        d = b.kw.get("c_out", d)
    blocks.append(draw(_token_head(blocks[0].out if ids else 0)))
    return Spec(family, shape, seed, blocks, ids)


def _randomise_norms(model: nn.Module) -> None:
    """Random affine parameters and running statistics, so every channel is distinguishable."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
                              nn.RMSNorm)):
                if isinstance(w, torch.Tensor):
                    w.uniform_(0.5, 1.5)
                if isinstance(b, torch.Tensor):
                    b.normal_(0.0, 0.3)


def build(spec: Spec) -> tuple[nn.Module, torch.Tensor]:
    """Model (eval mode, float32, weights fixed by ``spec.seed``) and example input."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Net(spec)
        _randomise_norms(model)
        if spec.ids:
            x = torch.randint(0, spec.ids, spec.input_shape)
        else:
            x = torch.randn(spec.input_shape)
    return model.eval(), x


def rebuild(description: str) -> tuple[nn.Module, torch.Tensor]:
    """The model and input of a description printed by hypothesis (``repr`` of an Arch)."""
    return build(eval(description, {"Spec": Spec, "B": B}))  # noqa: S307 - our own repr


def architectures(families: Sequence[str] = ("cnn", "token"), max_blocks: int = 4):
    """Strategy of :class:`Arch` ``(model, example_input, description)``."""
    return specs(families, max_blocks).map(lambda sp: Arch(*build(sp), repr(sp), sp))


# --- removal plans -----------------------------------------------------------------------------

def removal_plan(draw, graph, *, exact_only: bool = True, max_groups: int | None = None,
                 min_groups: int = 1) -> dict[str, list[int]]:
    """Draw ``{group_id: sorted unit indices}`` for random groups of ``graph`` (exact ones
    only, by default): each a non-empty strict subset of the group's units, never all of them.

    ``draw`` is hypothesis' draw function (``data.draw`` with ``st.data()``, or the first
    argument of an ``st.composite``). Returns ``{}`` when there is no eligible group."""
    cands = [g for g in graph.groups if g.size >= 2 and (g.exact or not exact_only)]
    if not cands:
        return {}
    hi = len(cands) if max_groups is None else min(max_groups, len(cands))
    lo = min(min_groups, hi)
    picks = draw(st.lists(st.sampled_from(range(len(cands))), min_size=lo, max_size=hi,
                          unique=True))
    plan: dict[str, list[int]] = {}
    for i in sorted(picks):
        g = cands[i]
        units = draw(st.lists(st.integers(0, g.size - 1), min_size=1, max_size=g.size - 1,
                              unique=True))
        plan[g.id] = sorted(units)
    return plan


def removal_plans(graph, **kw):
    """Strategy form of :func:`removal_plan`: ``data.draw(removal_plans(g))``."""
    @st.composite
    def _plans(draw):
        return removal_plan(draw, graph, **kw)
    return _plans()
