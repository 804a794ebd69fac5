"""Two exact searches racing on two cores: the first answer wins (`SearchParams.parallel`).

The search's running time is heavy-tailed in the preorder: on MiniMalloc's challenging instances one
(preorder, re-ranking) setting often needs a few thousand nodes where another needs a hundred thousand.
`race` forks one child process running the search with the preorders reversed and `dynamic_preorder`
flipped, while this process runs the search as asked; whichever ends first (found, or proven infeasible)
answers, and the other is stopped.

Invariant: the answer is one of the two searches' own answers, and each search is complete, so an
"infeasible" is still a proof and a packing still fits the capacity. Falls back to the plain search where
the 'fork' start method does not exist.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memplan.solvers.packing.problem import Problem
    from memplan.solvers.packing.search import SearchParams, SearchResult

Runner = Callable[["Problem", int, float, "SearchParams", Callable[[], bool]], "SearchResult"]


def rival(params: SearchParams) -> SearchParams:
    """The child's settings: preorders reversed, `dynamic_preorder` flipped, no further racing."""
    return replace(
        params,
        parallel=False,
        dynamic_preorder=not params.dynamic_preorder,
        preorderings=tuple(reversed(params.preorderings)),
    )


def race(
    run: Runner, problem: Problem, capacity: int, timeout_s: float, params: SearchParams
) -> SearchResult:
    """`run` here with `params` and in a forked child with `rival(params)`; the first answer wins."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return run(problem, capacity, timeout_s, replace(params, parallel=False), lambda: False)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    args = (run, problem, capacity, timeout_s, rival(params), send)
    child = ctx.Process(target=_child, args=args, daemon=True)
    child.start()
    send.close()
    try:
        mine = run(problem, capacity, timeout_s, replace(params, parallel=False), recv.poll)
        if mine.outcome.value != "timeout" or not recv.poll():
            return mine
        try:
            theirs: SearchResult = recv.recv()
        except EOFError:  # the child died without an answer: ours stands
            return mine
        return replace(theirs, nodes=theirs.nodes + mine.nodes)
    finally:
        _stop(child.pid)
        child.join(timeout=1.0)
        recv.close()


def _child(
    run: Runner, problem: Problem, capacity: int, timeout_s: float, params: SearchParams, send: Connection
) -> None:
    try:
        send.send(run(problem, capacity, timeout_s, params, lambda: False))
    finally:
        send.close()
        os._exit(0)  # skip the parent's atexit handlers and buffered output in the fork


def _stop(pid: int | None) -> None:
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
