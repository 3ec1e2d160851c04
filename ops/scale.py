"""`sluice scale`: resize running workers' pools through Celery remote control.

- grow / shrink by N: `pool_grow` / `pool_shrink` (these also adjust the prefetch count);
- set to N: grow or shrink each node by the difference from its current size, read from
  `inspect().stats()` (the prefork pool's live process list, not `max-concurrency`, which keeps
  the size the worker started with);
- autoscale MAX,MIN: `autoscale` on nodes started with `--autoscale` (it cannot be switched on
  remotely).

Nodes are chosen by name (`--node postgres@db1`), by role (`--role postgres`: every node named
`postgres@…` or `postgres-N@…`, see ops/workers.py), or all. Only a prefork pool can be resized:
a threads or solo pool has no grow/shrink (the threads pool fails with an AttributeError inside
the worker), so such a node is reported as one that cannot be resized, without asking it. A
node whose autoscaler is on refuses pool_grow/pool_shrink ("not supported with autoscale");
that is reported per node with the way out. Afterwards the new sizes are read back from
`inspect().stats()`, waiting up to `wait` seconds for new processes to start or old ones to
exit (a busy process finishes its page first: a prefork pool shrinks only idle processes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sluice.ops.status import pool_size
from sluice.ops.workers import role_of
from sluice.shared.errors import SluiceError


@dataclass
class NodeResult:
    node: str
    action: str  # "grow 2", "shrink 1", "autoscale 4,1", "none"
    before: int | None
    after: int | None = None
    autoscale: dict[str, int] | None = None  # {"max", "min"} after the change, if autoscaling
    reply: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _stats(app: Any, timeout: float, nodes: Sequence[str] | None) -> dict[str, Any]:
    # With known nodes, stop waiting as soon as all of them answered.
    dest = list(nodes) if nodes else None
    limit = len(dest) if dest else None
    return app.control.inspect(timeout=timeout, destination=dest, limit=limit).stats() or {}


RESIZABLE_POOLS = ("prefork",)


def pool_kind(stats: dict[str, Any]) -> str | None:
    """The pool's kind from `inspect().stats()`: "prefork", "thread", "solo", … (the module of
    its implementation, `celery.concurrency.thread:TaskPool`)."""
    impl = (stats.get("pool") or {}).get("implementation")
    if not isinstance(impl, str):
        return None
    return impl.split(":", 1)[0].rsplit(".", 1)[-1]


def not_resizable(stats: dict[str, Any]) -> str | None:
    """Why this node's pool cannot be resized (None: it can)."""
    kind = pool_kind(stats)
    if kind is None or kind in RESIZABLE_POOLS:
        return None
    return (
        f"cannot be resized: a {kind} pool has a fixed size (only prefork pools grow and"
        " shrink); restart the worker with another --concurrency"
    )


def _autoscale_of(stats: dict[str, Any]) -> dict[str, int] | None:
    auto = stats.get("autoscaler")
    return {"max": int(auto["max"]), "min": int(auto["min"])} if auto else None


def _reply(replies: Any, node: str) -> tuple[str | None, str | None]:
    """(ok message, error message) from a broadcast's replies for one node."""
    for r in replies or []:
        if node in r:
            body = r[node]
            if isinstance(body, dict) and "ok" in body:
                return str(body["ok"]), None
            if isinstance(body, dict) and "error" in body:
                return None, str(body["error"])
            return str(body), None
    return None, "no reply (worker busy or gone?)"


def parse_autoscale(value: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in value.split(",")]
    except ValueError:
        raise SluiceError(f"--autoscale: expected MAX,MIN (integers), got {value!r}") from None
    high, low = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if len(parts) > 2 or low < 0 or high < 1 or low > high:
        raise SluiceError(
            f"--autoscale: expected MAX,MIN with 1 <= MAX and 0 <= MIN <= MAX: {value}"
        )
    return high, low


def scale(
    app: Any,
    *,
    grow: int | None = None,
    shrink: int | None = None,
    set_to: int | None = None,
    autoscale: tuple[int, int] | None = None,
    nodes: Sequence[str] | None = None,
    roles: Sequence[str] | None = None,
    timeout: float = 1.0,
    wait: float = 15.0,
) -> list[NodeResult]:
    """Resize the pools of `nodes` (names), of the nodes of `roles`, or of every node online;
    one result per node. Raises SluiceError when no chosen node answered."""
    if sum(x is not None for x in (grow, shrink, set_to, autoscale)) != 1:
        raise SluiceError("choose one of grow, shrink, set or autoscale")
    for label, n in (("grow", grow), ("shrink", shrink), ("set", set_to)):
        if n is not None and n < 1:
            raise SluiceError(f"--{label}: expected a number >= 1, got {n}")

    before = _stats(app, timeout, nodes)
    if roles:
        before = {n: st for n, st in before.items() if role_of(n) in roles}
    if not before:
        where = f" among {', '.join(nodes)}" if nodes else ""
        if roles:
            where += f" of role {', '.join(roles)}"
        raise SluiceError(
            f"no worker answered within {timeout}s{where}; `sluice status` lists workers online"
        )
    results: dict[str, NodeResult] = {}
    for node in nodes or ():
        if node not in before:
            results[node] = NodeResult(
                node, "none", None, error="did not answer (`sluice status` lists workers online)"
            )

    expected: dict[str, int] = {}
    for node, st in sorted(before.items()):
        size = pool_size(st)
        auto = _autoscale_of(st)
        r = results[node] = NodeResult(node, "none", size, autoscale=auto)
        if autoscale is not None:
            high, low = autoscale
            r.action = f"autoscale {high},{low}"
            replies = app.control.autoscale(
                high, low, destination=[node], reply=True, timeout=timeout, limit=1
            )
            r.reply, r.error = _reply(replies, node)
            if r.error and "not enabled" in r.error:
                r.error += (
                    "; autoscale cannot be switched on remotely: restart the worker with"
                    " `sluice worker --autoscale MAX,MIN`, or use --set/--grow/--shrink"
                )
            continue
        fixed = not_resizable(st)
        if fixed is not None and autoscale is None:
            r.error = fixed
            continue
        if size is None:
            r.error = "pool size unknown (not a prefork pool?)"
            continue
        if set_to is not None:
            delta = set_to - size
        else:
            delta = grow if grow is not None else -(shrink or 0)
        if delta == 0:
            r.reply = f"already {size}"
            continue
        if size + delta < 1:
            r.error = f"would leave {size + delta} processes (the pool has {size}); minimum is 1"
            continue
        command = app.control.pool_grow if delta > 0 else app.control.pool_shrink
        r.action = f"{'grow' if delta > 0 else 'shrink'} {abs(delta)}"
        replies = command(abs(delta), destination=[node], reply=True, timeout=timeout, limit=1)
        r.reply, r.error = _reply(replies, node)
        if r.error and "autoscale" in r.error.lower():
            span = f" ({auto['min']}..{auto['max']})" if auto else ""
            r.error = (
                f"refused: this worker autoscales{span}, so its pool cannot be grown or shrunk"
                f" directly; change its range with `sluice scale --node {node} --autoscale"
                f" MAX,MIN` (worker said: {r.error})"
            )
        elif r.error and "has no attribute" in r.error:  # a pool kind this module does not know
            r.error = f"cannot be resized (worker said: {r.error})"
        elif r.error is None:
            expected[node] = size + delta

    _read_back(app, results, expected, autoscale, timeout, wait)
    return [results[n] for n in sorted(results)]


def _read_back(
    app: Any,
    results: dict[str, NodeResult],
    expected: dict[str, int],
    autoscale: tuple[int, int] | None,
    timeout: float,
    wait: float,
) -> None:
    """Poll stats until every changed node shows its new size (or `wait` runs out)."""
    answered = [n for n, r in results.items() if r.before is not None]
    deadline = time.monotonic() + wait
    while True:
        now = _stats(app, timeout, answered)
        for node in answered:
            st = now.get(node)
            if st is not None:
                results[node].after = pool_size(st)
                results[node].autoscale = _autoscale_of(st)
        settled = all(results[n].after == size for n, size in expected.items())
        if autoscale is not None:
            settled = all(
                results[n].autoscale in (None, {"max": autoscale[0], "min": autoscale[1]})
                for n in answered
                if results[n].ok
            )
        if settled or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    for node, size in expected.items():
        r = results[node]
        if r.after != size and r.ok:
            r.error = (
                f"asked for {size}, still {r.after} after {wait}s"
                " (a busy process exits only after its page; check again with `sluice status`)"
            )


def format_results(results: Sequence[NodeResult]) -> str:
    lines = [f"{'node':<34}{'action':<16}{'before':>7}{'after':>7}  result"]
    for r in results:
        before = "—" if r.before is None else str(r.before)
        after = "—" if r.after is None else str(r.after)
        if r.autoscale:
            after += f" (autoscale {r.autoscale['min']}..{r.autoscale['max']})"
        outcome = r.error if r.error else (r.reply or "ok")
        lines.append(f"{r.node:<34}{r.action:<16}{before:>7}{after:>7}  {outcome}")
    return "\n".join(lines)
