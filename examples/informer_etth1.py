"""An Informer-style forecaster on ETTh1 (96 hours -> next 24), trained with ETP, compressed.

What it shows
    The ETP paper's time-series experiment. The model follows Informer's architecture (Zhou
    et al., 2021): a token embedding (circular Conv1d) + positional + time-feature embedding,
    an encoder of self-attention layers with *distilling* convolutions between them
    (Conv1d + BatchNorm + ELU + max-pool halving the sequence), a decoder with causal
    self-attention and cross-attention fed the last 48 known steps plus 24 zero placeholders,
    and a linear projection to the 7 variables. One simplification: attention is plain full
    attention (``F.scaled_dot_product_attention``), not Informer's ProbSparse attention,
    whose top-u query sampling is a data-dependent selection; full attention is what
    Informer's own ``--attn full`` option uses.

    ``etp_fx.trace`` finds per layer a group of attention heads, groups of head-dims and a
    group of FFN neurons (Conv1d with kernel 1); ``d_model`` is one approximate group
    (LayerNorm), left alone. The report gives test MSE and MAE on standardised data (as the
    paper and Informer report them) before and after compression.

Run it on the real data
    ``--data`` is the ETTh1 CSV (columns ``date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT``, from
    https://github.com/zhouhaoyi/ETDataset)::

        python examples/informer_etth1.py --data ~/data/ETT-small/ETTh1.csv --out informer-out

    Splits, scaling and time features follow Informer's ``Dataset_ETT_hour``: 12/4/4 months
    for train/val/test, standardised with the training months' statistics, the "M" setting
    (all 7 variables in, all 7 out). Defaults: d_model 512, 8 heads, 2 encoder and 1 decoder
    layers, d_ff 2048, Adam lr 1e-4, batch 32, 6 epochs.

Smoke test (offline, seconds)::

    python examples/informer_etth1.py --smoke

    writes 7 noisy sinusoids as an hourly CSV with the ETTh1 columns, reads it through the same
    loader (shorter than ETTh1, so split 70/10/20) and trains a d_model-32 model a few steps.
"""
from __future__ import annotations

import csv
import math
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import etp_fx  # noqa: E402

COLUMNS = ["date", "HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
SEQ, LABEL, PRED = 96, 48, 24


# --- data: the ETTh1 CSV ---------------------------------------------------------------------

def time_features(dates: list[datetime]) -> np.ndarray:
    """Informer's ``timeF`` features for hourly data, each scaled to [-0.5, 0.5]: hour of day,
    day of week, day of month, day of year."""
    return np.array([[d.hour / 23 - 0.5, d.weekday() / 6 - 0.5, (d.day - 1) / 30 - 0.5,
                      (d.timetuple().tm_yday - 1) / 365 - 0.5] for d in dates], dtype=np.float32)


def read_ett(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(values [T, 7], time features [T, 4])`` of an ETT CSV."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows[0] != COLUMNS:
        raise SystemExit(f"{path}: expected the columns {','.join(COLUMNS)}, got {rows[0]}")
    dates = [datetime.fromisoformat(r[0]) for r in rows[1:]]
    values = np.array([[float(v) for v in r[1:]] for r in rows[1:]], dtype=np.float32)
    return values, time_features(dates)


def splits(values: np.ndarray, marks: np.ndarray):
    """Train/val/test windows' source arrays, standardised with the training statistics.
    ETTh1's official borders (12/4/4 months) when the series is that long, else 70/10/20."""
    n = len(values)
    month = 30 * 24
    if n >= 20 * month:
        b = [0, 12 * month, 16 * month, 20 * month]
    else:
        b = [0, int(0.7 * n), int(0.8 * n), n]
    mean, std = values[: b[1]].mean(0), values[: b[1]].std(0) + 1e-8
    z = (values - mean) / std
    # each split starts SEQ steps early so its first window's target lies inside it
    starts = [b[0], b[1] - SEQ, b[2] - SEQ]
    return [(z[starts[i]: b[i + 1]], marks[starts[i]: b[i + 1]]) for i in range(3)]


class Windows(torch.utils.data.Dataset):
    """Sliding windows: encoder input (96 steps), decoder input (the last 48 known steps and
    24 zeros), their time features, and the 24-step target."""

    def __init__(self, z: np.ndarray, marks: np.ndarray) -> None:
        self.z, self.m = torch.from_numpy(z), torch.from_numpy(marks)

    def __len__(self) -> int:
        return max(0, len(self.z) - SEQ - PRED + 1)

    def __getitem__(self, i: int):
        s, e = i + SEQ, i + SEQ + PRED
        x_dec = torch.cat([self.z[s - LABEL: s], torch.zeros(PRED, self.z.shape[1])])
        return self.z[i:s], self.m[i:s], x_dec, self.m[s - LABEL: e], self.z[s:e]


def write_fake_ett(path: Path, hours: int, seed: int) -> Path:
    """Seven noisy sinusoids (daily, weekly and slower periods) as an hourly ETT CSV."""
    rng = np.random.default_rng(seed)
    t = np.arange(hours)
    start = datetime(2016, 7, 1)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for i in range(hours):
            vals = [5 * math.sin(2 * math.pi * t[i] / p + k) + rng.normal(0, 0.3)
                    for k, p in enumerate((24, 24, 168, 12, 24, 48, 96))]
            w.writerow([(start + timedelta(hours=i)).strftime("%Y-%m-%d %H:%M:%S"),
                        *[f"{v:.3f}" for v in vals]])
    return path


# --- the model ---------------------------------------------------------------------------------

class DataEmbedding(nn.Module):
    """Value (circular Conv1d over time) + sinusoidal position + time-feature embedding."""

    def __init__(self, c_in: int, d_model: int, dropout: float, max_len: int = 512) -> None:
        super().__init__()
        self.value = nn.Conv1d(c_in, d_model, 3, padding=1, padding_mode="circular", bias=False)
        self.time = nn.Linear(4, d_model, bias=False)
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        self.register_buffer("pe", pe, persistent=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mark: torch.Tensor) -> torch.Tensor:
        v = self.value(x.transpose(1, 2)).transpose(1, 2)
        return self.drop(v + self.pe[: x.shape[1]] + self.time(mark))


class Attention(nn.Module):
    """Multi-head full attention (Informer's ``AttentionLayer`` with ``FullAttention``)."""

    def __init__(self, d_model: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.v, self.o = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        b, lq, _ = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(mem)),
                                             split(self.v(mem)), is_causal=self.causal)
        return self.o(out.transpose(1, 2).reshape(b, lq, -1))


class FeedForward(nn.Module):
    """Informer's position-wise FFN: two Conv1d with kernel 1 around a GELU."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(d_model, d_ff, 1), nn.Conv1d(d_ff, d_model, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(F.gelu(self.conv1(x.transpose(1, 2))))
        return self.drop(self.conv2(y).transpose(1, 2))


class EncoderLayer(nn.Module):
    def __init__(self, d_model, heads, d_ff, dropout):
        super().__init__()
        self.attn, self.ff = Attention(d_model, heads), FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = self.norm1(x + self.drop(self.attn(x, x)))
        return self.norm2(x + self.ff(x))


class Distill(nn.Module):
    """Informer's distilling ``ConvLayer``: halves the sequence between encoder layers."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, 3, padding=1, padding_mode="circular")
        self.norm = nn.BatchNorm1d(d_model)
        self.pool = nn.MaxPool1d(3, stride=2, padding=1)

    def forward(self, x):
        return self.pool(F.elu(self.norm(self.conv(x.transpose(1, 2))))).transpose(1, 2)


class DecoderLayer(nn.Module):
    def __init__(self, d_model, heads, d_ff, dropout):
        super().__init__()
        self.self_attn = Attention(d_model, heads, causal=True)
        self.cross_attn = Attention(d_model, heads)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mem):
        x = self.norm1(x + self.drop(self.self_attn(x, x)))
        x = self.norm2(x + self.drop(self.cross_attn(x, mem)))
        return self.norm3(x + self.ff(x))


class Informer(nn.Module):
    """Encoder (with distilling) - decoder forecaster; returns the last ``PRED`` steps."""

    def __init__(self, c: int = 7, d_model: int = 512, heads: int = 8, e_layers: int = 2,
                 d_layers: int = 1, d_ff: int = 2048, dropout: float = 0.05) -> None:
        super().__init__()
        self.enc_emb = DataEmbedding(c, d_model, dropout)
        self.dec_emb = DataEmbedding(c, d_model, dropout)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, heads, d_ff, dropout)
                                     for _ in range(e_layers))
        self.distill = nn.ModuleList(Distill(d_model) for _ in range(e_layers - 1))
        self.enc_norm = nn.LayerNorm(d_model)
        self.decoder = nn.ModuleList(DecoderLayer(d_model, heads, d_ff, dropout)
                                     for _ in range(d_layers))
        self.dec_norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, c)

    def forward(self, x_enc, mark_enc, x_dec, mark_dec):
        h = self.enc_emb(x_enc, mark_enc)
        for i, layer in enumerate(self.encoder):
            h = layer(h)
            if i < len(self.distill):
                h = self.distill[i](h)
        mem = self.enc_norm(h)
        y = self.dec_emb(x_dec, mark_dec)
        for layer in self.decoder:
            y = layer(y, mem)
        return self.proj(self.dec_norm(y))[:, -PRED:]


@torch.no_grad()
def mse_mae(model, loader, device) -> tuple[float, float]:
    """Mean squared and absolute error over the loader, on standardised values."""
    se = ae = n = 0.0
    for *inputs, target in loader:
        pred = model(*(t.to(device) for t in inputs)).cpu()
        se += float(((pred - target) ** 2).sum())
        ae += float((pred - target).abs().sum())
        n += target.numel()
    return se / n, ae / n


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, data_help="the ETTh1.csv file", epochs=6, lr=1e-4, batch_size=32,
                 strength=None, target_macs=0.25)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many")
    args = C.finish_args(p.parse_args(argv), "informer_etth1")
    C.limit_threads(args.smoke)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times: dict[str, float] = {}
    if args.smoke:
        path = write_fake_ett(C.smoke_dir(args) / "ETTh1.csv", 700, args.seed)
        args.d_model, args.heads, args.d_ff, args.epochs, args.max_steps = 32, 4, 64, 2, 4
        args.lr, args.target_macs = 1e-3, 0.5
    else:
        path = Path(args.data).expanduser()
    values, marks = read_ett(path)
    (ztr, mtr), _, (zte, mte) = splits(values, marks)
    train = torch.utils.data.DataLoader(Windows(ztr, mtr), batch_size=args.batch_size,
                                        shuffle=True, drop_last=True)
    test = torch.utils.data.DataLoader(Windows(zte, mte), batch_size=args.batch_size)
    print(f"{path}: {len(values)} hourly rows, {len(train.dataset)} training and "
          f"{len(test.dataset)} test windows ({SEQ} -> {PRED})")

    # 1. model, trace on one window, regulariser
    model = Informer(values.shape[1], args.d_model, args.heads, d_ff=args.d_ff).to(device)
    example = tuple(t[:1].to(device) for t in next(iter(test))[:4])
    with C.timed("trace", times):
        graph = etp_fx.trace(model, example)
    steps = args.epochs * min(len(train), args.max_steps or len(train))
    reg = C.regulariser(args, graph, steps)  # the MACs target drives the strength
    print(f"traced: {len(graph.groups)} groups ({len(reg.unit_sets)} exact, penalised), "
          f"barriers: {graph.barriers or 'none'}")

    # 2. train: MSE on the 24 future steps, plus the penalty
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    with C.timed("train", times):
        for epoch in range(args.epochs):
            model.train()
            for step, (*inputs, target) in enumerate(
                    etp_fx.progress(train, reg, model, desc=f"epoch {epoch}", disable=args.smoke)):
                task = F.mse_loss(model(*(t.to(device) for t in inputs)), target.to(device))
                loss = task + reg(model, loss=task)  # the task loss lets the strength back off
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if args.max_steps and step + 1 >= args.max_steps:
                    break
            C.log_epoch(epoch, "task MSE", task, reg, model)
    print(C.describe(reg))

    # 3. compress
    model.eval()
    how = C.target(args)
    with C.timed("compress", times):
        small = etp_fx.compress(model, example, graph=graph, **how)

    # 4. report
    with C.timed("evaluate", times):
        (mse0, mae0), (mse1, mae1) = mse_mae(model, test, device), mse_mae(small, test, device)
    metrics = [("test MSE", mse0, mse1), ("test MAE", mae0, mae1)]
    return C.publish(args, "informer_etth1", small, metrics, times, {"selection": how})


if __name__ == "__main__":
    main()
