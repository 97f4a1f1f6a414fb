"""An import-linter contract type: no import cycles between modules.

import-linter's own ``acyclic_siblings`` contract works on packages (it would forbid
``studies`` -> ``audit`` -> ``studies`` at the package level, which a domain-per-package
layout with routers and services has by design); this one forbids what makes code hard to
read and to load: two or more *modules* that import each other, directly or round a loop.

Configured in ``pyproject.toml``::

    [tool.importlinter]
    contract_types = ["module_cycles: tools.import_contracts.ModuleCyclesContract"]

    [[tool.importlinter.contracts]]
    type = "module_cycles"
    packages = ["consortium_server", "site_node"]

Imports inside ``if TYPE_CHECKING:`` blocks count too (mypy loads them).
"""

from __future__ import annotations

from collections.abc import Iterable

import grimp
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck

__all__ = ["ModuleCyclesContract", "strongly_connected"]


def strongly_connected(nodes: Iterable[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one node, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


class ModuleCyclesContract(Contract):
    """No module of ``packages`` is part of an import cycle."""

    type_name = "module_cycles"

    packages = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        roots = tuple(str(p) for p in self.packages)  # type: ignore[attr-defined]
        modules = {m for m in graph.modules if m.startswith(tuple(f"{r}." for r in roots))}
        modules |= {r for r in roots if r in graph.modules}
        edges = {
            m: {i for i in graph.find_modules_directly_imported_by(m) if i in modules}
            for m in modules
        }
        cycles = strongly_connected(modules, edges)
        details = [
            [
                (a, b, graph.get_import_details(importer=a, imported=b))
                for a in cycle
                for b in sorted(edges[a] & set(cycle))
            ]
            for cycle in cycles
        ]
        return ContractCheck(kept=not cycles, warnings=[], metadata={"cycles": details})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print("These modules import each other:")
            for importer, imported, lines in cycle:
                where = ", ".join(f"l.{d['line_number']}" for d in lines) or "?"
                output.print(f"- {importer} -> {imported} ({where})")
            output.new_line()
