"""Frontend: one whole training step (forward, loss, backward, optionally the optimizer update) as one
joint graph, captured on fake tensors so that nothing is allocated (a 7B-shaped model on the meta device
captures on a laptop).

The step is traced with `make_fx(tracing_mode="fake")` over `torch.func.functional_call` plus
`torch.autograd.grad`; the backward ops in the graph are the ones the autograd engine runs eagerly, in its
order. The optimizer update, when asked for, is written with in-place ops (`mul_`, `addcdiv_`...) like
torch.optim's single-tensor path, so parameters and optimizer state keep their storage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx

from memplan.errors import CaptureError
from memplan.ir.frontends.fx_lower import Capture, layer_of, lower_fx, tied_state
from memplan.ir.graph import Role

Optimizer = Literal["none", "sgd", "adamw"]
LossFn = Callable[..., torch.Tensor]


def _adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
    """One AdamW update, in place (step-1 bias correction folded into constants; values don't matter for
    memory, the op sequence and storages do)."""
    lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.01
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / (1 - b2)).sqrt_().add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - b1))


def _make_step(
    model: torch.nn.Module, loss_fn: LossFn, names: list[str], optimizer: Optimizer
) -> Callable[..., Any]:
    def step(
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        state: list[torch.Tensor],
        *inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        loss = torch.func.functional_call(model, (params, buffers), inputs, tie_weights=True, strict=False)
        loss = loss_fn(loss, *inputs) if loss_fn is not None else loss
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        with torch.no_grad():
            for i, (n, g) in enumerate(zip(names, grads, strict=True)):
                if optimizer == "sgd":
                    params[n].add_(g, alpha=-1e-3)
                elif optimizer == "adamw":
                    _adamw_update(params[n], g, state[2 * i], state[2 * i + 1])
        return (loss.detach(), *grads)

    return step


def capture_train_step(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    loss_fn: LossFn | None = None,
    optimizer: Optimizer = "none",
    name: str | None = None,
) -> Capture:
    """Capture forward + loss + backward (+ optimizer update) of `model` on `example_inputs`.

    `model(*example_inputs)` must return the loss, or `loss_fn(output, *example_inputs)` must. Outputs of
    the graph: the loss, then one gradient per trainable parameter (role GRADIENT).
    """
    ties = tied_state(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {**dict(model.named_buffers()), **frozen}
    names = list(params)
    state = [torch.zeros_like(params[n]) for n in names for _ in range(2)] if optimizer == "adamw" else []
    step = _make_step(model, loss_fn, names, optimizer)  # type: ignore[arg-type]
    try:
        with _module_spans(model) as spans:
            gm = make_fx(step, tracing_mode="fake", _allow_non_fake_inputs=True)(
                params, buffers, state, *example_inputs
            )
    except Exception as e:
        raise CaptureError(
            f"could not trace a training step of {type(model).__name__}: {type(e).__name__}: {str(e)[:500]}\n"
            "The model must return its loss (or pass loss_fn) and run on the example inputs."
        ) from e
    _annotate_modules(gm, spans)
    return _lower_step(gm, name or type(model).__name__, names, list(buffers), len(state), ties)


def _node_count() -> int:
    mode = get_proxy_mode()
    return len(mode.tracer.graph.nodes) if mode is not None else 0


@contextmanager
def _module_spans(model: torch.nn.Module) -> Iterator[list[tuple[int, int, str]]]:
    """Record, while tracing, which range of graph nodes each submodule's forward created:
    `(first node index, end node index, module path)`. make_fx's own module stack does not see modules
    called through `functional_call`, so global forward hooks count the tracer's nodes instead."""
    names = {id(m): n for n, m in model.named_modules() if n}
    spans: list[tuple[int, int, str]] = []
    stack: list[tuple[str, int]] = []

    def pre(mod: torch.nn.Module, args: Any) -> None:
        if id(mod) in names:
            stack.append((names[id(mod)], _node_count()))

    def post(mod: torch.nn.Module, args: Any, out: Any) -> None:
        if id(mod) in names and stack:
            path, start = stack.pop()
            spans.append((start, _node_count(), path))

    hooks = [
        torch.nn.modules.module.register_module_forward_pre_hook(pre),
        torch.nn.modules.module.register_module_forward_hook(post),
    ]
    try:
        yield spans
    finally:
        for h in hooks:
            h.remove()


def _annotate_modules(gm: torch.fx.GraphModule, spans: list[tuple[int, int, str]]) -> None:
    """Give every node a module path: forward nodes the innermost module whose span holds them; backward
    nodes (outside every span) the deepest path among the forward values they read (saved activations),
    else the previous node's, so that a layer's backward ops carry that layer's index."""
    nodes = list(gm.graph.nodes)
    best: dict[int, tuple[int, str]] = {}
    for start, end, path in spans:
        for i in range(start, min(end, len(nodes))):
            if i not in best or end - start < best[i][0]:
                best[i] = (end - start, path)
    paths: dict[str, str] = {}
    forward: set[str] = set()
    prev = ""
    for i, node in enumerate(nodes):
        if node.op != "call_function":
            continue
        if i in best:
            path = best[i][1]
            forward.add(node.name)
        else:  # backward: the deepest path among the forward values it reads (a layer's beats the model's)
            inherited = [
                paths[a.name] for a in node.all_input_nodes if a.name in forward and paths.get(a.name)
            ]
            path = max(inherited, key=lambda q: (layer_of(q) is not None, len(q)), default=prev)
        paths[node.name] = prev = path
        if path:
            node.meta["nn_module_stack"] = {path: (path, "")}


def _lower_step(
    gm: torch.fx.GraphModule,
    name: str,
    params: list[str],
    buffers: list[str],
    n_state: int,
    ties: dict[str, str],
) -> Capture:
    """Name the placeholders (flattened in call order: params, buffers, state, inputs) and outputs."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    roles: dict[str, Role] = {}
    state_names: dict[str, str] = {}
    kinds = [(p, Role.PARAMETER) for p in params] + [(b, Role.BUFFER) for b in buffers]
    kinds += [
        (f"optimizer_state.{params[i // 2]}.{'exp_avg_sq' if i % 2 else 'exp_avg'}", Role.OPTIMIZER_STATE)
        for i in range(n_state)
    ]
    for ph, (qual, role) in zip(placeholders, kinds, strict=False):
        roles[ph] = role
        state_names[ph] = qual
    by_qual = {q: ph for ph, q in state_names.items()}
    ph_ties = {by_qual[a]: by_qual[b] for a, b in ties.items() if a in by_qual and b in by_qual}
    seed = _autograd_seed(gm)
    if seed is not None:  # held by the caller's backward (autograd's grad_output) until it ends: an input
        roles[seed] = Role.INPUT
    out_roles: list[Role | None] = [Role.OUTPUT] + [Role.GRADIENT] * len(params)
    return lower_fx(gm, name, roles, state_names, out_roles, ph_ties)


def _autograd_seed(gm: torch.fx.GraphModule) -> str | None:
    """The node that makes the gradient of the loss (`ones_like` of the loss, the first op of backward)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    loss = output.args[0][0]
    while loss.op == "call_function" and loss.target == torch.ops.aten.detach.default:
        loss = loss.args[0]
    return next(
        (
            u.name
            for u in loss.users
            if u.op == "call_function" and u.target == torch.ops.aten.ones_like.default
        ),
        None,
    )
