"""Training helpers: a progress bar, unit-norm history and its plot, and a Hugging Face hook.

Plain PyTorch needs nothing from here::

    reg = etp_fx.ExponentialTorque(etp_fx.trace(model, x), target_macs=0.25, steps=n_steps)
    loss = criterion(model(x), y) + reg(model)      # in the loop, once per step
    small = etp_fx.compress(model, x, target_macs=0.25)

What is here makes the loop pleasant:

- :func:`progress`: a tqdm bar showing the live penalty, how many units are near zero, and,
  with a target, the controlled strength and the mass left in the units the target removes;
- :class:`NormHistory` + :func:`plot_norms`: per-unit L2 norms per epoch and the paper's
  "norm over training" figure;
- :class:`ETPCallback` / :class:`ETPTrainerMixin`: the penalty inside a Hugging Face
  ``Trainer`` (imported lazily; transformers is optional).
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import RegulariserError
from ..graph.signature import check_model_matches
from .clipping import clip_small_weights
from .controller import target_selection
from .norms import UnitNorms, norm_order
from .selection import Selection
from .units import unit_sets_from_graph, unwrap

__all__ = ["progress", "NormHistory", "plot_norms", "ETPCallback", "ETPTrainerMixin",
           "target_status"]


# --- progress bar ------------------------------------------------------------------------------

def target_status(reg, model, selection: Selection | None = None) -> dict[str, float]:
    """``strength`` and ``left`` (the share of unit-norm mass in the units the target removes)
    for logs: from the controller's last update when the strength is target-driven and no
    other ``selection`` is given, else measured now against ``selection`` (empty without
    either)."""
    out = {"strength": float(reg.strength)}
    ctl = getattr(reg, "controller", None)
    if selection is None and ctl is not None:
        if ctl.last is not None:
            out["left"] = ctl.last.left
    elif selection is not None:
        out["left"] = reg.mass_left(model, selection)
    return out


class ProgressBar:
    """An iterable over a data loader with a live tqdm bar (see :func:`progress`)."""

    def __init__(self, iterable: Iterable, reg, model, every: int, tol: float,
                 selection: Selection | None = None, **tqdm_kw):
        from tqdm.auto import tqdm
        self.bar = tqdm(iterable, **tqdm_kw)
        self.reg, self.model, self.every, self.tol = reg, model, max(1, int(every)), tol
        self.selection = selection
        self.n = 0
        self.postfix: dict[str, Any] = {}

    def __iter__(self) -> Iterator:
        for item in self.bar:
            yield item
            self.n += 1
            if self.n % self.every == 0:
                self.refresh()
        self.refresh()

    def refresh(self) -> None:
        """Update the bar's postfix now: the last penalty, the count of near-zero units and,
        with a target, the strength and the mass left in the units it removes."""
        post = {}
        if self.reg.last_value is not None:
            post["penalty"] = f"{float(self.reg.last_value):.4g}"
        total = self.reg.norms.n_units
        post["zero_units"] = f"{self.reg.near_zero(self.model, self.tol)}/{total}"
        status = target_status(self.reg, self.model, self.selection)
        if "left" in status:
            post["strength"] = f"{status['strength']:.3g}"
            post["left"] = f"{status['left']:.2%}"
        self.postfix = post
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __len__(self) -> int:
        return len(self.bar)


def progress(iterable: Iterable, reg, model: torch.nn.Module, *, every: int = 20,
             tol: float = 5e-4, steps: int | None = None, selection: Selection | None = None,
             target_macs: float | None = None, target_params: float | None = None,
             ratio: float | None = None, **tqdm_kw) -> ProgressBar:
    """Wrap a data loader in a tqdm bar that shows ``penalty`` (the regulariser's last value)
    and ``zero_units`` (units whose every weight is below ``tol``: the ones the official
    per-epoch clipping would zero), refreshed every ``every`` batches (it reads all weights).

    With a target-driven regulariser it also shows ``strength`` (the controlled value) and
    ``left`` (the share of unit-norm mass still in the units the target removes); for a fixed
    strength, give the target here (``target_macs=``, ``target_params=``, ``ratio=`` or
    ``selection=``) to see ``left`` against it. ``steps``: the training length, handed to a
    target-driven regulariser that was built without it.

    >>> for x, y in etp_fx.progress(loader, reg, model, desc="epoch 3"):  # doctest: +SKIP
    ...     loss = F.cross_entropy(model(x), y) + reg(model)
    """
    target = target_selection(selection, target_macs=target_macs,
                              target_params=target_params, ratio=ratio, units=reg.units)
    _hand_steps(reg, steps)
    return ProgressBar(iterable, reg, model, every, tol, target, **tqdm_kw)


def _hand_steps(reg, steps: int | None) -> None:
    """Give a target-driven regulariser its training length if it has none yet."""
    ctl = getattr(reg, "controller", None)
    if steps is None or ctl is None:
        return
    if ctl.steps is None:
        ctl.set_steps(steps)
    elif ctl.steps != steps:
        raise RegulariserError(f"the regulariser was built for steps={ctl.steps}, but "
                               f"{steps} were given here: give the training length once")


# --- norm history ------------------------------------------------------------------------------

class NormHistory:
    """Per-unit norms recorded over training, one snapshot per :meth:`record` call.

    ``source``: a regulariser (its unit sets: groups, or the paper preset's layers) or a
    dependency graph (every group). ``norm``: ``l2`` (the paper's figure), ``l1`` or ``linf``.
    ``units``: for a graph, ``group`` or ``producer``."""

    def __init__(self, source, *, norm: Any = "l2", units: str = "group",
                 allow_approximate: bool = True) -> None:
        self.ord = norm_order(norm)
        self.norm = norm
        if hasattr(source, "unit_sets") and hasattr(source, "graph"):
            self.graph = source.graph
            sets = source.unit_sets
        else:
            self.graph = source
            sets = unit_sets_from_graph(source, units=units, allow_approximate=allow_approximate)
        if not sets:
            raise RegulariserError("NormHistory: no units to record")
        self._norms = UnitNorms(sets, dict(self.graph.signature))
        self.ids = [s.id for s in sets]
        self.epochs: list[float] = []
        self.values: dict[str, list[np.ndarray]] = {i: [] for i in self.ids}
        self._checked: Any = None

    @torch.no_grad()
    def record(self, model: torch.nn.Module, epoch: float | None = None) -> None:
        """Snapshot every unit's norm (``epoch`` defaults to the number of snapshots)."""
        model = unwrap(model)
        if self._checked is not model:
            check_model_matches(self.graph, model)
            self._checked = model
        for k, v in self._norms.arrays(self._norms.read(model, self.ord)).items():
            self.values[k].append(v)
        self.epochs.append(float(len(self.epochs) if epoch is None else epoch))

    def __len__(self) -> int:
        return len(self.epochs)

    def array(self, group_id: str) -> np.ndarray:
        """``[snapshots, units]`` norms of one group."""
        if group_id not in self.values:
            raise KeyError(f"no group {group_id!r} recorded; recorded: {self.ids[:4]}...")
        return np.stack(self.values[group_id]) if self.values[group_id] else np.zeros((0, 0))

    def to_dict(self) -> dict:
        """The norm, the recorded epochs and every group's per-epoch unit norms, as plain lists."""
        return {"norm": str(self.norm), "epochs": self.epochs,
                "values": {k: [v.tolist() for v in vs] for k, vs in self.values.items()}}

    def save(self, path: str) -> None:
        """Write :meth:`to_dict` to ``path`` as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f)


def plot_norms(history: NormHistory, path: str, *, groups: Sequence[str] | None = None,
               max_groups: int = 4, log: bool = False, title: str | None = None) -> str:
    """Draw the paper's figure: each unit's norm over training, one panel per group, lines
    coloured by the unit's index (distance from pivot 0 on the paper's chain). Saves to
    ``path`` (PNG, SVG or PDF by extension) with matplotlib's Agg backend; returns ``path``."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import cm

    if len(history) == 0:
        raise ValueError("the history is empty: call history.record(model) each epoch first")
    ids = list(groups) if groups is not None else _widest(history, max_groups)
    fig, axes = plt.subplots(1, len(ids), figsize=(4.2 * len(ids), 3.4), squeeze=False)
    x = np.asarray(history.epochs)
    for ax, gid in zip(axes[0], ids):
        a = history.array(gid)
        n = a.shape[1]
        colors = cm.viridis(np.linspace(0, 1, n))
        for u in range(n):
            ax.plot(x, a[:, u], color=colors[u], linewidth=0.8)
        ax.set_title(f"{gid} ({n} units)", fontsize=8)
        ax.set_xlabel("epoch")
        if log:
            ax.set_yscale("symlog", linthresh=1e-4)
        sm = cm.ScalarMappable(cmap="viridis", norm=matplotlib.colors.Normalize(0, n - 1))
        fig.colorbar(sm, ax=ax, label="unit index")
    axes[0][0].set_ylabel(f"{history.norm} norm of unit")
    fig.suptitle(title or "unit norms over training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _widest(history: NormHistory, k: int) -> list[str]:
    ids = sorted(history.ids, key=lambda i: -len(history.values[i][0]) if history.values[i]
                 else 0)
    keep = set(ids[:k])
    return [i for i in history.ids if i in keep]


# --- Hugging Face Trainer ----------------------------------------------------------------------

def _no_event(*args, **kwargs):
    return None


def _add_penalty(trainer, reg, model, out, return_outputs: bool, kwargs: dict):
    """Add the penalty to what ``compute_loss`` returned. When the Trainer will not divide
    the loss by the gradient-accumulation steps (the model normalised it by
    ``num_items_in_batch``), divide the penalty here, so each optimizer step gets it once.
    Only training calls count as steps of the regulariser (its clock drives a target)."""
    pen = reg(model) if getattr(model, "training", True) else reg.value(model)
    ga = int(getattr(trainer, "current_gradient_accumulation_steps", 1) or 1)
    if ga > 1:
        scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (bool(getattr(trainer, "model_accepts_loss_kwargs", False)) and
                      kwargs.get("num_items_in_batch") is not None) or \
                getattr(trainer, "compute_loss_func", None) is not None
        if scaled:
            pen = pen / ga
    if return_outputs:
        loss, outputs = out
        return loss + pen, outputs
    return out + pen


class ETPTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass to add the penalty to the loss::

        class ETPTrainer(etp_fx.ETPTrainerMixin, Trainer): ...
        trainer = ETPTrainer(model=model, args=args, train_dataset=ds, etp_reg=reg)

    The Trainer computes the loss itself (``compute_loss``); this adds ``etp_reg(model)`` to
    it, once per optimizer step under gradient accumulation."""

    def __init__(self, *args, etp_reg=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.etp_reg = etp_reg
        if etp_reg is not None:
            self.add_callback(ETPCallback(etp_reg))

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        """The Trainer's loss plus the ETP penalty."""
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if self.etp_reg is None:
            return out
        return _add_penalty(self, self.etp_reg, model, out, return_outputs, kwargs)


class ETPCallback:
    """A Hugging Face ``TrainerCallback`` that logs the penalty and near-zero units, clips
    small weights at epoch ends (optional, the official recipe), and records norms.

    With a target-driven regulariser it also logs ``etp_strength`` and ``etp_left`` (the share
    of unit-norm mass in the units the target removes), feeds the logged training loss to the
    controller (it backs off when the loss rises), and, if the regulariser was built without
    ``steps=``, tells it the training length at the start (``max_steps`` times the gradient
    accumulation steps: the regulariser is called once per micro-batch). For a fixed strength,
    ``target_macs=`` (or ``target_params=``, ``ratio=``, ``selection=``) logs ``etp_left``
    against that target.

    ``decoupled=True``: the penalty is not added to the loss; at the start of training the
    regulariser is attached to the Trainer's optimiser (:meth:`ExponentialTorque.attach`: a
    proximal update after every optimiser step, which also counts the steps, so the training
    length handed over is ``max_steps``), and the logged loss feeds the controller. The
    recommended form with Adam(W).

    It follows the callback protocol without subclassing ``TrainerCallback`` (events it does
    not handle are no-ops), so ``import etp_fx`` never imports transformers.

    ``attach(trainer)`` also wraps the trainer's ``compute_loss`` so the penalty enters the
    loss (a callback alone cannot change the loss)::

        trainer = Trainer(model=model, args=args, train_dataset=ds)
        etp_fx.ETPCallback(reg, clip=5e-4).attach(trainer)
        trainer.train()
    """

    def __init__(self, reg, *, clip: float | None = None, history: NormHistory | None = None,
                 tol: float = 5e-4, selection: Selection | None = None,
                 target_macs: float | None = None, target_params: float | None = None,
                 ratio: float | None = None, decoupled: bool = False) -> None:
        self.reg, self.clip, self.history, self.tol = reg, clip, history, tol
        self.decoupled = bool(decoupled)
        self.selection = target_selection(selection, target_macs=target_macs,
                                          target_params=target_params, ratio=ratio,
                                          units=reg.units)
        self.attached = False

    def attach(self, trainer) -> "ETPCallback":
        """Add the penalty to ``trainer``'s loss and register this callback; returns self.

        Raises :class:`RegulariserError` if the trainer already has a penalty attached."""
        if getattr(trainer, "_etp_attached", False):
            raise RegulariserError("this trainer already has an ETP penalty attached")
        if self.decoupled:  # no loss term: on_train_begin attaches to the optimiser
            trainer._etp_attached = True
            trainer.add_callback(self)
            self.attached = True
            return self
        original = trainer.compute_loss
        reg = self.reg

        def compute_loss(model, inputs, return_outputs=False, **kwargs):
            out = original(model, inputs, return_outputs=return_outputs, **kwargs)
            return _add_penalty(trainer, reg, model, out, return_outputs, kwargs)

        trainer.compute_loss = compute_loss
        trainer._etp_attached = True
        trainer.add_callback(self)
        self.attached = True
        return self

    # TrainerCallback events
    def __getattr__(self, name: str):
        if name.startswith("on_"):  # every other event of the protocol: nothing to do
            return _no_event
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Hand the training length to a target-driven regulariser built without it; with
        ``decoupled=True`` attach the regulariser to the Trainer's optimiser."""
        ctl = getattr(self.reg, "controller", None)
        if ctl is not None and ctl.steps is None and state.max_steps and state.max_steps > 0:
            ga = 1 if self.decoupled else int(getattr(args, "gradient_accumulation_steps", 1)
                                              or 1)
            ctl.set_steps(int(state.max_steps) * ga)
        if self.decoupled:
            if optimizer is None or model is None:
                raise RegulariserError("ETPCallback(decoupled=True) needs the Trainer's "
                                       "optimizer and model at on_train_begin (transformers "
                                       "passes both); attach the regulariser yourself with "
                                       "reg.attach(optimizer, model) otherwise")
            # accelerate wraps the optimiser; the step hooks run on the wrapped one
            self.reg.attach(getattr(optimizer, "optimizer", optimizer), model)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Remove the decoupled update's hook (``decoupled=True``)."""
        if self.decoupled:
            self.reg.detach()
        return control

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        """Add ``etp_penalty``, ``etp_zero_units`` and, with a target, ``etp_strength`` and
        ``etp_left`` to the Trainer's logs."""
        if logs is None or "loss" not in logs or (self.reg.last_value is None and
                                                  not self.decoupled):
            return control
        self.reg.observe(float(logs["loss"]))
        extra = {} if self.reg.last_value is None else {
            "etp_penalty": float(self.reg.last_value)}
        if model is not None:
            extra["etp_zero_units"] = self.reg.near_zero(model, self.tol)
            status = target_status(self.reg, model, self.selection)
            if "left" in status:
                extra["etp_strength"], extra["etp_left"] = status["strength"], status["left"]
        logs.update(extra)
        # the Trainer appended a copy of ``logs`` to the history before calling callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        """Clip tiny weights (if ``clip`` is set) and record unit norms (if ``history`` is)."""
        if model is not None:
            if self.clip is not None:
                clip_small_weights(model, self.clip, self.reg)
            if self.history is not None:
                self.history.record(model, state.epoch)
        return control
