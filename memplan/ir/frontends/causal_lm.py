"""Frontend: the generation of a Hugging Face causal LM (prefill, then one decode forward per new token) as
a unit-level memory IR.

A *unit* is what a streaming runtime moves weights for: each repeated decoder layer (the children of the
model's longest `ModuleList` of one class), and each other module that owns parameters or buffers itself
(embeddings, final norm, LM head, rotary tables). `profile_generation` runs the model once for the
prompt and twice for one new token on fake tensors (nothing is allocated, so a 70B model profiles on a
laptop) with a dispatch mode that attributes to the running unit its FLOPs and bytes (PyTorch's own
formulas, `op_costs`), its peak live bytes above what was live when it started, and the KV cache it adds.
The call is the one `model.generate` makes (a `DynamicCache`, `use_cache=True`, `logits_to_keep=1`), so
the profile is what generation really does; decode costs are affine in the context length, so two decode
probes give every later step. `generation_graph` lays the profile out as one op per unit call over all
forwards: weights are read by every forward, each layer's KV cache lives from its prefill to the end.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memplan.errors import CaptureError, InvalidInput
from memplan.ir.frontends.op_costs import op_cost
from memplan.ir.graph import Graph, Op, Role, Value


@dataclass(frozen=True, slots=True)
class CallCost:
    """One unit call: arithmetic and traffic, activations live when it starts (KV excluded), and its peak
    live bytes above that (its output, KV it adds and transients)."""

    flops: float
    bytes_read: int
    bytes_written: int
    carried_bytes: int
    peak_extra_bytes: int

    def plus(self, other: CallCost, times: float) -> CallCost:
        """`self + times * other` (a decode call at a longer context, from the per-token slope)."""
        return CallCost(
            self.flops + times * other.flops,
            round(self.bytes_read + times * other.bytes_read),
            round(self.bytes_written + times * other.bytes_written),
            round(self.carried_bytes + times * other.carried_bytes),
            round(self.peak_extra_bytes + times * other.peak_extra_bytes),
        )

    def minus(self, other: CallCost) -> CallCost:
        return CallCost(
            self.flops - other.flops,
            self.bytes_read - other.bytes_read,
            self.bytes_written - other.bytes_written,
            self.carried_bytes - other.carried_bytes,
            self.peak_extra_bytes - other.peak_extra_bytes,
        )


@dataclass(frozen=True, slots=True)
class StateTensor:
    """A parameter or buffer storage: its first name, the other names it goes by (tied), shape, dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    size_bytes: int
    role: Role
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unit:
    """A module the runtime moves weights for: its path, layer index (None outside the repeated layers),
    the state it reads (first names), and its costs in the prefill and in the first decode forward, with
    the decode's change per extra token of context."""

    path: str
    layer: int | None
    state: tuple[str, ...]
    prefill: CallCost
    decode: CallCost
    decode_per_token: CallCost
    kv_prompt_bytes: int = 0
    """Bytes of this layer's KV cache after the prefill."""
    kv_token_bytes: int = 0
    """Bytes its KV cache grows by per generated token."""


@dataclass(frozen=True, slots=True)
class GenerationProfile:
    """A causal LM's generation: units in call order, its state tensors, and the shape it was profiled at."""

    model: str
    layers_path: str
    units: tuple[Unit, ...]
    state: tuple[StateTensor, ...]
    batch: int
    prompt: int
    vocab: int


def find_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The repeated decoder layers: the longest `ModuleList` whose children are all of one class."""
    best: tuple[str, torch.nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1:
            if best is None or len(m) > len(best[1]):
                best = (name, m)
    if best is None:
        raise CaptureError(
            f"{type(model).__name__}: no repeated decoder layers found (a ModuleList of one layer class); "
            "memplan streams causal LMs layer by layer"
        )
    return best


def _units(
    model: torch.nn.Module, layers_path: str, n_layers: int
) -> dict[str, tuple[int | None, list[str]]]:
    """Unit path -> (layer, names of the state it owns), for every unit that owns state."""
    out: dict[str, tuple[int | None, list[str]]] = {}
    prefix = f"{layers_path}."
    for i in range(n_layers):
        out[f"{prefix}{i}"] = (i, [])
    for name, m in model.named_modules():
        if name.startswith(prefix):
            continue
        owned = [*m.named_parameters(recurse=False, remove_duplicate=False)]
        owned += [*m.named_buffers(recurse=False, remove_duplicate=False)]
        if owned:
            out[name] = (None, [])
    for kind in ("named_parameters", "named_buffers"):
        for full, _ in getattr(model, kind)(remove_duplicate=False):
            owner = full.rsplit(".", 1)[0] if "." in full else ""
            if owner.startswith(prefix):
                owner = prefix + owner[len(prefix) :].split(".", 1)[0]
            if owner in out:
                out[owner][1].append(full)
    return out


def _state(model: torch.nn.Module) -> tuple[list[StateTensor], dict[str, str]]:
    """One record per parameter or buffer storage, and every name -> the first name of its storage."""
    first: dict[int, str] = {}
    records: dict[str, StateTensor] = {}
    names: dict[str, str] = {}
    for kind, role in (("named_parameters", Role.PARAMETER), ("named_buffers", Role.BUFFER)):
        for name, t in getattr(model, kind)(remove_duplicate=False):
            key = id(t)
            if key in first:
                names[name] = first[key]
                rec = records[first[key]]
                records[first[key]] = replace(rec, aliases=(*rec.aliases, name))
                continue
            first[key] = name
            names[name] = name
            records[name] = StateTensor(
                name, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel() * t.element_size(), role
            )
    return list(records.values()), names


class _UnitMeter(TorchDispatchMode):
    """Attributes every op to the running unit: FLOPs and bytes, and the peak of live storages above the
    unit's start (fresh storages counted once by address, freed when their storage object dies; an op
    whose schema says its output aliases an input makes none)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.unit: str | None = None
        self.start = 0
        self.peak = 0
        self.flops = 0.0
        self.read = 0
        self.written = 0

    def begin(self, unit: str) -> None:
        self.unit, self.start, self.peak = unit, self.current, self.current
        self.flops, self.read, self.written = 0.0, 0, 0

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        aliasing = any(r.alias_info is not None for r in func._schema.returns)
        outs = [] if aliasing else [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t in outs:
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self._live:
                self._live[key] = int(storage.nbytes())
                self.current += self._live[key]
                weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        if self.unit is not None:
            cost = op_cost(func, args, kwargs, out, aliasing)
            self.flops += cost.flops
            self.read += cost.bytes_read
            self.written += cost.bytes_written
        return out


def _kv_bytes(cache: Any) -> list[int]:
    """Bytes of each layer's KV cache (keys and values) in a transformers `DynamicCache`."""
    out = []
    for layer in getattr(cache, "layers", ()):
        n = 0
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                n += t.numel() * t.element_size()
        out.append(n)
    return out


def _one_forward(
    model: torch.nn.Module, meter: _UnitMeter, units: dict[str, Any], ids: torch.Tensor, cache: Any
) -> tuple[list[str], dict[str, CallCost]]:
    """Run one forward under the meter; the unit calls in order and each one's cost."""
    calls: list[str] = []
    costs: dict[str, CallCost] = {}
    kv_before: list[int] = []

    def pre(path: str) -> Any:
        def hook(*_: Any) -> None:
            kv_before[:] = _kv_bytes(cache)
            meter.begin(path)
            calls.append(path)

        return hook

    def post(path: str) -> Any:
        def hook(*_: Any) -> None:
            carried = meter.start - sum(kv_before)
            costs[path] = CallCost(meter.flops, meter.read, meter.written, carried, meter.peak - meter.start)
            meter.unit = None

        return hook

    modules = dict(model.named_modules())
    handles = []
    for path in units:
        if path not in modules:  # a layer not run (see `_probe_layers`)
            continue
        handles.append(modules[path].register_forward_pre_hook(pre(path)))
        handles.append(modules[path].register_forward_hook(post(path)))
    try:
        with torch.no_grad(), meter:
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        del out
    finally:
        for h in handles:
            h.remove()
    return calls, costs


def profile_generation(model: torch.nn.Module, batch: int, prompt: int, name: str = "") -> GenerationProfile:
    """Profile `model`'s generation at `batch` x `prompt` on fake tensors (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import DynamicCache

    if batch < 1 or prompt < 1:
        raise InvalidInput(f"batch and prompt must be at least 1, got {batch} and {prompt}")
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if config is None or vocab <= 0:
        raise CaptureError(f"{type(model).__name__} has no transformers config with a vocab_size")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and prompt + 2 > limit:
        raise InvalidInput(f"prompt of {prompt} tokens does not fit the model's {limit} positions")
    layers_path, layers = find_layers(model)
    owned = _units(model, layers_path, len(layers))
    state, first_name = _state(model)
    probe = _probe_layers(layers)
    was_training = model.training
    model.eval()
    meter = _UnitMeter()
    parent, attr = _parent(model, layers_path)
    if probe < len(layers):
        setattr(parent, attr, torch.nn.ModuleList(list(layers)[:probe]))
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            cache = DynamicCache(config=config)
            ids = torch.zeros(batch, prompt, dtype=torch.long, device=_device(model))
            calls, pre_costs = _one_forward(model, meter, owned, ids, cache)
            kv_prompt = _kv_bytes(cache)
            _, dec1 = _one_forward(model, meter, owned, ids[:, :1], cache)
            kv_one = _kv_bytes(cache)
            _, dec2 = _one_forward(model, meter, owned, ids[:, :1], cache)
    except (CaptureError, InvalidInput):
        raise
    except Exception as e:
        raise CaptureError(
            f"could not run {type(model).__name__}'s generation on fake tensors: {type(e).__name__}: "
            f"{str(e)[:400]}"
        ) from e
    finally:
        setattr(parent, attr, layers)
        model.train(was_training)
    calls = _all_layers(calls, layers_path, probe, len(layers))
    for costs in (pre_costs, dec1, dec2):
        for i in range(probe, len(layers)):
            costs[f"{layers_path}.{i}"] = costs[f"{layers_path}.{probe - 1}"]
    for kv in (kv_prompt, kv_one):
        kv[probe:] = [kv[probe - 1]] * (len(layers) - probe)
    units = []
    for path in calls:
        layer, names = owned[path]
        kv_p = kv_prompt[layer] if layer is not None and layer < len(kv_prompt) else 0
        kv_t = kv_one[layer] - kv_p if layer is not None and layer < len(kv_one) else 0
        reads = tuple(dict.fromkeys(first_name[n] for n in names))
        units.append(
            Unit(path, layer, reads, pre_costs[path], dec1[path], dec2[path].minus(dec1[path]), kv_p, kv_t)
        )
    return GenerationProfile(
        name or type(model).__name__, layers_path, tuple(units), tuple(state), batch, prompt, vocab
    )


def _probe_layers(layers: torch.nn.ModuleList) -> int:
    """How many layers to run: 2 when every layer has the same state shapes (the rest cost what the second
    costs: it sees what every later layer sees, a layer before it), else all of them."""

    def shapes(m: torch.nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        named = [*m.named_parameters(), *m.named_buffers()]
        return [(n, tuple(t.shape), t.dtype) for n, t in named]

    first = shapes(layers[0])
    return 2 if len(layers) > 2 and all(shapes(m) == first for m in layers) else len(layers)


def _parent(model: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    head, _, attr = path.rpartition(".")
    return (model.get_submodule(head) if head else model), attr


def _all_layers(calls: list[str], layers_path: str, probe: int, n: int) -> list[str]:
    """The call order with the layers not run inserted after the last one run."""
    if probe == n:
        return calls
    last = calls.index(f"{layers_path}.{probe - 1}")
    return [*calls[: last + 1], *(f"{layers_path}.{i}" for i in range(probe, n)), *calls[last + 1 :]]


def _device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def forward_costs(profile: GenerationProfile, gen: int) -> list[list[CallCost]]:
    """The cost of every unit call: `[forward][unit]`, the prefill then `gen - 1` decode forwards (the
    last new token comes from the last forward's logits)."""
    out = [[u.prefill for u in profile.units]]
    for f in range(1, max(gen, 1)):
        out.append([u.decode.plus(u.decode_per_token, f - 1) for u in profile.units])
    return out


def generation_graph(profile: GenerationProfile, gen: int) -> Graph:
    """One op per unit call over the whole generation (see the module docstring). Values: the state
    tensors, each layer's KV cache (at its final size, from its prefill to the end), the activations
    carried from one unit to the next, each call's transient workspace, each forward's logits."""
    if gen < 1:
        raise InvalidInput(f"gen must be at least 1 token, got {gen}")
    values: list[Value] = []
    ids: dict[str, int] = {}

    def add(
        name: str,
        size: int,
        dtype: str,
        shape: tuple[int, ...],
        role: Role,
        path: str = "",
        layer: int | None = None,
    ) -> int:
        vid = len(values)
        values.append(Value(vid, name, max(size, 0), dtype, shape, role, None, path, layer))
        return vid

    layer_of = {s: u.layer for u in profile.units for s in u.state}
    unit_of = {s: u.path for u in profile.units for s in u.state}
    for s in profile.state:
        ids[s.name] = add(
            s.name, s.size_bytes, s.dtype, s.shape, s.role, unit_of.get(s.name, ""), layer_of.get(s.name)
        )
    prev = add(
        "input_ids", 8 * profile.batch * profile.prompt, "int64", (profile.batch, profile.prompt), Role.INPUT
    )
    kv: dict[int, int] = {}
    ops: list[Op] = []
    costs = forward_costs(profile, gen)
    for f, row in enumerate(costs):
        for k, (u, c) in enumerate(zip(profile.units, row, strict=True)):
            nxt_carried = row[k + 1].carried_bytes if k + 1 < len(row) else 0
            inputs = [prev, *(ids[s] for s in u.state)]
            outputs = []
            if u.layer is not None and (u.kv_prompt_bytes or u.kv_token_bytes):
                if f == 0:
                    size = u.kv_prompt_bytes + (gen - 1) * u.kv_token_bytes
                    kv[u.layer] = add(f"kv.{u.layer}", size, "bytes", (size,), Role.KV_CACHE, u.path, u.layer)
                    outputs.append(kv[u.layer])
                else:
                    inputs.append(kv[u.layer])
            last = k + 1 == len(row)
            if last:
                logits = 4 * profile.batch * profile.vocab
                out = add(
                    f"logits.{f}",
                    logits,
                    "float32",
                    (profile.batch, 1, profile.vocab),
                    Role.OUTPUT if f + 1 == len(costs) else Role.ACTIVATION,
                )
            else:
                out = add(
                    f"act.{f}.{k}", nxt_carried, "bytes", (nxt_carried,), Role.ACTIVATION, u.path, u.layer
                )
            grown = (u.kv_prompt_bytes if f == 0 else u.kv_token_bytes) if u.layer is not None else 0
            transient = max(c.peak_extra_bytes - values[out].size_bytes - grown, 0)
            # every call has its workspace value (maybe empty): quantized weights add theirs to it
            outputs.append(
                add(f"work.{f}.{k}", transient, "bytes", (transient,), Role.WORKSPACE, u.path, u.layer)
            )
            outputs.insert(0, out)
            op_name = f"{'prefill' if f == 0 else f'decode{f}'}:{u.path}"
            ops.append(
                Op(len(ops), op_name, f"unit:{u.path}", tuple(dict.fromkeys(inputs)), tuple(outputs), c.flops,
                   c.bytes_read, c.bytes_written, u.path, u.layer)
            )  # fmt: skip
            prev = out
    return Graph(profile.model, tuple(values), tuple(ops), (prev,))
