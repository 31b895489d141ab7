"""Model-zoo sweep: trace every torchvision classifier, a set of timm models, small Hugging Face
transformers and a PyG GAT; report groups, barriers and how much of the Conv/Linear output width
lies in prunable groups, next to torch-pruning's DependencyGraph on the torchvision models.

Run::

    python -m benchmarks.zoo_sweep            # everything, writes docs/zoo.md
    python -m benchmarks.zoo_sweep --quick    # a handful of models, prints only
    python -m benchmarks.zoo_sweep --only resnet50,bert

**Prunable share** (the ``ours %`` and ``TP %`` columns). The population is every output index
of every Conv/Linear weight that the forward pass on the example input actually uses:

- ``nn.Conv{1,2,3}d`` and ``nn.Linear`` (subclasses included): ``weight`` dim 0;
- ``nn.ConvTranspose*``: ``weight`` dim 1; Hugging Face ``Conv1D`` (GPT-2): ``weight`` dim 1;
- PyTorch Geometric's ``Linear``: ``weight`` dim 0.

(``nn.MultiheadAttention.in_proj_weight`` is a bare parameter, not a Linear module; it is not
counted, for us or for torch-pruning.) Modules that do not run in eval mode (for example the
auxiliary classifiers of GoogLeNet and Inception) are not counted.

- ours: the fraction of those indices ``i`` such that some member of some group of
  ``etp_fx.trace`` with that parameter name and that dim has ``coords[i] != -1``;
- torch-pruning (TP): the fraction of those indices that appear as out-channel indices of that
  module in some group of ``tp.DependencyGraph().build_dependency(model, x)`` yielded by
  ``DG.get_all_groups(ignored_layers=[classifier], root_module_types=(Conv, Linear))``, where the
  classifier (the last Conv/Linear to run) is an interface whose outputs must stay. Its out
  channels are in both denominators and in neither numerator (our tracer freezes every model
  output by construction).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import etp_fx

from .common import add_allow_failures, failure_exit

ROOT = Path(__file__).resolve().parents[1]

# --- which weights are "Conv/Linear output channels" ---------------------------------------------


def _linear_like_types() -> list[tuple[type, int]]:
    out: list[tuple[type, int]] = [
        (nn.modules.conv._ConvTransposeNd, 1),
        (nn.Conv1d, 0), (nn.Conv2d, 0), (nn.Conv3d, 0), (nn.Linear, 0),
    ]
    try:
        from transformers.pytorch_utils import Conv1D
        out.append((Conv1D, 1))
    except Exception:  # noqa: BLE001 - optional
        pass
    try:
        from torch_geometric.nn.dense.linear import Linear as PygLinear
        out.append((PygLinear, 0))
    except Exception:  # noqa: BLE001 - optional
        pass
    return out


def used_modules(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Qualified names of the modules that run on the example inputs, in call order."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, a, _n=n: order.append(_n))
               for n, m in model.named_modules()]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    seen: dict[str, None] = {}
    mods = dict(model.named_modules())
    for n in order:
        seen.setdefault(n, None)
        # nn.MultiheadAttention reads out_proj.weight without calling out_proj
        if isinstance(mods[n], nn.MultiheadAttention):
            seen.setdefault(f"{n}.out_proj" if n else "out_proj", None)
    return list(seen)


def out_channel_weights(model: nn.Module, used: list[str] | None = None
                        ) -> dict[str, tuple[int, int, str]]:
    """``{weight name: (out dim, out size, module name)}`` of every used Conv/Linear, in call
    order (the last entry is the last Conv/Linear to run)."""
    types = _linear_like_types()
    mods = dict(model.named_modules())
    names = used if used is not None else list(mods)
    out: dict[str, tuple[int, int, str]] = {}
    for n in names:
        m = mods[n]
        for cls, d in types:
            if isinstance(m, cls):
                w = getattr(m, "weight", None)
                if isinstance(w, torch.Tensor) and w.dim() >= 2 and not isinstance(
                        w, nn.parameter.UninitializedParameter):
                    out[f"{n}.weight" if n else "weight"] = (d, int(w.shape[d]), n)
                break
    return out


def our_coverage(g: etp_fx.DependencyGraph, targets: dict[str, tuple[int, int, str]]
                 ) -> dict[str, set[int]]:
    """Out-channel indices of each target weight that lie in some prunable group."""
    cov: dict[str, set[int]] = {k: set() for k in targets}
    for grp in g.groups:
        for m in grp.members:
            t = targets.get(m.name)
            if t is not None and m.dim == t[0]:
                cov[m.name].update(i for i, c in enumerate(m.coords) if c != -1)
    return cov


def tp_graph(model: nn.Module, args: tuple, kwargs: dict):
    import torch_pruning as tp
    model.eval()
    x = args[0] if len(args) == 1 and not kwargs else (kwargs if not args else args)
    return tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)


def tp_groups(DG, classifier: nn.Module | None):
    """torch-pruning's groups rooted at every Conv/Linear, the classifier's outputs kept."""
    from torch_pruning import ops
    ignored = [classifier] if classifier is not None else []
    return list(DG.get_all_groups(ignored_layers=ignored,
                                  root_module_types=(ops.TORCH_CONV, ops.TORCH_LINEAR)))


def tp_out_indices(DG, group, module_to_weight: dict[nn.Module, str]) -> dict[str, set[int]]:
    """``{weight name: out-channel indices}`` that one torch-pruning group removes."""
    from torch_pruning import _helpers
    out: dict[str, set[int]] = {}
    for dep, idxs in group:
        mod = dep.target.module
        name = module_to_weight.get(mod) if isinstance(mod, nn.Module) else None
        if name is None or not DG.is_out_channel_pruning_fn(dep.handler):
            continue
        out.setdefault(name, set()).update(int(i) for i in _helpers.to_plain_idxs(list(idxs)))
    return out


def tp_module_map(model: nn.Module, targets: dict[str, tuple[int, int, str]]
                  ) -> dict[nn.Module, str]:
    """torch-pruning module -> the target weight whose out channels its out-pruning removes.
    TP prunes ``nn.MultiheadAttention`` as one module whose out-pruning removes rows of
    ``out_proj`` (its ``embed_dim``); ``out_proj`` itself never appears in TP's graph."""
    mods = dict(model.named_modules())
    m2w: dict[nn.Module, str] = {mods[mn]: w for w, (_, _, mn) in targets.items()}
    for n, m in mods.items():
        if isinstance(m, nn.MultiheadAttention):
            w = f"{n}.out_proj.weight" if n else "out_proj.weight"
            if w in targets:
                m2w[m] = w
    return m2w


def _ranges(idx: set[int]) -> tuple[tuple[int, int], ...]:
    """Sorted indices as half-open ``(start, stop)`` runs."""
    out: list[list[int]] = []
    for i in sorted(idx):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


def block(cov: dict[str, set[int]]) -> frozenset:
    """One group as a comparable value: ``{(weight name, out-index runs)}``."""
    return frozenset((w, _ranges(ix)) for w, ix in cov.items() if ix)


def our_blocks(g: etp_fx.DependencyGraph, targets: dict[str, tuple[int, int, str]]) -> set:
    """Our groups as blocks of Conv/Linear out channels (groups touching none are dropped)."""
    out = set()
    for grp in g.groups:
        cov: dict[str, set[int]] = {}
        for m in grp.members:
            t = targets.get(m.name)
            if t is not None and m.dim == t[0]:
                cov.setdefault(m.name, set()).update(i for i, c in enumerate(m.coords) if c != -1)
        if cov:
            out.add(block(cov))
    return out


@dataclass
class TPResult:
    cov: dict[str, set[int]]
    blocks: set
    seconds: float


def tp_result(model: nn.Module, args: tuple, kwargs: dict,
              targets: dict[str, tuple[int, int, str]]) -> TPResult:
    """torch-pruning's coverage of ``targets`` and its groups as blocks (the classifier, the
    last target, is kept and is in no block)."""
    t0 = time.perf_counter()
    DG = tp_graph(model, args, kwargs)
    mods = dict(model.named_modules())
    m2w = tp_module_map(model, targets)
    classifier = mods[list(targets.values())[-1][2]] if targets else None
    cov: dict[str, set[int]] = {k: set() for k in targets}
    blocks = set()
    for grp in tp_groups(DG, classifier):
        idx = tp_out_indices(DG, grp, m2w)
        for w, ix in idx.items():
            cov[w] |= ix
        if idx:
            blocks.add(block(idx))
    return TPResult(cov, blocks, time.perf_counter() - t0)


def describe_blocks(blocks, limit: int = 3) -> list[str]:
    out = []
    for b in sorted(blocks, key=lambda b: sorted(b))[:limit]:
        out.append("{" + ", ".join(f"{w}{list(r) if len(r) != 1 else list(r[0])}"
                                   for w, r in sorted(b))[:240] + "}")
    return out


def share(cov: dict[str, set[int]], targets: dict[str, tuple[int, int, str]]) -> float:
    total = sum(s for _, s, _ in targets.values())
    return sum(len(v) for v in cov.values()) / total if total else float("nan")


# --- the zoo --------------------------------------------------------------------------------------

TIMM = ["resnet50", "efficientnet_b0", "mobilenetv3_large_100", "vit_small_patch16_224",
        "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "convnext_tiny", "regnety_016",
        "densenet121", "ghostnet_100", "mixer_b16_224", "poolformer_s12", "levit_128",
        "mobilevit_s", "efficientformer_l1", "twins_svt_small"]

HF = ["bert", "roberta", "gpt2", "opt", "llama-gqa", "qwen2", "vit", "t5"]


class LogitsOnly(nn.Module):
    """Return only ``.logits`` (T5 also returns the encoder's hidden states, a second interface
    that would freeze d_model)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs).logits


def torchvision_model(name: str, size: int | None = None) -> tuple[nn.Module, tuple, dict]:
    import torchvision
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None)
    size = size or (299 if "inception" in name else 224)
    return m, (torch.randn(1, 3, size, size),), {}


def timm_model(name: str) -> tuple[nn.Module, tuple, dict]:
    import timm
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False)
    cfg = getattr(m, "pretrained_cfg", {}) or {}
    return m, (torch.randn(1, *cfg.get("input_size", (3, 224, 224))),), {}


def hf_model(name: str, seq: int = 16, **overrides: Any) -> tuple[nn.Module, tuple, dict]:
    """Small random Hugging Face models with a task head (the head's output is the interface).
    ``overrides`` change the config of the decoder-only models (llama-gqa, qwen2)."""
    import transformers as T
    torch.manual_seed(0)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=1000, use_cache=False)
    ids = torch.randint(0, 1000, (1, seq))
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(**small)), (), {"input_ids": ids}
    if name == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(**small)), (), {"input_ids": ids}
    if name == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, use_cache=False,
                           bos_token_id=0, eos_token_id=0)
        return T.GPT2LMHeadModel(cfg), (), {"input_ids": ids}
    if name == "opt":
        cfg = T.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                          word_embed_proj_dim=64, vocab_size=1000, use_cache=False)
        return T.OPTForCausalLM(cfg), (), {"input_ids": ids}
    if name == "llama-gqa":
        cfg = T.LlamaConfig(**{**small, "num_key_value_heads": 2, **overrides})
        return T.LlamaForCausalLM(cfg), (), {"input_ids": ids}
    if name == "qwen2":
        cfg = T.Qwen2Config(**{**small, "num_key_value_heads": 2, **overrides})
        return T.Qwen2ForCausalLM(cfg), (), {"input_ids": ids}
    if name == "vit":
        cfg = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=128, image_size=32, patch_size=8, num_labels=10)
        return T.ViTForImageClassification(cfg), (torch.randn(1, 3, 32, 32),), {}
    if name == "t5":
        cfg = T.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                         num_heads=4, vocab_size=1000, use_cache=False)
        return (LogitsOnly(T.T5ForConditionalGeneration(cfg)), (),
                {"input_ids": ids, "decoder_input_ids": ids[:, :8]})
    raise KeyError(name)


class GAT(nn.Module):
    """Two GATConv layers (4 heads of 8, then 1 head of 7 classes)."""

    def __init__(self, f_in: int = 16, hidden: int = 8, heads: int = 4, classes: int = 7,
                 self_loops: bool = True) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv
        self.conv1 = GATConv(f_in, hidden, heads=heads, add_self_loops=self_loops)
        self.conv2 = GATConv(hidden * heads, classes, heads=1, add_self_loops=self_loops)

    def forward(self, x, edge_index):
        x = torch.nn.functional.elu(self.conv1(x, edge_index))
        return self.conv2(x, edge_index)


def gat_model(self_loops: bool = True) -> tuple[nn.Module, tuple, dict]:
    """GATConv's default ``add_self_loops=True`` first drops existing self loops with a boolean
    mask: the edge count becomes data-dependent (an unbacked size in the exported graph)."""
    torch.manual_seed(0)
    n, e = 20, 60
    return GAT(self_loops=self_loops), (torch.randn(n, 16), torch.randint(0, n, (2, e))), {}


def zoo(quick: bool = False) -> list[tuple[str, str, Callable[[], tuple[nn.Module, tuple, dict]]]]:
    """``(family, name, builder)`` of every model in the sweep."""
    import torchvision
    tv = torchvision.models.list_models(module=torchvision.models)
    timm_names, hf_names = TIMM, HF
    if quick:
        tv = ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5", "vit_b_32"]
        timm_names = ["efficientnet_b0", "levit_128"]
        hf_names = ["bert", "llama-gqa", "t5"]
    out = [("torchvision", n, lambda n=n: torchvision_model(n)) for n in tv]
    out += [("timm", n, lambda n=n: timm_model(n)) for n in timm_names]
    out += [("hf", n, lambda n=n: hf_model(n)) for n in hf_names]
    out += [("pyg", "gat", gat_model),
            ("pyg", "gat-no-self-loops", lambda: gat_model(self_loops=False))]
    return out


# --- one model ------------------------------------------------------------------------------------

@dataclass
class Row:
    family: str
    name: str
    ok: bool = False
    error: str = ""
    groups: int = 0
    units: int = 0
    inexact: int = 0
    barriers: list[str] = field(default_factory=list)
    ours: float = float("nan")
    tp: float | None = None
    tp_error: str = ""
    trace_s: float = 0.0
    tp_s: float | None = None
    ours_only: list[str] = field(default_factory=list)  # weights we cover more of than TP
    tp_only: list[str] = field(default_factory=list)  # weights TP covers more of than we do
    same_partition: bool | None = None  # our groups == TP's groups on Conv/Linear outputs
    blocks_ours_only: list[str] = field(default_factory=list)
    blocks_tp_only: list[str] = field(default_factory=list)
    n_weights: int = 0


def barrier_ops(barriers: list[str]) -> str:
    c = Counter(b.split(" at ")[0] for b in barriers)
    return ", ".join(f"{k}" + (f" x{v}" if v > 1 else "") for k, v in c.most_common())


def run_one(family: str, name: str, build, with_tp: bool,
            emit: Callable[[Row], None] | None = None) -> Row:
    """Trace one model (and build torch-pruning's graph); ``emit`` sees the row after each
    phase, so that a worker killed during the TP phase still reports our result."""
    row = Row(family, name)
    try:
        model, args, kwargs = build()
        used = used_modules(model, args, kwargs)
        targets = out_channel_weights(model, used)
        row.n_weights = len(targets)
        t0 = time.perf_counter()
        g = etp_fx.trace(model, args, kwargs=kwargs)
        row.trace_s = time.perf_counter() - t0
        row.ok = True
        row.groups, row.units = len(g.groups), sum(x.size for x in g.groups)
        row.inexact = sum(not x.exact for x in g.groups)
        row.barriers = list(g.barriers)
        cov = our_coverage(g, targets)
        row.ours = share(cov, targets)
        ours_b = our_blocks(g, dict(list(targets.items())[:-1]))  # the classifier is kept
        del g
        if emit is not None:
            emit(row)
        if with_tp:
            try:
                res = tp_result(model, args, kwargs, targets)
                tcov, row.tp_s = res.cov, res.seconds
                row.tp = share(tcov, targets)
                row.ours_only = [w for w in targets if len(cov[w] - tcov[w])]
                row.tp_only = [w for w in targets if len(tcov[w] - cov[w])]
                row.same_partition = ours_b == res.blocks
                row.blocks_ours_only = describe_blocks(ours_b - res.blocks)
                row.blocks_tp_only = describe_blocks(res.blocks - ours_b)
            except BaseException as e:  # noqa: BLE001 - MemoryError included: report, go on
                row.tp_error = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    except Exception as e:  # noqa: BLE001 - report, go on
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        if os.environ.get("ZOO_DEBUG"):
            traceback.print_exc()
    finally:
        gc.collect()
    if emit is not None:
        emit(row)
    return row


_MARK = "ZOOROW "


def _worker(spec: str, with_tp: bool, mem_gb: float) -> int:
    """Run one model in this process (started by :func:`run_isolated`), rows on stdout."""
    import resource
    lim = int(mem_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    fam, name = spec.split(":", 1)
    build = {(f, n): b for f, n, b in zoo(False)}[(fam, name)]
    run_one(fam, name, build, with_tp,
            emit=lambda r: print(_MARK + json.dumps(asdict(r)), flush=True))
    return 0


def run_isolated(family: str, name: str, with_tp: bool, timeout: float, mem_gb: float) -> Row:
    """One model in a subprocess with an address-space limit and a timeout: torch-pruning's
    ``get_all_groups`` exhausts memory on some models (maxvit_t), and a big model's memory is
    given back to the machine when the worker exits."""
    cmd = [sys.executable, "-m", "benchmarks.zoo_sweep", "--worker", f"{family}:{name}",
           "--mem-gb", str(mem_gb)] + ([] if with_tp else ["--no-tp"])
    out, err, why = "", "", ""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        out, err = p.stdout, p.stderr
        if p.returncode:
            why = f"worker exited with {p.returncode}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        why = f"timed out after {timeout:.0f}s"
    rows = [json.loads(ln[len(_MARK):]) for ln in out.splitlines() if ln.startswith(_MARK)]
    if not rows:
        tail = [ln for ln in err.splitlines() if ln.strip() and "arn" not in ln][-1:] or [""]
        return Row(family, name, error=f"{why or 'no result'}: {tail[0][:160]}")
    row = Row(**rows[-1])
    if with_tp and row.ok and row.tp is None and not row.tp_error:
        row.tp_error = why or "no result"
    return row


def _pct(x: float | None) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def progress(i: int, n: int, r: Row) -> str:
    if not r.ok:
        return f"[{i}/{n}] {r.family}:{r.name}  FAILED  {r.error}"
    same = {True: ", same groups", False: ", different groups", None: ""}[r.same_partition]
    tp = "" if r.tp is None and not r.tp_error else (
        f"  tp {_pct(r.tp)}% in {r.tp_s:.1f}s{same}" if r.tp is not None
        else f"  tp FAILED {r.tp_error}")
    return (f"[{i}/{n}] {r.family}:{r.name}  groups {r.groups}  units {r.units}  barriers "
            f"{len(r.barriers)}  ours {_pct(r.ours)}%  in {r.trace_s:.1f}s{tp}")


# --- report ---------------------------------------------------------------------------------------

NOTES = """\
## How to read this

- **groups / units**: coupled channel groups found by `etp_fx.trace`, and their total units.
- **inexact**: groups whose removal changes the output even when the units are zeroed (a
  LayerNorm/RMSNorm, softmax or mean over the pruned dim); they are still prunable.
- **barriers**: ops with no channel rule (or whose rule failed); the channels they touch are
  frozen. An empty cell means none.
- **ours % / TP %**: share of Conv/Linear output channels that lie in prunable groups (defined in
  the docstring of `benchmarks/zoo_sweep.py`): over every output index of every Conv/Linear
  weight used on the example input, the fraction that some group of ours (resp. of
  torch-pruning's DependencyGraph, with the classifier's outputs kept) can remove. The final
  classifier's outputs are in both denominators and in neither numerator.
- **same groups as TP**: whether the two partitions of the Conv/Linear output channels (the
  classifier's excluded) into groups are identical, index for index (the comparison of
  `tests/test_tp_crosscheck.py`, run on every torchvision model).
- **trace s / TP s**: wall time of `etp_fx.trace` (torch.export + rules) and of
  `tp.DependencyGraph().build_dependency` + `get_all_groups` in the same process; one run each,
  the first one, so it includes warm-up (see `docs/trace_speed.md` for medians).
"""


def write_markdown(rows: list[Row], path: Path, extra: str = "") -> None:
    lines = ["# Model-zoo sweep", "",
             f"Generated by `python -m benchmarks.zoo_sweep` (torch {torch.__version__}, "
             f"{len(rows)} models, {sum(r.ok for r in rows)} traced). CPU, random weights.", "",
             NOTES, ""]
    tv = [r for r in rows if r.family == "torchvision" and r.ok and r.tp is not None]
    if tv:
        ge = sum(r.ours >= r.tp - 1e-12 for r in tv)
        same = sum(r.same_partition is True for r in tv)
        tpf = [r.name for r in rows if r.family == "torchvision" and r.ok and r.tp is None]
        lines += [f"On {len(tv)} torchvision models with a torch-pruning result, our share is >= "
                  f"torch-pruning's on {ge}; the groups are identical, index for index, on "
                  f"{same} and differ on {len(tv) - same}. torch-pruning failed on {len(tpf)} "
                  f"({', '.join(tpf)}); etp_fx traced all {sum(r.ok for r in rows if r.family == 'torchvision')} "
                  f"torchvision models with no barrier.", ""]
    if extra:
        lines += [extra, ""]
    for fam in ("torchvision", "timm", "hf", "pyg"):
        fr = [r for r in rows if r.family == fam]
        if not fr:
            continue
        lines += [f"## {fam}", ""]
        has_tp = fam == "torchvision"
        hdr = "| model | groups | units | inexact | barriers | ours % |"
        sep = "|---|---:|---:|---:|---|---:|"
        if has_tp:
            hdr += " TP % | same groups as TP |"
            sep += "---:|---|"
        hdr += " trace s |" + (" TP s |" if has_tp else "")
        sep += "---:|" + ("---:|" if has_tp else "")
        lines += [hdr, sep]
        for r in fr:
            if not r.ok:
                lines.append(f"| {r.name} | failed: {r.error.replace('|', '/')} |" + " |" * (9 if has_tp else 6))
                continue
            cells = [r.name, str(r.groups), str(r.units), str(r.inexact), barrier_ops(r.barriers),
                     _pct(r.ours)]
            if has_tp:
                cells.append(_pct(r.tp) if r.tp is not None else f"failed: {r.tp_error.replace('|', '/')}")
                cells.append({True: "yes", False: "no (see below)", None: "-"}[r.same_partition])
            cells.append(f"{r.trace_s:.1f}")
            if has_tp:
                cells.append(f"{r.tp_s:.1f}" if r.tp_s is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    diff = [r for r in rows if r.same_partition is False]
    if diff:
        lines += ["## Where our groups differ from torch-pruning's", "",
                  "Blocks are groups restricted to Conv/Linear output channels, as "
                  "`{weight[index runs]}`; up to three of each side are listed.", ""]
        for r in diff:
            lines += [f"### {r.name}", "", "only ours (first three):", ""]
            lines += [f"- `{b}`" for b in r.blocks_ours_only] + ["", "only torch-pruning's:", ""]
            lines += [f"- `{b}`" for b in r.blocks_tp_only] + [""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a handful of models; do not write docs")
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument("--no-tp", action="store_true", help="skip torch-pruning")
    ap.add_argument("--out", default=str(ROOT / "docs" / "zoo.md"))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    ap.add_argument("--mem-gb", type=float, default=10.0, help="address-space limit per model")
    ap.add_argument("--rows", default=str(ROOT / ".cache" / "benchmarks" / "zoo_rows.json"),
                    help="where the raw rows of a full run are saved")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the markdown from the rows of the last full run")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    add_allow_failures(ap)
    a = ap.parse_args(argv)
    if a.render:
        rows = [Row(**r) for r in json.loads(Path(a.rows).read_text())]
        write_markdown(rows, Path(a.out), extra=_COMMENTS)
        print(f"wrote {a.out}")
        return 0
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if a.worker:
        return _worker(a.worker, not a.no_tp, a.mem_gb)
    models = zoo(a.quick)
    if a.only:
        keep = set(a.only.split(","))
        models = [m for m in models if m[1] in keep]
    rows = []
    t0 = time.perf_counter()
    for i, (fam, name, build) in enumerate(models, 1):
        r = run_isolated(fam, name, fam == "torchvision" and not a.no_tp, a.timeout, a.mem_gb)
        rows.append(r)
        print(progress(i, len(models), r), flush=True)
        if r.ok and r.tp is not None and r.ours < r.tp - 1e-12:
            print(f"    TP covers more on: {r.tp_only[:6]}", flush=True)
    print(f"done: {sum(r.ok for r in rows)}/{len(rows)} traced in {time.perf_counter() - t0:.0f}s")
    if not a.quick and not a.only:
        Path(a.rows).parent.mkdir(parents=True, exist_ok=True)
        Path(a.rows).write_text(json.dumps([asdict(r) for r in rows], indent=1))
        write_markdown(rows, Path(a.out), extra=_COMMENTS)
        print(f"wrote {a.out}")
    return failure_exit([f"{r.family}:{r.name}: {r.error}" for r in rows if not r.ok],
                        a.allow_failures, "models")


# Findings written into docs/zoo.md beside the table (kept here so that the file regenerates).
_COMMENTS = """\
## Findings

**Share.** Wherever torch-pruning (TP) gives a result, both tools can prune every Conv/Linear
output except the classifier's, so the two shares are equal: the share saturates on these
architectures. The partition comparison (next column, and `tests/test_tp_crosscheck.py`) is the
sharper check. Outside ShuffleNet (below), the only outputs we keep are interfaces: the
classifier, both heads of LeViT and EfficientFormer (`head` and `head_dist`, 2000 outputs), the
vocabulary projection of the language models (`lm_head`, tied to the token embedding for GPT-2,
OPT and T5, which is why their share is near 50%: 1000 vocabulary rows against a few hundred
hidden units) and conv2 of the GAT (the model output).

**Where the groups differ from TP: grouped convolutions (RegNet, ResNeXt). TP is wrong here.**
For a conv with `groups=G` (not depthwise) our rule writes its input and output channels as
`Prod(G, Ci)` and `Prod(G, Co)`: three groups per block, namely whole conv groups (the G axis:
the producer's rows, the grouped conv's rows and the consumer's columns together, the
"only ours" blocks listed below), channels within a group (Ci: the producer's rows and the
grouped conv's columns, the same slot in every group), and Co. TP's dependency graph treats
the grouped conv like a dense one: its groups are {producer rows} and {grouped conv rows}, each
prunable at arbitrary indices. Removing input channel i of a grouped conv is not a slice of its
weight `[Co*G, Ci, k, k]`: `ConvPruner.prune_in_channels` in torch-pruning 1.6.1 keeps
`keep_idxs[:len(keep_idxs) // groups]`, the first positions, whatever channels were removed, so
the result computes something else unless the caller removes the same slot in every group
(TP's high-level pruners try to arrange that through `in_channel_groups`; its
`DependencyGraph` does not). Our G and Ci groups are the two removals that are exact.

**Where TP fails.** TP runs out of the 10 GB address space each model gets here on MaxViT,
swin_t and the Swin v2 models (on MaxViT inside `get_all_groups`: the index mappings it
composes through the window reshapes grow without bound), raises `TypeError` on swin_b and
swin_s and `ZeroDivisionError` on every ShuffleNet v2. We trace all of them without a
barrier.

**ShuffleNet v2 (our only non-interface freeze).** `channel_shuffle` views the concatenation of
the two branches as `[2, C/2]`, transposes and flattens: channel `c` of the result comes from
branch `c % 2`. Our algebra expresses that (`Prod(C/2, 2)`, which forces the two halves to be
pruned alike, as the `[2, C/2]` view requires). The next unit then cuts the shuffled channels
in half with `chunk(2)`; after two shuffles the cut falls inside a block of the product
(`cannot cut a 116-wide product at 58 (inner block 4)`): a channel permutation that is not a
mixed-radix product. Those channels are frozen (never guessed): 22-27% of the outputs.

**Hugging Face, timm, PyG.** Heads, head-dims and MLP neurons are separate groups; the hidden
dim is one inexact group (LayerNorm/RMSNorm). Grouped-query attention (Llama, Qwen2) gives a
kv-head group (q, k, v rows and o_proj columns), a query-heads-per-kv-head group (q rows, o
columns) and a RoPE group shared by q and k of every layer (cos/sin are computed once).
T5's relative position bias is computed in layer 0 and added in every layer, which couples the
heads of all encoder (decoder) layers into one group. The GAT with PyG's default
`GATConv(add_self_loops=True)` first removes existing self loops with a boolean mask, so the
edge count is a data-dependent (unbacked) size in the exported graph; the dims of that size
are frozen (`data-dependent size u0`) and conv1's 4 heads and 8 head-dims are groups, as with
`add_self_loops=False`.

**Rule fixes made during this sweep** (`etp_fx/rules/aten.py`):

- `index_select`, `gather`, `scatter`/`scatter_add`/`scatter_reduce`, `index_add`/`index_copy`,
  `index` (advanced indexing), `index_put`, `roll`, `flip` froze every dim of their data input
  and output; they now freeze only the addressed (or reordered) dims and pass the others
  through (GAT's message passing, Swin's cyclic shift and relative-position table);
- a `view`/`reshape` is unified run by run (cut where the running products of both shapes
  agree), so a conflict in the spatial dims (MaxViT regroups 14 = 2x7 as 7x2 between its
  window and grid attention) no longer freezes the channel dim: MaxViT from 88.7% to 98.8%;
- `prelu`: its weight is per channel (dim 1), not aligned right by numpy broadcasting (which
  paired it with the width when the sizes matched, and left it out of the group otherwise);
- `zero_` (Swin v2 zeroes the k slice of its qkv bias in the graph) had no rule: a barrier.
"""

if __name__ == "__main__":
    sys.exit(main())
