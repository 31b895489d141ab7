"""GAT on PPI (multi-label node classification) with PyTorch Geometric, ETP, and etp_fx.

What it shows
    The ETP paper's graph experiment: a 3-layer GAT with linear skip connections (the model of
    PyG's ``examples/ppi.py``: 4 heads of 256, then 6 averaged heads of 121 outputs) trained
    on PPI's 20 training graphs with the ETP penalty, then compressed. ``etp_fx.trace`` sees
    through PyG's message passing (gather, scatter-softmax, scatter-add): each hidden
    ``GATConv`` has a group of heads and a group of head-dims (coupled with the skip ``Linear``
    that adds into it); the last layer's 6 heads are averaged, so removing one changes the
    mean: an *approximate* group, left alone. The report gives micro-F1 before and after.

Two things to know about GATs and torch.export
    * ``GATConv(add_self_loops=True)`` first *removes* existing self loops with a boolean
      mask, so the number of edges inside the layer depends on the data: torch.export makes
      it an unbacked size and ``etp_fx.trace`` cannot build the dependency graph. We add the
      self loops once in the data pipeline (``RemoveSelfLoops`` then ``AddSelfLoops``) and
      build the layers with ``add_self_loops=False``: the same computation, traceable.
    * ``etp_fx.compress`` keeps only dim 0 of each input symbolic (here: the number of nodes).
      The number of edges is fixed to the example's, so we compress with the graph we
      evaluate on (the test graphs batched into one) as the example input.

Run it on the real data
    ``--data ROOT`` is handed to ``torch_geometric.datasets.PPI(root=ROOT)``: a folder with
    PPI's ``raw/`` files (or ``processed/``). If they are missing PyG downloads them, in this
    real mode only::

        python examples/gat_ppi.py --data ~/data/PPI --epochs 100 --out gat-out

Smoke test (offline, seconds)::

    python examples/gat_ppi.py --smoke

    generates stochastic-block-model graphs with 50 node features and 121 labels that depend
    on each node's block, and trains a GAT of 4 heads of 16 for a few steps.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import etp_fx  # noqa: E402


class GAT(nn.Module):
    """PyG's PPI GAT: three GATConv layers, each with a linear skip connection."""

    def __init__(self, in_dim: int, hidden: int, heads: int, out_dim: int,
                 out_heads: int) -> None:
        super().__init__()
        from torch_geometric.nn import GATConv
        # add_self_loops=False: the self loops are in edge_index already (see the docstring)
        self.conv1 = GATConv(in_dim, hidden, heads=heads, add_self_loops=False)
        self.lin1 = nn.Linear(in_dim, heads * hidden)
        self.conv2 = GATConv(heads * hidden, hidden, heads=heads, add_self_loops=False)
        self.lin2 = nn.Linear(heads * hidden, heads * hidden)
        self.conv3 = GATConv(heads * hidden, out_dim, heads=out_heads, concat=False,
                             add_self_loops=False)
        self.lin3 = nn.Linear(heads * hidden, out_dim)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        x = F.elu(self.conv1(x, edge_index) + self.lin1(x))
        x = F.elu(self.conv2(x, edge_index) + self.lin2(x))
        return self.conv3(x, edge_index) + self.lin3(x)


def self_loops():
    """The transform that makes ``add_self_loops=False`` compute what GATConv's default does."""
    import torch_geometric.transforms as T
    return T.Compose([T.RemoveSelfLoops(), T.AddSelfLoops()])


def ppi(root: Path):
    """PPI's train/val/test splits from ``root`` (PyG's dataset class)."""
    from torch_geometric.datasets import PPI
    return [PPI(str(root), split=s, transform=self_loops()) for s in ("train", "val", "test")]


def fake_ppi(n_graphs: int, seed: int):
    """Stochastic-block-model graphs with block-dependent features and labels (``--smoke``)."""
    from torch_geometric.data import Data
    from torch_geometric.utils import stochastic_blockmodel_graph
    g = torch.Generator().manual_seed(seed)
    blocks = 4
    feat_mean = torch.randn(blocks, 50, generator=g)
    label_prob = torch.rand(blocks, 121, generator=g)
    probs = torch.full((blocks, blocks), 0.02) + 0.2 * torch.eye(blocks)
    tf, graphs = self_loops(), []
    for _ in range(n_graphs):
        sizes = torch.randint(10, 20, (blocks,), generator=g)
        block = torch.repeat_interleave(torch.arange(blocks), sizes)
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        ei = stochastic_blockmodel_graph(sizes, probs)
        x = feat_mean[block] + torch.randn(len(block), 50, generator=g)
        y = (torch.rand(len(block), 121, generator=g) < label_prob[block]).float()
        graphs.append(tf(Data(x=x, edge_index=ei, y=y)))
    return graphs[: n_graphs // 2], graphs[n_graphs // 2: n_graphs // 2 + 1], \
        graphs[n_graphs // 2 + 1:]


@torch.no_grad()
def micro_f1(model, x, edge_index, y) -> float:
    """Micro-averaged F1 of the multi-label prediction ``logit > 0`` (as sklearn's
    ``f1_score(average="micro")``)."""
    pred, y = model(x, edge_index) > 0, y > 0.5
    tp = float((pred & y).sum())
    fp, fn = float((pred & ~y).sum()), float((~pred & y).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, data_help="PPI root folder (torch_geometric.datasets.PPI)",
                 epochs=100, lr=0.005, batch_size=2, strength=None, target_macs=0.25)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    args = C.finish_args(p.parse_args(argv), "gat_ppi")
    C.limit_threads(args.smoke)
    from torch_geometric.data import Batch
    from torch_geometric.loader import DataLoader
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times: dict[str, float] = {}
    if args.smoke:
        train_set, val_set, test_set = fake_ppi(6, args.seed)
        args.hidden, args.epochs, args.target_macs = 16, 3, 0.5
    else:
        train_set, val_set, test_set = ppi(Path(args.data).expanduser())
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    test = Batch.from_data_list(list(test_set)).to(device)  # one graph: the test graphs batched
    print(f"{len(train_set)} training graphs, test: {test.num_nodes} nodes, "
          f"{test.num_edges} edges (self loops included)")

    # 1. model, trace, regulariser
    model = GAT(train_set[0].num_features, args.hidden, args.heads, 121, 6).to(device)
    first = train_set[0].to(device)
    with C.timed("trace", times):
        graph = etp_fx.trace(model, (first.x, first.edge_index))
    reg = C.regulariser(args, graph, args.epochs * len(loader))  # the target drives it
    for g in graph.groups:
        print(f"  group {g.id}: {g.size} {g.unit_kind}s, {'exact' if g.exact else 'approximate'}")

    # 2. train (Adam, BCE over the 121 labels) with the penalty
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    with C.timed("train", times):
        for epoch in range(args.epochs):
            model.train()
            for data in etp_fx.progress(loader, reg, model, desc=f"epoch {epoch}",
                                        disable=args.smoke):
                data = data.to(device)
                task = F.binary_cross_entropy_with_logits(model(data.x, data.edge_index), data.y)
                loss = task + reg(model, loss=task)  # the task loss lets the strength back off
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            C.log_epoch(epoch, "task loss", task, reg, model)
    print(C.describe(reg))

    # 3. compress, with the test graph as the example input (its edge count is baked in)
    model.eval()
    how = C.target(args)
    with C.timed("compress", times):
        small = etp_fx.compress(model, (test.x, test.edge_index), **how)

    # 4. report
    with C.timed("evaluate", times):
        f1 = (micro_f1(model, test.x, test.edge_index, test.y),
              micro_f1(small, test.x, test.edge_index, test.y))
    metrics = [("test micro-F1", *f1)]
    return C.publish(args, "gat_ppi", small, metrics, times, {"selection": how})


if __name__ == "__main__":
    main()
