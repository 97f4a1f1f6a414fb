"""The site's warm ClientApp runner: Flower's process per message, without the import cost.

Why: a Flower 1.41 SuperNode (``flower-superexec``) starts one ``flwr-clientapp`` process
per message (train and evaluate, every round). Each of those imports torch, MONAI, Opacus,
TenSEAL and Flower before it does any work: several seconds per message, most of a demo
round on a small machine.

How: a per-site *warm runner* (a zygote) imports those modules once and waits on a Unix
socket. The ``flwr-clientapp`` that the SuperNode starts is the site's shim (written by
:func:`site_node.federation.processes.write_runner_shim`): a small process that imports
nothing heavy, hands its arguments, environment, working directory and standard streams to
the runner, and waits. The runner forks a *handler* per request, which forks the *worker*:
a copy of the warm runner that runs :func:`site_node.federation.processes.
guarded_clientapp_main` (Flower's ``run_clientapp`` with the bundle check) with those
arguments, then exits. Flower's protocol is unchanged: one process per message, started by
``flower-superexec`` and ending with the message; exit status and signals pass through the
shim. If the runner cannot be reached the shim runs the ClientApp in-process, as before;
once the runner has started a worker there is no fallback, so a message never runs twice.

The parts, each documenting its own share of the security properties:

* :mod:`~site_node.federation.warm.protocol`: the socket path, the frames, the
  :class:`~site_node.federation.warm.protocol.Request` model, the peer check and exit codes
  both ends share (standard library only);
* :mod:`~site_node.federation.warm.shim`: :func:`~site_node.federation.warm.shim.shim_main`
  and :func:`~site_node.federation.warm.shim.run_in_runner`, what the generated
  ``flwr-clientapp`` runs (standard library, the protocol and the site's error root);
* :mod:`~site_node.federation.warm.runner`: the zygote,
  :class:`~site_node.federation.warm.runner.WarmRunner` and
  :func:`~site_node.federation.warm.runner.serve_site`, which run the target they are
  given (socket modes, ``SO_PEERCRED``, fork safety, reseeding, signal forwarding);
* :mod:`~site_node.federation.warm.target`: the site's target, the guarded
  ``flwr-clientapp`` of a state dir, imported only when it runs;
* :mod:`site_node.federation.warm.__main__`: ``python -m site_node.federation.warm
  --state-dir DIR [--socket PATH]``, which serves that target.

Lifetime: the runner exits on SIGTERM/SIGINT, or when the process that started it exits
(its parent pid changes). :func:`~site_node.federation.processes.start_supernode` starts it
next to the SuperNode and returns a handle that stops both; ``site-node supernode`` (the
Helm chart's SuperNode container) starts it before it execs ``flower-supernode``, which
thereby becomes its parent.

Nothing is imported here, so that the shim loads only the protocol and itself.
"""
