"""Scale of the module output: compress a Llama-shaped model of about 1B parameters on the CPU,
beside torch-pruning's LLM flow, and plan a Llama-3-8B-shaped model on the meta device.

``python -m benchmarks.llm_scale`` (``--quick``: a ~20M-parameter Llama in about a minute).
Every flow runs in a fresh subprocess, so ``ru_maxrss`` (the peak resident set size) is that
flow's own; flows run one after the other, never two large models at once.

Flows:

- ``etp``: ``etp_fx.compress(model, x, output="module", ratio=R, include=["head", "neuron"],
  uniform=True, keep_constants=False)`` (docs/llm.md's recipe), with the phases timed
  (trace, plan, references, slice, verify; the module output reports its own phases).
- ``tp``: torch-pruning's LLM recipe written from its public API: ``tp.pruner.BasePruner``
  with ``num_heads`` (q/k/v projections), ``prune_num_heads=True, prune_head_dims=False,
  head_pruning_ratio=R``, the MLP neurons at ``pruning_ratio=R``, then the attention modules'
  head counts and the config patched. The hidden width is kept (``o_proj`` and ``down_proj``
  are ignored as group roots, with ``lm_head``) so both flows remove the same kinds of units.
- ``tp-hidden``: the same with only ``lm_head`` ignored, as torch-pruning's LLM example does:
  the hidden width is pruned too (approximate: every RMSNorm then divides by a new width).
- ``meta``: a Llama-3-8B-shaped model built under ``torch.device("meta")`` (no weights):
  trace, then the module plan's structure (the groups a module can shrink, how many units
  each loses at ratio R with uniform widths) and its parameter count, as a first-k
  :class:`etp_fx.Plan` (a norm needs weights to rank units).

For ``etp`` the result's greedy tokens are compared with the zeroed original's (the model
with the removed units zeroed, in place, after the peak was read); torch-pruning does not say
which units it removed, so its results are run (logits finite, ``generate()`` works) and
checked for the grouped-query mapping (each kept query head still reads its key/value head).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    # TinyLlama-1.1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    # a small model of the same family, for --quick and the smoke test
    "quick": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=8000),
    # Llama-3-8B's shape, on the meta device only
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
}


_RSS_IMPORTS = [0.0]


def peak_mb() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


def build(config: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A randomly initialised ``LlamaForCausalLM`` of the named shape, and its example."""
    import transformers
    transformers.logging.set_verbosity_error()
    _RSS_IMPORTS[0] = peak_mb()  # every library of the flow is imported by now
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CONFIGS[config])
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), device=device)
    return model, {"input_ids": ids, "use_cache": False}


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (tied ones once)."""
    seen = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def same_greedy_tokens(small: torch.nn.Module, zeroed: torch.nn.Module, vocab: int) -> bool:
    """Greedy decoding with the KV cache: the same 8 new tokens after a 6-token prompt."""
    torch.manual_seed(1)
    prompt = torch.randint(0, vocab, (1, 6))
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return bool(torch.equal(small.generate(prompt, **greedy),
                                zeroed.generate(prompt, **greedy)))


def _base_record(model: torch.nn.Module, t_build: float) -> dict:
    return {"model_mb": model_bytes(model) / 2 ** 20, "rss_model_mb": peak_mb(),
            "rss_imports_mb": _RSS_IMPORTS[0],
            "build_s": t_build, "params_before": sum(p.numel() for p in model.parameters())}


def etp_worker(config: str, ratio: float, generate: bool) -> dict:
    """The module output of etp_fx, phase by phase; then the greedy-token check."""
    import etp_fx
    t0 = time.perf_counter()
    model, example = build(config)
    rec = _base_record(model, time.perf_counter() - t0)
    t0 = time.perf_counter()
    graph = etp_fx.trace(model, example)
    rec.update(trace_s=time.perf_counter() - t0, rss_after_trace_mb=peak_mb())
    t0 = time.perf_counter()
    small = etp_fx.compress(model, example, output="module", graph=graph, ratio=ratio,
                            include=["head", "neuron"], uniform=True, keep_constants=False)
    rec.update(compress_s=time.perf_counter() - t0, peak_rss_mb=peak_mb())
    report = small.etp_report
    # the module output's own phases; the trace was timed above (the graph is passed in)
    rec.update({f"{k}_s": v for k, v in report.get("seconds", {}).items() if k != "trace"})
    rec.update(gqa_mapping({p: head_digests(model, p) for p in ("q_proj", "k_proj")},
                           {p: head_digests(small, p) for p in ("q_proj", "k_proj")}))
    rec.update(params_after=report["params_after"], checked=report["checked"],
               hf_config=report.get("config"), config_exact=report.get("config_exact"))
    if generate:
        plan = {gid: g["removed"] for gid, g in report["groups"].items()}
        zeroed = etp_fx.zero_units(model, graph, plan)  # in place: the peak is already read
        t0 = time.perf_counter()
        rec["same_greedy_tokens"] = same_greedy_tokens(small, zeroed, model.config.vocab_size)
        rec["generate_s"] = time.perf_counter() - t0
    return rec


def tp_num_heads(model: torch.nn.Module) -> dict:
    """torch-pruning's ``num_heads``: query heads for q_proj, key/value heads for k/v_proj."""
    cfg = model.config
    heads = {}
    for layer in model.model.layers:
        a = layer.self_attn
        heads[a.q_proj] = cfg.num_attention_heads
        heads[a.k_proj] = heads[a.v_proj] = cfg.num_key_value_heads
    return heads


def tp_patch(model: torch.nn.Module) -> dict:
    """After torch-pruning: each attention module's head counts from its projections' widths,
    and the config from layer 0 (uniform widths); returns the changed config keys."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer in model.model.layers:
        a = layer.self_attn
        q, kv = a.q_proj.out_features // head_dim, a.k_proj.out_features // head_dim
        a.num_key_value_groups = q // kv
        for name, value in (("num_heads", q), ("num_key_value_heads", kv)):
            if hasattr(a, name):
                setattr(a, name, value)
    first = model.model.layers[0]
    new = {"num_attention_heads": first.self_attn.q_proj.out_features // head_dim,
           "num_key_value_heads": first.self_attn.k_proj.out_features // head_dim,
           "intermediate_size": first.mlp.gate_proj.out_features, "head_dim": head_dim,
           "hidden_size": model.model.embed_tokens.embedding_dim}
    changed = {k: [getattr(cfg, k, None), v] for k, v in new.items() if getattr(cfg, k, None) != v}
    for k, v in new.items():
        setattr(cfg, k, v)
    return changed


def head_digests(model: torch.nn.Module, proj: str) -> list[list[bytes]]:
    """Per layer, a digest of each head's rows of ``q_proj`` or ``k_proj`` (to find the kept
    heads after pruning without keeping a copy of the weights)."""
    import hashlib
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = []
    for layer in model.model.layers:
        w = getattr(layer.self_attn, proj).weight.detach()
        out.append([hashlib.blake2b(w[h * head_dim:(h + 1) * head_dim].contiguous().numpy()
                                    .tobytes(), digest_size=16).digest()
                    for h in range(w.shape[0] // head_dim)])
    return out


def gqa_mapping(before: dict, after: dict) -> dict:
    """Whether each kept query head still reads the key/value head it read before. Query
    head ``i`` of ``q`` heads reads key/value head ``i // (q // kv)``; after pruning, new
    query head ``j`` reads new key/value head ``j // (q' // kv')``, which must be the old
    one it read. Counts the layers where some kept query head reads another head now."""
    wrong, per_group = 0, None
    for q0, k0, q1, k1 in zip(before["q_proj"], before["k_proj"], after["q_proj"],
                              after["k_proj"]):
        q_index, k_index = {d: i for i, d in enumerate(q0)}, {d: i for i, d in enumerate(k0)}
        kept_q, kept_k = [q_index[d] for d in q1], [k_index[d] for d in k1]
        old_group = [i // (len(q0) // len(k0)) for i in kept_q]
        per_group = per_group or [old_group.count(k) for k in range(len(k0))]
        new_reads = [kept_k[j // (len(q1) // len(k1))] for j in range(len(q1))]
        wrong += new_reads != old_group
    return {"q_heads_per_kv_group_layer0": per_group, "layers_with_wrong_kv_mapping": wrong}


def tp_worker(config: str, ratio: float, generate: bool, hidden: bool = False) -> dict:
    """torch-pruning's LLM flow on the same model; the result's logits and generate().
    ``hidden``: its recipe as published, the hidden width pruned too (only ``lm_head``
    ignored), which no zeroed original describes (every RMSNorm divides by a new width)."""
    import torch_pruning as tp
    t0 = time.perf_counter()
    model, example = build(config)
    rec = _base_record(model, time.perf_counter() - t0)
    ids = example["input_ids"]
    ignored = [model.lm_head] + ([] if hidden else [
        m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)])
    t0 = time.perf_counter()
    pruner = tp.pruner.BasePruner(
        model, example_inputs=ids, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored, num_heads=tp_num_heads(model),
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
        global_pruning=False, forward_fn=lambda m, x: m(x, use_cache=False).logits)
    rec.update(graph_s=time.perf_counter() - t0, rss_after_trace_mb=peak_mb())
    digests = {p: head_digests(model, p) for p in ("q_proj", "k_proj")} if not hidden else {}
    t0 = time.perf_counter()
    pruner.step()
    rec["hf_config"] = tp_patch(model)
    rec.update(prune_s=time.perf_counter() - t0, peak_rss_mb=peak_mb(),
               params_after=sum(p.numel() for p in model.parameters()))
    if not hidden:  # with the hidden width pruned, the rows' digests change: not traceable
        rec.update(gqa_mapping(digests, {p: head_digests(model, p) for p in digests}))
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        rec["logits"] = f"shape {list(logits.shape)}, finite {bool(torch.isfinite(logits).all())}"
        if generate:
            torch.manual_seed(1)
            prompt = torch.randint(0, model.config.vocab_size, (1, 6))
            out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
            rec["generate"] = f"{out.shape[1] - 6} new tokens"
    except Exception as e:  # noqa: BLE001 - reported: TP's GQA head pruning may break forward
        rec["logits"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return rec


def meta_worker(config: str, ratio: float, generate: bool) -> dict:
    """Trace a model without weights and compute the module plan's structure: the groups a
    module can shrink and a first-k plan at ``ratio`` with uniform widths."""
    import etp_fx
    from etp_fx.surgery.module_output import module_plan
    from etp_fx.surgery.module_attrs import inexpressible_groups
    t0 = time.perf_counter()
    model, example = build(config, device="meta")
    rec = _base_record(model, time.perf_counter() - t0)
    rec["model_mb"] = 0.0  # nothing is allocated; the fp32 size would be params * 4 bytes
    t0 = time.perf_counter()
    graph = etp_fx.trace(model, example)
    rec.update(trace_s=time.perf_counter() - t0, rss_after_trace_mb=peak_mb())
    t0 = time.perf_counter()
    structure = module_plan(graph, model, etp_fx.Plan(
        first_k(graph, ratio, inexpressible_groups(graph))))
    rec.update(plan_s=time.perf_counter() - t0, peak_rss_mb=peak_mb(),
               groups=len(structure), params_after=graph.cost.params(
                   {g: graph[g].size - len(u) for g, u in structure.items()}))
    return rec


def first_k(graph, ratio: float, bad) -> dict:
    """``ratio`` of the units of every head and neuron group (rounded down, one kept): the
    removed counts of a uniform selection, without weights to choose which."""
    plan = {}
    for g in graph.groups:
        if g.unit_kind in ("head", "neuron") and g.exact and g.id not in bad:
            k = min(int(g.size * ratio), g.size - 1)
            if k > 0:
                plan[g.id] = list(range(k))
    return plan


WORKERS = {"etp": etp_worker, "tp": tp_worker, "meta": meta_worker,
           "tp-hidden": lambda c, r, g: tp_worker(c, r, g, hidden=True)}


# --- driver ---------------------------------------------------------------------------------

def run_flow(flow: str, config: str, ratio: float, generate: bool, timeout: float) -> dict:
    """One flow in a fresh subprocess; its JSON record, or ``error``."""
    cmd = [sys.executable, "-m", "benchmarks.llm_scale", "--worker", flow, "--config", config,
           "--ratio", str(ratio)] + ([] if generate else ["--no-generate"])
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"flow": flow, "config": config, "error": f"timed out after {timeout:.0f}s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = [ln for ln in p.stderr.splitlines() if ln.strip()][-3:]
        return {"flow": flow, "config": config,
                "error": f"exit {p.returncode}: {' | '.join(tail)[:400]}"}
    rec = json.loads(lines[-1])
    rec.update(flow=flow, config=config, wall_s=time.perf_counter() - t0)
    return rec


def _f(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def table(records: list[dict]) -> str:
    """The markdown table of docs/llm_scale.md."""
    head = ("| flow | model | model MB | RSS imports MB | RSS after build MB | peak RSS MB | "
            "peak / model | (peak - imports) / model | "
            "trace s | plan s | references s | slice s | verify s | params before -> after | "
            "layers whose query heads read another KV head | generate() |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['flow']} | {r['config']} | {r['error']} |")
            continue
        ratio = r["peak_rss_mb"] / r["model_mb"] if r["model_mb"] else None
        own = (r["peak_rss_mb"] - r["rss_imports_mb"]) / r["model_mb"] if r["model_mb"] else None
        greedy = {True: "same tokens as the zeroed original", False: "other tokens than the "
                  "zeroed original"}.get(r.get("same_greedy_tokens"),
                                         r.get("generate", r.get("logits", "-")))
        lines.append(
            f"| {r['flow']} | {r['config']} | {_f(r['model_mb'], 0)} | "
            f"{_f(r['rss_imports_mb'], 0)} | {_f(r['rss_model_mb'], 0)} | "
            f"{_f(r['peak_rss_mb'], 0)} | {_f(ratio, 2)} | {_f(own, 2)} | "
            f"{_f(r.get('trace_s', r.get('graph_s')))} | {_f(r.get('plan_s'))} | "
            f"{_f(r.get('references_s'))} | "
            f"{_f(r.get('slice_s', r.get('prune_s')))} | {_f(r.get('verify_s'))} | "
            f"{r['params_before']:,} -> {r['params_after']:,} | "
            f"{r.get('layers_with_wrong_kv_mapping', '-')} | {greedy} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the ~20M-parameter config only")
    ap.add_argument("--flows", default="etp,tp,tp-hidden,meta")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--no-generate", action="store_true",
                    help="skip the greedy-token check (slow on the 1B model)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--json", help="also write the records to this file")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--config", default="1b", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a.config, a.ratio, not a.no_generate)), flush=True)
        return 0
    records = []
    for flow in a.flows.split(","):
        # the meta flow allocates no weights: the 8B shape even with --quick
        config = "8b" if flow == "meta" else ("quick" if a.quick else "1b")
        records.append(run_flow(flow, config, a.ratio, not a.no_generate, a.timeout))
        print(json.dumps(records[-1]), flush=True)
    print(table(records))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    return int(any("error" in r for r in records))


if __name__ == "__main__":
    sys.exit(main())
