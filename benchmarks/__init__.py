"""Concord's benchmarks: scripts that print figures, and the apps only they run.

A development-only distribution (``benchmarks/pyproject.toml``, ``concord-benchmarks``),
installed next to Concord by ``make install`` (``pip install -e ./benchmarks``) and never
part of the product: nothing in ``concord_protocol``, ``consortium_server``, ``site_node``
or ``concord_demo`` imports it (an import-linter contract in the top-level
``pyproject.toml``). It is installed rather than put on ``sys.path`` because Flower's
processes import its apps by name: the SuperLink's ServerApp process loads
``benchmarks.apps.compare_server:app`` and a site's guarded runner loads
``benchmarks.apps.compare_client:app`` (once that site allowed the comparison bundle with
that ClientApp, see ``site_node.federation.processes``).

The scripts (``benchmarks/<name>.py``) run as ``.venv/bin/python benchmarks/<name>.py``;
:mod:`benchmarks.apps` holds what they share with those processes and with the tests.
"""
