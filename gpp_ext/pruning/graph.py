"""`ChannelGraph`: which channels of a model must be pruned together, and the surgery that removes them.

The model is traced with `torch.fx` and the shapes are propagated with the example inputs. Every tensor gets a
*channel layout*: the list of segments its channel dimension (dim 1) is made of, each segment being all the
channels of one *root* (the output of a convolution or linear layer, or a model input), possibly repeated
`block` times per channel after a flatten. Layers that produce channels create roots; activations, pooling,
normalisation and dropout pass the layout through; `torch.cat` concatenates layouts (Inception branches and
DenseNet chains stay independently prunable); a residual add couples the roots of its two operands (they are
pruned together); flatten turns a channel into a block of features for the linear layer that follows; a
depthwise convolution passes its input layout to its output; `chunk(k)` into equal parts couples the parts
position by position, and a split along any other dimension (space, tokens) passes the whole layout to every
part; `permute` moves the channel axis (ConvNeXt's channels-last blocks), where a linear layer
on the last axis acts as a 1x1 convolution and a LayerNorm over it as a norm over the channels; a parameter
multiplied elementwise along the channels (ConvNeXt's layer scale) is sliced with them. Roots coupled by adds
form a *group*, the unit of pruning. Model inputs, model outputs
(the classifier's logits), and whatever passes through an op that cannot be sliced safely (grouped
convolutions, splits of the channels into sizes written in the code, tied weights, modules the user asked to ignore) are
*frozen*: those groups are listed in `frozen_groups` with the reason and never pruned. Norms over the channel
dimension (LayerNorm on [N, C], GroupNorm with one group) are sliced, but their statistics include every
channel, so removing channels changes them (pruning is exact only up to that renormalisation).

Two ways to act on a group go through the same tables, so they cannot disagree: `channel_params(name)` lists
every parameter and buffer that carries the group's channels and where along which dimension (the public
group-parameter API the criteria, the cost model and the push regularisers use; `scale_channels` multiplies
the tensors that produce some channels, which at factor 0 silences them exactly as pruning would), and
`prune(keep)` removes channels physically (`gpp_ext.pruning.surgery`): every weight, bias and
BatchNorm/LayerNorm/GroupNorm/PReLU parameter and buffer touched by the kept groups is sliced, the layers'
`in/out_channels`, `in/out_features`, `num_features`, ... are updated, and an ordinary `nn.Module` of the same
classes is left.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..layers import BATCH_NORMS, CONV
from . import surgery

__all__ = ["ChannelGraph", "Group", "ChannelParam", "Segment"]

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d, nn.Upsample,
)
_PASS_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.max_pool1d,
    F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.pad, F.interpolate, torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.clip,
    torch.abs, torch.neg, torch.exp, F.sigmoid, F.tanh, torch.square, torch.sqrt,
}
_PASS_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "contiguous", "clone",
    "detach", "abs", "neg", "exp", "square", "sqrt", "float", "double", "half", "to",
}
_ELEMENTWISE = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                operator.truediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_NON_TENSOR_METHODS = {"size", "dim", "numel"}
# Ops defined outside torch that keep channel i at channel i, by qualified name (no import needed to know them).
_PASS_QUALNAMES = {"torchvision.ops.stochastic_depth.stochastic_depth"}
_PERMUTE = {torch.permute}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
_CAT = {torch.cat, torch.concat}
_SPLIT = {torch.split, torch.chunk, torch.tensor_split, torch.unbind}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "unbind"}
# The tensors of a module that carry the channels of a layout, by the role the module plays, with the
# dimension along which they do.
_ROLE_TENSORS = {
    "producer": (("weight", 0), ("bias", 0)),        # a conv or linear layer computing the channels
    "consumer": (("weight", 1),),                    # a conv or linear layer reading them
    "depthwise": (("weight", 0), ("bias", 0)),       # channel i in, channel i out
    "norm": (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0)),
}


def _qualname(target) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}"


@dataclass(frozen=True)
class Segment:
    """All channels of one root, each repeated `block` times along the channel dimension (after a flatten)."""

    root: int
    size: int
    block: int = 1

    @property
    def width(self) -> int:
        return self.size * self.block


@dataclass
class Group:
    """Channels that are pruned together: the outputs of `modules`, coupled by residual adds.

    `name` is the first producing module's name; `size` the number of channels; `prunable` is False for
    frozen groups, with `reason` saying why.
    """

    name: str
    size: int
    modules: list = field(default_factory=list)
    prunable: bool = True
    reason: str = ""

    def __repr__(self) -> str:
        state = "" if self.prunable else f", frozen: {self.reason}"
        return f"Group({self.name!r}, size={self.size}, modules={self.modules}{state})"


@dataclass(frozen=True, eq=False)
class ChannelParam:
    """One tensor that carries the channels of a group, and where.

    Attributes:
        module: name of the module that holds the tensor (as in `model.named_modules()`).
        attr: the tensor's attribute: "weight", "bias", "running_mean" or "running_var".
        dim: the dimension of the tensor along which the group's channels lie.
        index: `[group.size, k]` int64, the positions along `dim` that carry each of the group's channels: row
            `c` lists the positions of channel `c`. `k` is 1 for a layer applied right to the channels; it is
            larger when one channel stands for several positions: the `k` features of a channel after a
            flatten, the parts of a chunked output, a tensor that reads the group twice (`cat([y, y])`).
        role: what the module does with the channels: "producer" (the conv or linear layer computing them:
            weight rows and bias), "norm" (a BatchNorm, LayerNorm, GroupNorm or PReLU applied to them), "scale"
            (a parameter multiplied elementwise along them, e.g. a layer scale; `attr` is its name),
            "depthwise" (a depthwise convolution: channel i in, channel i out), "consumer" (a conv or linear
            layer reading them: weight columns, `dim` 1).
        member: the group member (producing module) whose channels these are; for a producer, the module itself.
        tensor: the parameter or buffer itself (the live object at the time of the call).
    """

    module: str
    attr: str
    dim: int
    index: torch.Tensor
    role: str
    member: str
    tensor: torch.Tensor

    @property
    def is_parameter(self) -> bool:
        return isinstance(self.tensor, nn.Parameter)

    def __repr__(self) -> str:
        return (f"ChannelParam({self.module}.{self.attr}, dim={self.dim}, role={self.role}, "
                f"index={list(self.index.shape)})")


class _Tracer(torch.fx.Tracer):
    def __init__(self, ignore: set):
        super().__init__()
        self.ignore = ignore

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.ignore or super().is_leaf_module(m, qualname)


class ChannelGraph:
    """Traces `model` on `example_inputs` and groups its coupled channels.

    Args:
        model: the network (any `nn.Module` that `torch.fx` can trace).
        example_inputs: a tensor or a tuple of tensors the model accepts (used for shapes only, in eval mode
            without gradients; the model's mode is restored).
        ignore: names of submodules to treat as opaque: their inputs and outputs are frozen, so an op the
            graph does not understand can be excluded without giving up pruning elsewhere.

    Raises:
        ValueError: listing every op the graph cannot handle, and how to exclude the module that contains it.
    """

    def __init__(self, model: nn.Module, example_inputs, ignore=()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ChannelGraph: model must be an nn.Module, got {type(model).__name__}")
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, (tuple, list)) or not all(
                isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError("ChannelGraph: example_inputs must be a tensor or a tuple of tensors")
        self.model = model
        self.example_inputs = tuple(example_inputs)
        names = dict(model.named_modules())
        unknown = [n for n in ignore if n not in names]
        if unknown:
            raise ValueError(f"ChannelGraph: ignore names modules that do not exist: {unknown}")
        self.ignore = set(ignore)
        self._build()

    # ------------------------------------------------------------------------------------------ analysis
    def _build(self) -> None:
        model = self.model
        tracer = _Tracer(self.ignore)
        try:
            graph = tracer.trace(model)
        except Exception as error:  # fx raises many kinds; say what to do about it
            raise ValueError(f"ChannelGraph: torch.fx cannot trace {type(model).__name__} ({error}); data-dependent "
                             f"control flow must live inside a module passed in ignore=[...]") from error
        self.gm = torch.fx.GraphModule(model, graph)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(*self.example_inputs)
        finally:
            model.train(was_training)
        self.modules = dict(model.named_modules())

        self._parent: list[int] = []
        self._root_size: list[int] = []
        self._frozen: dict[int, str] = {}
        self._producer_of: dict[int, str] = {}   # root -> producing module name
        self._module_root: dict[str, int] = {}
        self._producers: list[tuple[str, int]] = []          # (module, root): slice output channels
        self._consumers: dict[str, tuple] = {}               # module -> input layout: slice input channels
        self._depthwise: dict[str, tuple] = {}               # module -> layout of its channels (in = out)
        self._attached: dict[str, tuple] = {}                # norm/PReLU modules -> layout of their channels
        self._split_parts: dict[int, list[int]] = {}          # chunked producer root -> its coupled parts
        self._part_of: dict[int, int] = {}                    # part root -> the chunked producer root
        self._scales: dict[tuple, tuple] = {}                # (module, attr) of a channel parameter -> (layout, dim)
        self._axis: dict[torch.fx.Node, int] = {}             # nodes whose channels are not on dim 1 (permuted)
        self._broadcast: dict[int, str] = {}                  # root of a one-channel map broadcast onto many
        self._unsupported: list[str] = []
        layout: dict[torch.fx.Node, tuple | None] = {}
        for node in self.gm.graph.nodes:
            before = len(self._unsupported)
            layout[node] = self._visit(node, layout)
            if len(self._unsupported) > before:  # name the module to ignore
                where = self._owner(node)
                if where:
                    self._unsupported[before:] = [f"{u} in module {where!r}" for u in self._unsupported[before:]]
        if self._unsupported:
            listed = "\n  ".join(sorted(set(self._unsupported)))
            raise ValueError(f"ChannelGraph: cannot handle these ops of {type(model).__name__}:\n  {listed}\n"
                             f"Put them inside a submodule and pass its name in ignore=[...] to keep its channels "
                             f"untouched (its inputs and outputs are then not pruned).")
        self._finish_groups()

    def _owner(self, node) -> str | None:
        """The innermost named submodule whose forward holds `node` (what to pass in ignore=)."""
        if node.op == "call_module":
            parent = node.target.rpartition(".")[0]
            return parent or node.target
        stack = node.meta.get("nn_module_stack") or {}
        names = [v[0] if isinstance(v, tuple) else v for v in stack.values()]
        names = [n for n in names if isinstance(n, str) and n in self.modules and n]
        return names[-1] if names else None

    def linear_owner(self, node) -> str | None:
        """The `nn.Linear` whose weight an `F.linear` call reads (a Linear subclass fx traced into), or None."""
        if node.op != "call_function" or node.target is not F.linear:
            return None
        weight = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
        owner, _, attr = weight.target.rpartition(".") if isinstance(weight, torch.fx.Node) \
            and weight.op == "get_attr" else ("", "", "")
        return owner if attr == "weight" and isinstance(self.modules.get(owner), nn.Linear) else None

    def layer_calls(self):
        """`(node, module name, module)` of every traced call of a convolution or linear layer, those a Linear
        subclass makes through `F.linear` included."""
        for node in self.gm.graph.nodes:
            name = node.target if node.op == "call_module" else self.linear_owner(node)
            module = self.modules.get(name) if name is not None else None
            if isinstance(module, CONV + (nn.Linear,)):
                yield node, name, module

    def axis(self, node) -> int:
        """The dimension that holds the channels of `node`'s tensor (1 unless permuted)."""
        return self._axis.get(node, 1)

    def _new_root(self, size: int, frozen: str | None = None) -> int:
        self._parent.append(len(self._parent))
        self._root_size.append(size)
        if frozen:
            self._frozen[len(self._parent) - 1] = frozen
        return len(self._parent) - 1

    def _find(self, r: int) -> int:
        while self._parent[r] != r:
            self._parent[r] = self._parent[self._parent[r]]
            r = self._parent[r]
        return r

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def _freeze(self, lay, reason: str) -> None:
        for seg in lay or ():
            self._frozen.setdefault(seg.root, reason)

    def _couple(self, a, b, where: str) -> None:
        """Two layouts whose channels meet elementwise (residual add, shared weights) must prune alike."""
        if a is None or b is None:
            return
        if len(a) == len(b) and all(x.size == y.size and x.block == y.block for x, y in zip(a, b)):
            for x, y in zip(a, b):
                self._union(x.root, y.root)
        else:  # same width, different composition: no channel-wise correspondence we can keep
            self._freeze(a, f"{where} adds tensors whose channels come from differently concatenated sources")
            self._freeze(b, f"{where} adds tensors whose channels come from differently concatenated sources")

    @staticmethod
    def _shape(node) -> tuple | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _visit(self, node: torch.fx.Node, layout: dict):
        shape = self._shape(node)
        # Inputs may come positionally or by keyword (torch.add(a, other=b), torch.cat(tensors=..., dim=1)).
        inputs = [a for a in self._flat_nodes((node.args, node.kwargs)) if layout.get(a) is not None]
        tensor_args = list(dict.fromkeys(inputs))
        source = self._source(node)
        first = layout.get(source) if source is not None else None

        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                return None
            return (Segment(self._new_root(shape[1], "model input"), shape[1]),)
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for arg in self._flat_nodes(node.args):
                self._freeze(layout.get(arg), "model output")
            return None
        if node.op == "call_module":
            return self._visit_module(node, self.modules[node.target], first, shape, tensor_args, layout)
        return self._visit_function(node, first, shape, tensor_args, layout)

    @staticmethod
    def _source(node):
        """The node an op reads its main tensor from: its first positional or keyword tensor argument."""
        for value in list(node.args) + list(node.kwargs.values()):
            if isinstance(value, torch.fx.Node):
                return value
        return None

    @staticmethod
    def _flat_nodes(args):
        out = []
        torch.fx.node.map_arg(args, lambda n: out.append(n))
        return out

    def _producer_root(self, name: str, size: int) -> int:
        if name not in self._module_root:  # a module called twice produces one group
            root = self._new_root(size)
            self._module_root[name] = root
            self._producer_of[root] = name
            self._producers.append((name, root))
        return self._module_root[name]

    def _attach(self, table: dict, name: str, lay) -> None:
        """A module sliced along the layout it runs on; called again, its layouts must prune alike."""
        if name in table:
            self._couple(table[name], lay, f"module {name!r} called twice")
        else:
            table[name] = lay

    def _consume(self, name: str, lay) -> None:
        if name in self._consumers:
            self._couple(self._consumers[name], lay, f"module {name!r} called twice")
        else:
            self._consumers[name] = lay

    def _visit_module(self, node, m, first, shape, tensor_args, layout):
        name = node.target
        if name in self.ignore:
            for arg in tensor_args:
                self._freeze(layout[arg], f"input of ignored module {name!r}")
            return (Segment(self._new_root(shape[1], f"output of ignored module {name!r}"), shape[1]),) \
                if shape is not None and len(shape) >= 2 else None
        source = self._source(node)
        if first is not None and self.axis(source) != 1 and not isinstance(m, (nn.Linear, nn.LayerNorm,
                                                                               *_PASS_MODULES)):
            self._unsupported.append(f"module {name!r} ({type(m).__name__}) applied to a tensor whose channels are "
                                     f"on dim {self.axis(source)}")
            return None
        if isinstance(m, CONV):
            if m.groups == 1:
                self._consume(name, first)
                return (Segment(self._producer_root(name, m.out_channels), m.out_channels),)
            if m.groups == m.in_channels == m.out_channels:  # depthwise: channel i in, channel i out
                self._attach(self._depthwise, name, first)
                return first
            self._freeze(first, f"input of grouped convolution {name!r} (groups={m.groups})")
            return (Segment(self._new_root(m.out_channels, f"output of grouped convolution {name!r}"),
                            m.out_channels),)
        if isinstance(m, nn.Linear):
            return self._linear(node, name, m, first)
        if isinstance(m, BATCH_NORMS):
            self._attach(self._attached, name, first)
            return first
        if isinstance(m, nn.PReLU):
            if m.num_parameters > 1:
                self._attach(self._attached, name, first)
            return first
        if isinstance(m, nn.LayerNorm):
            source = self._source(node)
            if shape is not None and self.axis(source) == len(shape) - 1 \
                    and tuple(m.normalized_shape) == (shape[-1],):
                self._attach(self._attached, name, first)
                self._keep_axis(node, source)
            else:
                self._freeze(first, f"LayerNorm {name!r} normalises over more than the channel dimension")
            return first
        if isinstance(m, nn.GroupNorm):
            if m.num_groups in (1, m.num_channels):
                self._attach(self._attached, name, first)
            else:
                self._freeze(first, f"GroupNorm {name!r} with {m.num_groups} groups of several channels")
            return first
        if isinstance(m, nn.Flatten):
            return self._flatten(node, first, m.start_dim, m.end_dim)
        if isinstance(m, _PASS_MODULES):
            return self._pass(node, first, f"module {name!r} ({type(m).__name__})")
        self._unsupported.append(f"module {name!r} of type {type(m).__name__}")
        return None

    def _keep_axis(self, node, source) -> None:
        if self.axis(source) != 1:
            self._axis[node] = self.axis(source)

    def _linear(self, node, name: str, m: nn.Linear, first):
        """A linear layer `name` on `node`'s input: a producer and consumer on a 2-D input, or on channels last
        (a 1x1 convolution); on anything else its input and output are frozen."""
        source = self._source(node)
        in_shape = self._shape(source)
        if in_shape is not None and len(in_shape) > 2 and first is not None \
                and self.axis(source) == len(in_shape) - 1:  # channels last: a 1x1 convolution
            self._consume(name, first)
            self._axis[node] = len(in_shape) - 1
            return (Segment(self._producer_root(name, m.out_features), m.out_features),)
        if in_shape is None or len(in_shape) != 2:
            self._freeze(first, f"input of {name!r}, a linear layer applied to a {len(in_shape or ())}-D tensor")
            # on [N, C, ..., L] it maps the last axis: dimension 1 of its output still has C entries
            out_shape = self._shape(node)
            size = int(out_shape[1]) if out_shape is not None and len(out_shape) > 2 else m.out_features
            return (Segment(self._new_root(size, f"output of {name!r}"), size),)
        self._consume(name, first)
        return (Segment(self._producer_root(name, m.out_features), m.out_features),)

    def _pass(self, node, lay, what: str):
        """An op that keeps channel i at channel i: checked on the propagated shapes, not assumed."""
        source = self._source(node)
        in_shape, shape = self._shape(source), self._shape(node)
        ax = self.axis(source)
        if lay is not None and (in_shape is None or shape is None or len(shape) < 2 or len(in_shape) < 2
                                or shape[:2] != in_shape[:2] or (ax != 1 and shape != in_shape)):
            self._unsupported.append(f"{what} changes the channel dimension ({in_shape} -> {shape})")
            return None
        self._keep_axis(node, source)
        return lay

    def _permute(self, node, lay):
        """`permute` moves the channel axis to where the permutation sends it."""
        source = self._source(node)
        in_shape = self._shape(source)
        if lay is None or in_shape is None:
            return lay
        dims = node.kwargs.get("dims", node.args[1:] if node.op == "call_method" else node.args[1])
        if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        rank = len(in_shape)
        dims = [int(d) % rank for d in dims]
        if dims[0] != 0:
            self._unsupported.append(f"{node.name}: permute moves the batch dimension ({dims})")
            return None
        self._axis[node] = dims.index(self.axis(source))
        return lay

    def _layer_norm(self, node, lay, where: str):
        """`F.layer_norm(x, (C,), weight, bias)` over the channel axis: a norm whose parameters belong to the
        module that holds `weight` (torchvision's LayerNorm2d permutes, normalises and permutes back)."""
        source = self._source(node)
        shape = self._shape(source)
        args = list(node.args) + [None] * 5
        normalized = node.kwargs.get("normalized_shape", args[1])
        weight = node.kwargs.get("weight", args[2])
        bias = node.kwargs.get("bias", args[3])
        owners = {a.target.rpartition(".")[0] for a in (weight, bias) if isinstance(a, torch.fx.Node)
                  and a.op == "get_attr"}
        owner = owners.pop() if len(owners) == 1 else None
        if lay is not None and shape is not None and self.axis(source) == len(shape) - 1 \
                and list(normalized or ()) == [shape[-1]] and isinstance(self.modules.get(owner), nn.LayerNorm) \
                and getattr(self.modules[owner], "weight", None) is not None:
            self._attach(self._attached, owner, lay)
            self._keep_axis(node, source)
            return lay
        if lay is not None:
            self._freeze(lay, f"{where}: layer_norm over more than the channel axis")
        return lay

    def _batch_norm(self, node, lay, where: str):
        """`F.batch_norm(x, running_mean, running_var, weight, bias, ...)` with the parameters of one BatchNorm
        module: a norm over the channels (timm's BatchNormAct2d, a BatchNorm2d subclass that fx traces into)."""
        source = self._source(node)
        args = list(node.args) + [None] * 5
        names = ("running_mean", "running_var", "weight", "bias")
        tensors = [node.kwargs.get(n, args[i + 1]) for i, n in enumerate(names)]
        owners = {t.target.rpartition(".")[0] for t in tensors if isinstance(t, torch.fx.Node) and t.op == "get_attr"}
        owner = owners.pop() if len(owners) == 1 else None
        if lay is not None and self.axis(source) == 1 and isinstance(self.modules.get(owner), BATCH_NORMS) \
                and all(not isinstance(t, torch.fx.Node) or t.target.rpartition(".")[2] == n
                        for t, n in zip(tensors, names)):
            self._attach(self._attached, owner, lay)
            return lay
        if lay is not None:
            self._freeze(lay, f"{where}: batch_norm with parameters that are not one BatchNorm module's")
        return lay

    def _param_view(self, node, in_shape, shape) -> None:
        """Marks a view of a parameter with one dimension of size > 1 before and after (`gamma.reshape(1, -1, 1,
        1)`), so a multiply by it is recognised as a per-channel scale of that parameter's dimension."""
        source = self._source(node)
        if source is None or in_shape is None or shape is None:
            return
        base = source.meta["gpp_param"] if "gpp_param" in source.meta else None
        if base is None and source.op == "get_attr":
            big = [i for i, s in enumerate(in_shape) if s != 1]
            base = (source.target, big[0]) if len(big) == 1 else None
        if base is not None and sum(s != 1 for s in shape) == 1:
            node.meta["gpp_param"] = base

    def _scale_param(self, node, param, lay, shape, axis) -> bool:
        """A parameter multiplied elementwise along the channels (a per-channel scale such as ConvNeXt's layer
        scale): recorded to be sliced with them. False when it broadcasts along anything else."""
        pshape = self._shape(param)
        if pshape is None or shape is None or len(pshape) > len(shape) or node.target not in (
                operator.mul, operator.imul, torch.mul, "mul", "mul_"):
            return False
        offset = len(shape) - len(pshape)
        dim = axis - offset
        if dim < 0 or pshape[dim] != shape[axis] or any(s != 1 for i, s in enumerate(pshape) if i != dim):
            return False
        target, dim = param.meta["gpp_param"] if "gpp_param" in param.meta else (param.target, dim)
        module, _, attr = target.rpartition(".")
        if module not in self.modules or not isinstance(getattr(self.modules[module], attr, None), torch.Tensor):
            return False
        key = (module, attr)
        if key in self._scales:
            self._couple(self._scales[key][0], lay, f"parameter {param.target!r} used twice")
        else:
            self._scales[key] = (lay, dim)
        return True

    def _flatten(self, node, lay, start_dim, end_dim):
        in_shape = self._shape(self._source(node))
        if lay is None or in_shape is None:
            return lay
        if self.axis(self._source(node)) != 1:
            self._unsupported.append(f"{node.name}: flatten of a tensor whose channels are not on dim 1")
            return None
        if len(in_shape) <= 2:
            return lay
        if start_dim != 1 or end_dim not in (-1, len(in_shape) - 1):
            self._unsupported.append(f"flatten({start_dim}, {end_dim}) of {node.name} (only flatten from dim 1)")
            return None
        block = math.prod(in_shape[2:])
        return tuple(Segment(s.root, s.size, s.block * block) for s in lay)

    def _visit_function(self, node, first, shape, tensor_args, layout):
        target = node.target
        where = node.name
        if (node.op == "call_method" and target in _NON_TENSOR_METHODS) or target is getattr:
            return None
        if target is operator.getitem and isinstance(node.args[0], torch.fx.Node) \
                and "gpp_split" in node.args[0].meta:  # one part of a split (its layout: see the split)
            parts = node.args[0].meta["gpp_split"]
            if node.args[0].meta.get("gpp_split_axis", 1) != 1:
                self._axis[node] = node.args[0].meta["gpp_split_axis"]
            return parts[node.args[1]] if isinstance(node.args[1], int) and node.args[1] < len(parts) else None
        if shape is None and not tensor_args:
            return None  # arithmetic on sizes and other Python values
        if (node.op == "call_function" and (target in _PASS_FUNCTIONS or _qualname(target) in _PASS_QUALNAMES)) or \
                (node.op == "call_method" and target in _PASS_METHODS):
            return self._pass(node, first, f"{getattr(target, '__name__', target)} ({where})")
        if (node.op == "call_function" and target in _PERMUTE) or (node.op == "call_method" and target == "permute"):
            return self._permute(node, first)
        if node.op == "call_function" and target is F.layer_norm:
            return self._layer_norm(node, first, where)
        if node.op == "call_function" and target is F.batch_norm:
            return self._batch_norm(node, first, where)
        if node.op == "call_function" and target is F.linear:  # a Linear subclass fx traced into (timm's)
            owner = self.linear_owner(node)
            if owner is not None:
                return self._linear(node, owner, self.modules[owner], first)
        if (node.op == "call_function" and target in _ELEMENTWISE) or \
                (node.op == "call_method" and target in _ELEMENTWISE_METHODS):
            axes = {self.axis(a) for a in tensor_args}
            if len(axes) > 1:
                self._unsupported.append(f"{where}: elementwise op on tensors with channels on different axes")
                return None
            ax = axes.pop() if axes else 1
            others = [layout[a] for a in tensor_args]
            operand_shapes = [self._shape(a) for a in tensor_args]
            # operands that carry the output's channels (not broadcast along them): coupled with each other. One
            # channel is a broadcast onto many, but two single-channel maps of the output's rank are one channel.
            width = shape[ax] if shape is not None and len(shape) > ax else None
            full = [lay for lay, s in zip(others, operand_shapes) if s is not None and len(s) == len(shape)
                    and (s[ax] > 1 or width == 1)]
            for lay, s in zip(others, operand_shapes):  # a one-channel map (an attention mask) broadcast onto
                if lay is not None and s is not None and len(s) == len(shape) and s[ax] == 1 and width != 1:
                    for seg in lay:                     # many channels: it must keep width 1
                        self._broadcast.setdefault(seg.root, where)
            param_operands = [a for a in self._flat_nodes((node.args, node.kwargs))
                              if a.op == "get_attr" or "gpp_param" in a.meta]
            if param_operands and full:
                if len(param_operands) == 1 and len(full) == 1 and \
                        self._scale_param(node, param_operands[0], full[0], shape, ax):
                    if ax != 1:
                        self._axis[node] = ax
                    return full[0]
                self._unsupported.append(f"{where}: elementwise op with a parameter tensor ({target})")
                return None
            for other in full[1:]:
                self._couple(full[0], other, where)
            if ax != 1 and full:
                self._axis[node] = ax
            return full[0] if full else first
        if (node.op == "call_function" and target in _CAT):
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.kwargs.get("dim", node.kwargs.get("axis", node.args[1] if len(node.args) > 1 else 0))
            if not isinstance(tensors, (list, tuple)) or not shape:
                self._unsupported.append(f"{where}: cat of a non-list")
                return None
            lays = [layout.get(t) for t in tensors]
            axes = {self.axis(t) for t in tensors if isinstance(t, torch.fx.Node)}
            if axes != {1}:
                self._unsupported.append(f"{where}: cat of tensors whose channels are not on dim 1")
                return None
            if dim in (1, 1 - len(shape)):
                if any(lay is None for lay in lays):
                    self._unsupported.append(f"{where}: cat of a tensor without a channel layout")
                    return None
                return tuple(seg for lay in lays for seg in lay)
            for lay in lays[1:]:
                self._couple(lays[0], lay, where)
            return lays[0]
        if (node.op == "call_function" and target is torch.flatten) or \
                (node.op == "call_method" and target == "flatten"):
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            end = node.kwargs.get("end_dim", node.args[2] if len(node.args) > 2 else -1)
            if start == 0:
                self._unsupported.append(f"{where}: flatten from dim 0 mixes the batch with channels")
                return None
            return self._flatten(node, first, start, end)
        if node.op == "call_method" and target in ("view", "reshape") or target in (torch.reshape,):
            in_shape = self._shape(self._source(node))
            if first is None:  # no channels; a parameter reshaped to broadcast (gamma.reshape(1, -1, 1, 1))
                self._param_view(node, in_shape, shape)
                return None
            if in_shape == shape:
                self._keep_axis(node, self._source(node))
                return first
            if self.axis(self._source(node)) != 1:
                self._unsupported.append(f"{where}: {target} of a tensor whose channels are not on dim 1")
                return None
            if in_shape is not None and shape is not None and len(shape) == 2 and shape[0] == in_shape[0] \
                    and len(in_shape) > 2:
                return self._flatten(node, first, 1, -1)
            self._unsupported.append(f"{where}: {target} from {in_shape} to {shape}")
            return None
        if (node.op == "call_function" and target in _REDUCTIONS) or \
                (node.op == "call_method" and target in _REDUCTION_METHODS):
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            in_shape = self._shape(self._source(node))
            dims = (dims,) if isinstance(dims, int) else dims
            ax = self.axis(self._source(node))
            if dims is not None and in_shape is not None and all(d % len(in_shape) not in (0, ax) for d in dims) \
                    and (ax == 1 or node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2])):
                self._keep_axis(node, self._source(node))
                return first
            self._unsupported.append(f"{where}: {getattr(target, '__name__', target)} over the channel dimension")
            return None
        if (node.op == "call_function" and target in _SPLIT) or \
                (node.op == "call_method" and target in _SPLIT_METHODS):
            metas = node.meta.get("tensor_meta")
            metas = metas if isinstance(metas, (list, tuple)) and not hasattr(metas, "shape") else ()
            part_axis = self._split_keeps_channels(node, first, metas)
            if part_axis is not None:  # split along another dimension: every part carries all the channels
                node.meta["gpp_split"], node.meta["gpp_split_axis"] = tuple(first for _ in metas), part_axis
                return None
            if first is not None and self.axis(self._source(node)) != 1:
                self._unsupported.append(f"{where}: split of a tensor whose channels are not on dim 1")
                return None
            parts = self._equal_parts(node, first, metas)
            if parts is None:
                # Part sizes written as constants in the model's code: the channels on both sides stay as they are.
                self._freeze(first, f"{where} splits channels into fixed-size parts")
                parts = tuple((Segment(self._new_root(m.shape[1], f"part of {where}"), m.shape[1]),)
                              if hasattr(m, "shape") and len(m.shape) >= 2 else None for m in metas)
            node.meta["gpp_split"] = parts
            return None
        label = getattr(target, "__name__", str(target))
        self._unsupported.append(f"{node.op} {label} ({where})")
        return None

    def _split_keeps_channels(self, node, lay, metas):
        """The channel axis of the parts when a split (chunk, split, tensor_split, unbind) cuts a dimension other
        than the channels' (space, time, heads laid out after the channels): each part then carries the input's
        channels, the same layout. None when it cuts the channels, or its parts' axis or count is unknown."""
        source = self._source(node)
        in_shape = self._shape(source)
        unbind = node.target in (torch.unbind, "unbind")
        at = 1 if unbind else 2
        dim = node.kwargs.get("dim", node.args[at] if len(node.args) > at else 0)
        if lay is None or not in_shape or not isinstance(dim, int) or not metas \
                or not all(hasattr(m, "shape") for m in metas):
            return None
        d, ax = dim % len(in_shape), self.axis(source)
        part_axis = ax - 1 if unbind and d < ax else ax
        if d == ax or part_axis < 1:  # the channels themselves, or unbinding the batch before them
            return None
        return part_axis

    def _equal_parts(self, node, lay, metas):
        """Layouts of the parts of `chunk(k, dim=1)` (or a split whose size comes from the tensor's own shape):
        the parts are coupled position by position, so pruning keeps them equal and the code stays valid."""
        chunk = node.target in (torch.chunk, "chunk")
        dynamic_split = node.target in (torch.split, "split") and len(node.args) > 1 \
            and isinstance(node.args[1], torch.fx.Node)
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        shapes = [tuple(m.shape) for m in metas if hasattr(m, "shape")]
        if not (chunk or dynamic_split) or lay is None or len(lay) != 1 or lay[0].block != 1 or not shapes \
                or len(shapes) != len(metas) or dim not in (1, 1 - len(shapes[0])):
            return None
        sizes = {s[1] for s in shapes}
        root = lay[0].root
        if len(sizes) != 1 or sizes.pop() * len(shapes) != lay[0].size or root not in self._producer_of:
            return None
        parts = self._split_parts.get(root)
        if parts is None:
            parts = [self._new_root(shapes[0][1]) for _ in shapes]
            for p in parts[1:]:
                self._union(parts[0], p)
            self._split_parts[root] = parts
            self._part_of.update({p: root for p in parts})
        elif len(parts) != len(shapes):
            return None
        return tuple((Segment(p, shapes[0][1]),) for p in parts)

    def _unit(self, root: int) -> int:
        """The root that stands for `root` in a group: its first part when its output is chunked."""
        parts = self._split_parts.get(root)
        return parts[0] if parts else root

    def _freeze_tied_parameters(self) -> None:
        """Layers sharing a tensor (tied weights) cannot be sliced one at a time: keep their channels."""
        owners: dict[int, list[str]] = {}
        for name, m in self.modules.items():
            for p in m.parameters(recurse=False):
                owners.setdefault(id(p), []).append(name)
        tied = {n for names in owners.values() if len(names) > 1 for n in names}
        for name in tied:
            self._freeze_layer(name, f"{name!r} shares parameters with another layer")

    def _freeze_layer(self, name: str, reason: str) -> None:
        """Keeps every channel layer `name` produces, reads or carries."""
        if name in self._module_root:
            self._frozen.setdefault(self._module_root[name], reason)
        for table in (self._consumers, self._depthwise, self._attached):
            self._freeze(table.get(name), reason)

    def _freeze_reparametrized(self) -> None:
        """Layers whose weight is computed from others (`torch.nn.utils.parametrizations`, the older
        `weight_norm` / `spectral_norm` hooks) cannot be sliced by replacing the weight (a parametrization's
        setter writes into its original in place, a hook recomputes the weight): keep their channels."""
        from torch.nn.utils import parametrize

        for name, m in self.modules.items():
            hooks = [type(h).__name__ for h in m._forward_pre_hooks.values()]
            kind = "a parametrization" if parametrize.is_parametrized(m) else next(
                (h for h in hooks if h in ("WeightNorm", "SpectralNorm")), None)
            if kind is None:
                continue
            self._freeze_layer(name, f"{name!r} has {kind} on its weight (remove it to prune this layer)")

    def _finish_groups(self) -> None:
        self._freeze_tied_parameters()
        self._freeze_reparametrized()
        for root, parts in self._split_parts.items():
            # A chunked output that is also coupled to other layers (or frozen) cannot be split alone.
            coupled = [r for _, r in self._producers if r != root and self._find(r) == self._find(root)]
            reason = next((why for r, why in self._frozen.items() if self._find(r) == self._find(root)), None)
            if coupled or reason:
                why = reason or "a chunked output that is also added to another layer's"
                self._frozen.setdefault(parts[0], why)
                self._frozen.setdefault(root, why)
        classes: dict[int, list[int]] = {}
        for _, root in self._producers:
            classes.setdefault(self._find(self._unit(root)), []).append(root)
        frozen_class = {}
        for root, reason in self._frozen.items():
            frozen_class.setdefault(self._find(root), reason)
        self._group_of_rep: dict[int, str] = {}
        self.groups: list[Group] = []
        self.frozen_groups: list[Group] = []
        for rep, roots in classes.items():
            members = [self._producer_of[r] for r in roots]
            group = Group(members[0], self._root_size[rep], members)
            if rep in frozen_class:
                group.prunable, group.reason = False, frozen_class[rep]
                self.frozen_groups.append(group)
            else:
                self.groups.append(group)
            self._group_of_rep[rep] = group.name
        self._groups_by_name = {g.name: g for g in self.groups + self.frozen_groups}

    def broadcast_at(self, name: str) -> str | None:
        """Where group `name`'s one channel is broadcast onto a wider tensor (so it cannot gain channels), or
        None."""
        group = self.group(name)
        rep = self._find(self._unit(self._module_root[group.name]))
        return next((where for root, where in self._broadcast.items() if self._find(root) == rep), None)

    # ------------------------------------------------------------------------------------------ groups
    def group(self, name: str) -> Group:
        """The group (prunable or frozen) called `name`."""
        if name not in self._groups_by_name:
            raise KeyError(f"ChannelGraph: no group {name!r}; groups: {[g.name for g in self.groups]}")
        return self._groups_by_name[name]

    def group_of(self, module_name: str) -> Group:
        """The group whose channels `module_name` produces."""
        root = self._module_root.get(module_name)
        if root is None:
            raise KeyError(f"ChannelGraph: {module_name!r} does not produce channels (not a conv or linear layer)")
        return self._groups_by_name[self._group_of_rep[self._find(self._unit(root))]]

    # ------------------------------------------------------------------- what carries a group's channels
    def _tables(self):
        """`(module name, role, layout)` for every module whose tensors carry channels (see `_ROLE_TENSORS`)."""
        for name, root in self._producers:
            yield name, "producer", (Segment(root, self._root_size[root]),)
        for name, lay in self._consumers.items():
            yield name, "consumer", lay
        for name, lay in self._depthwise.items():
            yield name, "depthwise", lay
        for name, lay in self._attached.items():
            yield name, "norm", lay

    def _segments(self, lay):
        """`(offset, segment, group name or None)` along a tensor's channel dimension, for each segment of its
        layout; a chunked root is the concatenation of its parts."""
        offset = 0
        for seg in lay or ():
            split = self._split_parts.get(seg.root)
            for part in ([Segment(p, seg.size // len(split), seg.block) for p in split] if split else [seg]):
                yield offset, part, self._group_of_rep.get(self._find(part.root))
                offset += part.width

    def _member(self, root: int) -> str | None:
        return self._producer_of.get(self._part_of.get(root, root))

    def channel_params(self, name: str) -> list[ChannelParam]:
        """Every parameter and buffer that carries channels of group `name`, with the dimension and positions
        along which it does (see `ChannelParam`): producer weight rows and biases, the weights, biases and
        running statistics of norms over the channels, depthwise filters and biases, consumer weight columns.

        Criteria read scores from these tensors, the cost model counts them, and regularisers act on them; what
        pruning a channel removes from each tensor is exactly `index[channel]` along `dim`.
        """
        self.group(name)  # a KeyError for an unknown group
        entries = [(module, role, lay, _ROLE_TENSORS[role]) for module, role, lay in self._tables()]
        entries += [(module, "scale", lay, ((attr, dim),)) for (module, attr), (lay, dim) in self._scales.items()]
        found = []
        for module, role, lay, tensors in entries:
            positions, member = [], None
            for offset, seg, owner in self._segments(lay):
                if owner != name:
                    continue
                channels = torch.arange(seg.size).unsqueeze(1) * seg.block + torch.arange(seg.block)
                positions.append(channels + offset)
                member = member or (module if role == "producer" else self._member(seg.root))
            if not positions:
                continue
            index = torch.cat(positions, 1)
            m = self.modules[module]
            for attr, dim in tensors:
                tensor = getattr(m, attr, None)
                if isinstance(tensor, torch.Tensor):
                    found.append(ChannelParam(module, attr, dim, index, role, member, tensor))
        return found

    def _channel_indices(self, name: str, channels, where: str) -> torch.Tensor:
        """`channels` of group `name` (indices or a `[group.size]` boolean mask) as checked int64 indices."""
        group = self.group(name)
        channels = torch.as_tensor(channels)
        if channels.dtype == torch.bool:
            if channels.shape != (group.size,):
                raise ValueError(f"ChannelGraph.{where}: a mask for group {name!r} must have shape "
                                 f"[{group.size}], got {list(channels.shape)}")
            channels = channels.nonzero().squeeze(1)
        if channels.is_floating_point() or channels.dim() != 1:
            raise TypeError(f"ChannelGraph.{where}: channels must be 1-D integer indices or a boolean mask")
        if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= group.size):
            raise ValueError(f"ChannelGraph.{where}: channels of group {name!r} must lie in [0, {group.size})")
        return channels.long().cpu()

    @torch.no_grad()
    def scale_channels(self, name: str, channels, factor: float) -> None:
        """Multiplies, in place, what produces channels `channels` of group `name` by `factor`: producer weight
        rows and biases, norm weights and biases, depthwise filters and biases (consumers' columns and running
        statistics are left alone). At `factor=0` the channels are silenced, and the model computes what it
        would compute with them pruned (exactly, unless a norm normalises over them together with others).

        Args:
            name: a group name.
            channels: indices in `[0, group.size)` (a tensor or a list), or a `[group.size]` boolean mask.
            factor: the multiplier (a float).
        """
        channels = self._channel_indices(name, channels, "scale_channels")
        for p in self.channel_params(name):
            if p.role == "consumer" or p.attr.startswith("running_"):
                continue
            positions = p.index[channels].reshape(-1).to(p.tensor.device)
            where = (slice(None),) * p.dim + (positions,)
            p.tensor[where] = p.tensor[where] * factor

    @torch.no_grad()
    def reset_channels(self, name: str, channels, generator: torch.Generator | None = None) -> None:
        """Gives channels `channels` of group `name`, in place, the values `widen` gives new channels: producer
        rows and depthwise filters drawn at the scale of the group's other channels (from `generator`), biases
        zero, norms the identity (running statistics too), per-channel scales the mean of the others, and the
        consumers' input columns zero, so the model computes what it computes with those channels silenced.

        What it is for: a channel silenced by `scale_channels(..., 0)` has zero producer rows and zero norm
        weight and bias, so no gradient reaches it (the norm's output is constant, the ReLU after it flat) and
        training alone never brings it back; reset, it trains again (its outgoing columns first, from zero).
        `channels` as in `scale_channels`.
        """
        surgery.reset(self, name, self._channel_indices(name, channels, "reset_channels"), generator)

    # ------------------------------------------------------------------------------------------ pruning
    def prune(self, keep: dict) -> nn.Module:
        """Keeps exactly the channels `keep[name]` (in that order) of each named group; returns the model.

        The arguments are checked before anything changes, and a failure while slicing or re-tracing undoes
        every change, so on error the model is left as it was. Groups not in `keep` are untouched. The graph is
        rebuilt afterwards, so the same `ChannelGraph` can prune again. See `gpp_ext.pruning.surgery`.

        Every sliced tensor is replaced by a new one (a new `nn.Parameter` for a parameter, `requires_grad` kept):
        an optimiser made before holds the old tensors and would train nothing; make it after the change.
        """
        return surgery.prune(self, keep)

    def widen(self, add: dict, generator: torch.Generator | None = None) -> nn.Module:
        """Appends `add[name]` new channels (an int >= 1) to each named group; returns the model.

        The inverse of `prune`, through the same tables: the new channels come last in each group, their
        producer rows and depthwise filters drawn at the scale of the existing ones (from `generator`), biases
        zero, norms the identity, and the consumers' new input columns zero, so the widened model computes
        exactly what it did (a group normalised across channels by a LayerNorm or GroupNorm is refused). Checked
        before anything changes and undone on failure, like `prune`; the graph is rebuilt afterwards. Like
        `prune`, it replaces the tensors it changes: make an optimiser after it.
        """
        return surgery.widen(self, add, generator)

    def __repr__(self) -> str:
        return (f"ChannelGraph({type(self.model).__name__}: {len(self.groups)} prunable groups, "
                f"{len(self.frozen_groups)} frozen)")
