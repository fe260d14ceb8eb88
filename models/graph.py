"""One object per model state: torch-pruning's DependencyGraph, its channel groups, the classifier.

A group is a set of channels that must be removed together (residual adds, concats, depthwise
convs). It is identified by its root layer (the conv or linear whose output channels it prunes)
and indexed in the root's channel order. :class:`ModelGraph` traces the model once; everything
that needs groups (planning, surgery, AdaSAP's neurons, the table's predictions) takes the graph.
After a removal the model has changed: build a new graph of it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable, Union

import torch
import torch_pruning as tp
from torch import nn

from latprune.errors import BadInput
from latprune.models.outputs import has_aux_outputs
from latprune.models.widths import LayerWidths

__all__ = ["ChannelGroup", "ModelGraph", "IgnoredLayer", "classifier_layers", "output_layers", "resolve_ignored",
           "layer_dims", "output_channels", "save_bn_stats", "restore_bn_stats"]

IgnoredLayer = Union[nn.Module, str]  # a module of the model, or its name (``fnmatch`` wildcards allowed)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    name: str  # the root layer's module name
    size: int  # dense channel count
    producers: tuple[str, ...]  # layers whose output channels this group prunes
    consumers: tuple[tuple[str, int], ...]  # (layer, input channels of it that belong to this group)


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are class logits: never pruned on their output side."""
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    return [last] if last is not None else []


def resolve_ignored(model: nn.Module, layers: Iterable[IgnoredLayer]) -> list[str]:
    """Module names of ``model`` that ``layers`` (modules of it, names, or ``fnmatch`` patterns such as
    ``"head.*"``) name, each with every module inside it (torch-pruning's ``ignored_layers`` rule: a
    container is ignored whole). An entry that names nothing raises :class:`BadInput`."""
    names = {m: n for n, m in model.named_modules()}
    out: list[str] = []
    for spec in layers:
        if isinstance(spec, nn.Module):
            if spec not in names:
                raise BadInput(f"ignored layer {type(spec).__name__} is not a module of this model: pass "
                               "a module of the model being pruned, or its name")
            roots = [names[spec]]
        elif isinstance(spec, str):
            roots = [n for n in names.values() if n and fnmatch.fnmatchcase(n, spec)]
            if not roots:
                near = [n for n in names.values() if n and spec.split(".")[0] in n][:5]
                raise BadInput(f"ignored layer {spec!r} names no module of this model"
                               + (f" (modules with {spec.split('.')[0]!r}: {', '.join(near)})" if near else
                                  ": see model.named_modules() for the names"))
        else:
            raise BadInput(f"ignored layers are modules or module names, got {type(spec).__name__}")
        for r in roots:
            out += [n for n in names.values() if n == r or n.startswith(r + ".")]
    return sorted(set(out))


def output_layers(dg: tp.DependencyGraph) -> list[nn.Module]:
    """Conv2d and Linear layers whose output channels reach a model output without passing through
    another Conv2d or Linear (through BatchNorm, activations, reshapes, concatenations, additions):
    pruning their outputs would change what the model returns (a classifier, every head of a
    detector or of a multi-output model). Found on ``dg``'s traced graph: a walk from the layer
    along its consumers that ends at a node nothing consumes."""
    found = []
    for mod, node in dg.module2node.items():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if not n.outputs:
                found.append(mod)
                break
            stack += [o for o in n.outputs if not isinstance(o.module, (nn.Conv2d, nn.Linear))]
    return found


def layer_dims(m: nn.Module) -> tuple[int, int] | None:
    """(inputs, outputs) of a Conv2d or Linear layer; None for any other module."""
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return None


def output_channels(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv2d and Linear layer, by module name."""
    return {n: dims[1] for n, m in model.named_modules() if (dims := layer_dims(m)) is not None}


def _failing_operation(e: BaseException, model: nn.Module) -> str:
    """Where in ``model`` torch-pruning's tracer failed: the step it was in (its function's name) and
    the graph node it was handling, placed by the nearest named modules before and after it."""
    names = {m: n for n, m in model.named_modules()}
    tb, step, node = e.__traceback__, None, None
    while tb is not None:  # the innermost torch-pruning frame that holds a graph node
        f = tb.tb_frame
        if f.f_globals.get("__name__", "").startswith("torch_pruning"):
            step = f.f_code.co_name
            node = next((v for v in f.f_locals.values() if hasattr(v, "inputs") and hasattr(v, "outputs")
                         and hasattr(v, "module")), node)
        tb = tb.tb_next
    if node is None:
        return f"in {step}" if step else "while tracing"

    def nearest(start, side: str) -> str | None:
        seen, todo = set(), list(getattr(start, side))
        while todo:
            n = todo.pop(0)
            if id(n) in seen:
                continue
            seen.add(id(n))
            if names.get(n.module):
                return names[n.module]
            todo += list(getattr(n, side))
        return None

    op = type(node.module).__name__.strip("_").removesuffix("Op") if node.module is not None else "operation"
    before, after = nearest(node, "inputs"), nearest(node, "outputs")
    where = names.get(node.module) or " ".join(filter(None, (f"after '{before}'" if before else None,
                                                             f"before '{after}'" if after else None)))
    return f"in {step}, at a {op} {where}".rstrip()


class ModelGraph:
    """torch-pruning's DependencyGraph of ``model`` as it is now, traced once on a zero batch of
    ``input_shape``, and the channel groups the planner may shrink. Never pruned on their output
    side: the layers that produce the model's outputs (:func:`output_layers`: the classifier, every
    head), ``ignored`` ones (modules or names, :func:`resolve_ignored`), and groups through a grouped,
    non-depthwise convolution (their widths would have to stay multiples of the group count, which
    no plan, table fit or search models: ``whole`` says which and why). A model torch-pruning cannot
    trace raises :class:`BadInput` naming torch-pruning's error."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], ignored: Iterable[IgnoredLayer] = ()):
        self.model, self.input_shape = model, tuple(input_shape)
        ignored_names = resolve_ignored(model, ignored)
        was_training = model.training
        param = next(model.parameters(), None)
        # a model with training-only auxiliary heads is traced in training mode (two images: BatchNorm
        # needs more than one value per channel), its BatchNorm statistics restored afterwards
        aux = has_aux_outputs(model)
        example = torch.zeros(2 if aux else 1, *input_shape, device=param.device if param is not None else "cpu")
        model.train(aux)
        bn = save_bn_stats(model) if aux else []
        try:
            # torch-pruning puts the model in eval mode before its forward: a training-mode one goes through forward_fn
            forward = (lambda m, x: m.train()(x)) if aux else None
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=forward,
                                                            verbose=False)
        except Exception as e:  # the user's model inside a third-party tracer: every failure is about the model
            raise BadInput(f"torch-pruning cannot trace {type(model).__name__}: {type(e).__name__} "
                           f"({str(e)[:100]}) {_failing_operation(e, model)}, so its channels cannot be grouped: "
                           "rewrite that operation (a reshape-based channel shuffle, for one, as indexing or "
                           "torch.cat), or prune another architecture (ignored_layers does not help: torch-pruning "
                           "traces every operation)") from e
        finally:
            model.train(was_training)
            restore_bn_stats(bn)
        self.names = {m: n for n, m in model.named_modules()}
        outputs = output_layers(self.dg)
        self.classifier = {self.names[m] for m in outputs if m in self.names}
        self.ignored = tuple(ignored_names)
        mods = dict(model.named_modules())
        ignored = [mods[n] for n in ignored_names] + outputs
        self._groups: dict[str, tuple[ChannelGroup, tp.Group]] = {}
        self.whole: dict[str, str] = {}  # group -> why it is left whole although nobody ignored it
        for group in self.dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
            root = group[0].dep.target.module
            producers, consumers, grouped = [], [], []
            for item in group:
                mod, handler = item.dep.target.module, item.dep.handler
                if not isinstance(mod, (nn.Conv2d, nn.Linear)) or mod not in self.names:
                    continue
                if isinstance(mod, nn.Conv2d) and 1 < mod.groups != mod.in_channels:  # grouped, not depthwise
                    grouped.append(f"{self.names[mod]} (groups={mod.groups})")
                if self.dg.is_out_channel_pruning_fn(handler):
                    producers.append(self.names[mod])
                else:
                    consumers.append((self.names[mod], len(item.idxs)))
            if grouped:  # widths must stay multiples of the group count: not modelled, so left whole
                self.whole[self.names[root]] = "grouped convolution " + ", ".join(grouped)
                continue
            cg = ChannelGroup(self.names[root], len(group[0].idxs), tuple(producers), tuple(consumers))
            self._groups[cg.name] = (cg, group)

    @property
    def groups(self) -> list[ChannelGroup]:
        return [cg for cg, _ in self._groups.values()]

    def sizes(self) -> dict[str, int]:
        return {cg.name: cg.size for cg in self.groups}

    def group(self, name: str) -> tuple[ChannelGroup, tp.Group]:
        """The group and torch-pruning's own group object (``KeyError`` for an unknown name)."""
        return self._groups[name]

    def tp_groups(self) -> list[tuple[ChannelGroup, tp.Group]]:
        return list(self._groups.values())

    def layer_widths(self, layers: Iterable[str]) -> LayerWidths:
        """How the widths of ``layers`` (table layers) follow the group widths."""
        mods = dict(self.model.named_modules())
        dense, out_group, in_groups, depthwise = {}, {}, {}, set()
        for name in layers:
            m = mods[name]
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels:
                depthwise.add(name)
            dense[name] = layer_dims(m)
        for g in self.groups:
            for p in g.producers:
                if p in dense:
                    out_group[p] = g.name
            for c, n in g.consumers:
                if c in dense and out_group.get(c) != g.name:  # depthwise: input follows its own output
                    in_groups.setdefault(c, {})[g.name] = n
        return LayerWidths(dense, out_group, in_groups, self.sizes(), frozenset(depthwise))


def save_bn_stats(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every BatchNorm running statistic of ``model`` with a copy of its value, for
    :func:`restore_bn_stats` after forward passes that must not move them (tracing, scoring)."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            for b in (m.running_mean, m.running_var, m.num_batches_tracked):
                if b is not None:
                    out.append((b, b.detach().clone()))
    return out


@torch.no_grad()
def restore_bn_stats(state: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for buf, saved in state:
        buf.copy_(saved)
