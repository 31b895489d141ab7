"""Baselines on the same model and the same loop, for honest comparisons with ETP.

Every method has one interface, so a benchmark runs each through identical code::

    method = etp_fx.baselines.make("greg", model, example_inputs, pruning_ratio=0.5)
    for step, (x, y) in enumerate(loader):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + method.penalty(model)   # 0 for torch-pruning
        loss.backward()
        method.regularize(model)          # after backward, before opt.step()
        opt.step()
    model = method.step()                 # prune (torch-pruning: in place; ETP: compress)
    # ... fine-tune with the same loop (penalty/regularize are no-ops once pruned)

Methods:

- ``"etp"``: :class:`ETPMethod`, this library's regulariser (penalty in the loss);
- ``"greg"``: torch-pruning's ``GrowingRegPruner`` (GReg: a per-channel L2 penalty that grows
  for unimportant channels every ``update_every`` steps);
- ``"groupnorm"``: torch-pruning's ``GroupNormPruner`` (DepGraph's group sparse training);
- ``"magnitude"``: torch-pruning's ``MagnitudePruner`` (no regulariser: one-shot pruning by
  group L2 magnitude, then fine-tuning).

torch-pruning is optional; it is imported when a baseline is built.

``heads_and_neurons=True`` (torch-pruning methods) restricts a decoder transformer (Hugging
Face Llama-style attention with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and an MLP with
``down_proj``) to whole attention heads and MLP neurons, as ``include=["head", "neuron"]``
selections do in this library: the residual width (embeddings, norms, ``o_proj``/``down_proj``
outputs, ``lm_head``) is left alone and heads are removed whole (``prune_num_heads=True``,
``prune_head_dims=False``, ``head_pruning_ratio`` = ``pruning_ratio``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .errors import OptionError, RegulariserError
from .graph.trace import trace
from .regularise import select
from .regularise.clipping import clip_small_weights
from .regularise.torque import ExponentialTorque
from .surgery.compress import compress

__all__ = ["PruningMethod", "ETPMethod", "TorchPruningMethod", "GReg", "GroupNorm", "Magnitude",
           "make", "METHODS", "heads_and_neurons_kwargs"]


def _tp():
    try:
        import torch_pruning
    except ImportError as e:  # pragma: no cover - the dev extra installs it
        raise ImportError("the torch-pruning baselines need `pip install torch-pruning`") from e
    return torch_pruning


def default_ignored(model: nn.Module) -> list[nn.Module]:
    """The classifier: the last Linear (or, failing that, Conv) module in definition order."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                last = m
    return [last] if last is not None else []


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with Llama-style ``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linear children."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [m for m in model.modules()
            if all(isinstance(getattr(m, n, None), nn.Linear) for n in names)]


def heads_and_neurons_kwargs(model: nn.Module, pruning_ratio: float) -> dict[str, Any]:
    """torch-pruning keywords that prune only whole attention heads and MLP neurons.

    Parameters
    ----------
    model : nn.Module
        A decoder transformer with Llama-style attention modules (``q_proj``, ``k_proj``,
        ``v_proj``, ``o_proj``, a ``head_dim`` attribute or ``num_heads``).
    pruning_ratio : float
        The share of heads to remove in every layer (the same ratio as the MLP neurons), but
        every layer keeps one head (torch-pruning skips a layer whose ratio would remove all
        of its heads, so a larger ratio would remove none; etp_fx selections keep one too).

    Returns
    -------
    dict
        ``num_heads``, ``prune_num_heads``, ``prune_head_dims``, ``head_pruning_ratio`` and
        ``ignored_layers`` (embeddings, norms, ``lm_head``, and the projections that write the
        residual stream: blocking their outputs leaves the hidden width alone).
    """
    attn = _attention_modules(model)
    if not attn:
        raise OptionError(
            f"heads_and_neurons=True needs Llama-style attention modules (q_proj, k_proj, "
            f"v_proj, o_proj); {type(model).__name__} has none: drop heads_and_neurons")
    num_heads: dict[nn.Module, int] = {}
    ignored: list[nn.Module] = []
    for a in attn:
        head_dim = getattr(a, "head_dim", None) or a.q_proj.out_features // a.num_heads
        for proj in (a.q_proj, a.k_proj, a.v_proj):
            num_heads[proj] = proj.out_features // head_dim
        ignored.append(a.o_proj)
    fewest = min(num_heads.values())
    # torch-pruning keeps int(n * (1 - ratio)) heads: stay a hair under (n - 1) / n so that
    # float rounding cannot make it 0 (which would remove nothing)
    head_ratio = min(pruning_ratio, (fewest - 1) / fewest - 1e-6)
    for name, m in model.named_modules():
        residual_writer = name.endswith("down_proj") or name.endswith("lm_head")
        is_norm = "norm" in type(m).__name__.lower()
        if residual_writer or is_norm or isinstance(m, nn.Embedding):
            ignored.append(m)
    return dict(num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
                head_pruning_ratio=max(head_ratio, 0.0), ignored_layers=ignored)


class PruningMethod:
    """The shared interface. Subclasses override what they need."""

    name = "base"

    def __init__(self, model: nn.Module, example_inputs: Any) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.pruned = False
        self.steps = 0

    def penalty(self, model: nn.Module) -> torch.Tensor | float:
        """A term to add to the loss (differentiable), or 0."""
        return 0.0

    def regularize(self, model: nn.Module) -> None:
        """Called after ``loss.backward()`` and before ``optimizer.step()``."""
        self.steps += 1

    def epoch_end(self, model: nn.Module) -> None:
        """Called after each epoch (ETP: the official clipping)."""

    def step(self) -> nn.Module:
        """Prune now; returns the model to keep training (the same object when pruned in
        place). Afterwards :meth:`penalty` and :meth:`regularize` do nothing."""
        raise NotImplementedError

    def params_and_macs(self, model: nn.Module | None = None) -> tuple[int, int]:
        """Parameters and MACs of the model now, counted by torch-pruning (the same counter
        for every method)."""
        tp = _tp()
        model = self.model if model is None else model
        macs, params = tp.utils.count_ops_and_params(model, self.example_inputs)
        return int(params), int(macs)


class TorchPruningMethod(PruningMethod):
    """A torch-pruning pruner behind the shared interface."""

    pruner_cls = "BasePruner"

    def __init__(self, model: nn.Module, example_inputs: Any, *, pruning_ratio: float = 0.5,
                 global_pruning: bool = False, ignored_layers: Sequence[nn.Module] | None = None,
                 round_to: int | None = None, importance: Any = None,
                 heads_and_neurons: bool = False, **pruner_kw) -> None:
        super().__init__(model, example_inputs)
        tp = _tp()
        if heads_and_neurons:
            only = heads_and_neurons_kwargs(model, pruning_ratio)
            ignored_layers = list(ignored_layers or []) + only.pop("ignored_layers")
            pruner_kw = {**only, **pruner_kw}
        if ignored_layers is None:
            ignored_layers = default_ignored(model)
        if importance is None:
            importance = tp.importance.GroupMagnitudeImportance(p=2)
        cls = getattr(tp.pruner, self.pruner_cls)
        self.pruner = cls(model, example_inputs, importance=importance,
                          pruning_ratio=pruning_ratio, global_pruning=global_pruning,
                          ignored_layers=list(ignored_layers), round_to=round_to, **pruner_kw)

    def step(self) -> nn.Module:
        if not self.pruned:
            self.pruner.step()
            self.pruned = True
        return self.model


class GReg(TorchPruningMethod):
    """torch-pruning ``GrowingRegPruner``: ``regularize`` after backward; the per-channel
    coefficients grow by ``delta_reg`` (scaled by unimportance) every ``update_every`` steps."""

    name = "greg"
    pruner_cls = "GrowingRegPruner"

    def __init__(self, model, example_inputs, *, reg: float = 1e-4, delta_reg: float = 1e-4,
                 update_every: int = 10, **kw) -> None:
        super().__init__(model, example_inputs, reg=reg, delta_reg=delta_reg, **kw)
        self.update_every = max(1, int(update_every))

    def regularize(self, model: nn.Module) -> None:
        if self.pruned:
            return
        self.pruner.regularize(model)
        self.steps += 1
        if self.steps % self.update_every == 0:
            self.pruner.update_reg()


class GroupNorm(TorchPruningMethod):
    """torch-pruning ``GroupNormPruner`` (DepGraph sparse training): ``regularize`` after
    backward adds the group-norm penalty's gradient."""

    name = "groupnorm"
    pruner_cls = "GroupNormPruner"

    def __init__(self, model, example_inputs, *, reg: float = 1e-4, alpha: float = 4, **kw):
        super().__init__(model, example_inputs, reg=reg, alpha=alpha, **kw)

    def regularize(self, model: nn.Module) -> None:
        if self.pruned:
            return
        self.pruner.regularize(model)
        self.steps += 1


class Magnitude(TorchPruningMethod):
    """torch-pruning ``MagnitudePruner``: no regulariser; ``step`` prunes the lowest group
    L2 magnitudes at once, the loop then fine-tunes."""

    name = "magnitude"
    pruner_cls = "MagnitudePruner"


class ETPMethod(PruningMethod):
    """ETP behind the same interface: the penalty joins the loss; ``epoch_end`` applies the
    official clipping (optional); ``step`` selects units (default: exactly-zero ones, or a
    MACs budget) and removes them with ``etp_fx.compress`` (exact: ETP's zero units carry
    no information, so no fine-tuning is needed; the compressed graph keeps BatchNorm on
    running statistics).

    With ``target_macs`` and ``steps`` (the number of ``penalty`` calls before ``step``) and
    no ``strength``, the target drives the strength (see ``docs/etp.md``); ``strength=``
    fixes it (the target then only chooses what ``step`` removes). Without a target the
    strength defaults to ``1e-3``."""

    name = "etp"

    def __init__(self, model: nn.Module, example_inputs: Any, *, strength: float | None = None,
                 clip: float | None = 5e-4, threshold: float | None = 0.0,
                 target_macs: float | None = None, steps: int | None = None, graph=None,
                 regulariser: Callable | None = None, **reg_kw) -> None:
        super().__init__(model, example_inputs)
        self.graph = graph if graph is not None else trace(model, example_inputs)
        cls = regulariser or ExponentialTorque
        if strength is None and target_macs is not None:
            self.reg = cls(self.graph, target_macs=target_macs, steps=steps, **reg_kw)
        else:
            if steps is not None:
                raise RegulariserError("steps= goes with a target-driven strength: give "
                                       "target_macs= and no strength=")
            self.reg = cls(self.graph, strength=1e-3 if strength is None else strength,
                           **reg_kw)
        self.clip, self.threshold, self.target_macs = clip, threshold, target_macs
        self.plan: dict[str, list[int]] | None = None

    def penalty(self, model: nn.Module) -> torch.Tensor | float:
        return 0.0 if self.pruned else self.reg(model)

    def epoch_end(self, model: nn.Module) -> None:
        if self.clip is not None and not self.pruned:
            clip_small_weights(model, self.clip, self.reg)

    def step(self) -> nn.Module:
        if self.pruned:
            return self.model
        units = self.reg.units
        if self.target_macs is not None:
            plan = select.by_budget(self.graph, self.model, macs=self.target_macs, units=units)
        else:
            plan = select.by_threshold(self.graph, self.model, self.threshold or 0.0,
                                       units=units)
        self.plan = plan
        self.pruned = True
        if plan:
            was = self.model.training
            self.model.eval()  # compress folds BatchNorm on running statistics
            try:
                small = compress(self.model, self.example_inputs, remove=plan,
                                 graph=self.graph)
            finally:
                self.model.train(was)
            self.model = small  # an exported graph: BatchNorm stays on running statistics
        return self.model




METHODS: dict[str, type[PruningMethod]] = {"etp": ETPMethod, "greg": GReg,
                                          "groupnorm": GroupNorm, "magnitude": Magnitude}


def make(name: str, model: nn.Module, example_inputs: Any, **kw) -> PruningMethod:
    """Build a method by name: ``etp``, ``greg``, ``groupnorm`` or ``magnitude``."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; use one of {sorted(METHODS)}") from None
    return cls(model, example_inputs, **kw)
