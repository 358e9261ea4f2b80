"""Thin adapter that runs BAFFLE on the Flower framework (``pip install 'baffle[flower]'``).

The only package that imports ``flwr``; importing ``baffle.flower`` itself, ``runconfig``,
``serverstate``, ``watchdog`` or ``cli`` does not, so the core package and the ``baffle`` command
work without Flower installed. The default path uses Flower's public API only; ``node`` (with the
ServerApp's ``accelerate_grid``) is the opt-in accelerator on flwr internals, listed and checked in
``fastpath``.

  runconfig    the TOML run config of ``baffle train`` as a Flower app config, and back (no flwr)
  serverstate  ``ServerRun``: what the server keeps (model, optimizer, cursors, counters; no data)
  wire         the wire format: round plan → ConfigRecord, replies ↔ MetricRecord
  strategy     ``BaffleStrategy`` (configure_train / aggregate_train) and ``NodeBook`` (node ↔ partition)
  server_app   the ``ServerApp``: waits for the nodes, runs the rounds, evaluates on a node, checkpoints, resumes
  client_app   the ``ClientApp``: forward passes only; describes its data; evaluates on its test set
  launch       starts/stops SuperLink, SuperNodes and ``flwr run`` (deployment and simulation)
  watchdog     stops a federation's processes when its launcher dies (even by SIGKILL)
  node         the accelerator: SuperNode with short polls + a long-running ClientApp runtime per SuperNode
  fastpath     every flwr internal the accelerator uses, checked at start-up (fallback: stock path)
  trace        optional per-phase timestamps (``BAFFLE_FLOWER_TRACE``) for benchmarks/flower_rounds.py
  tls          self-signed CA, SuperLink certificate and SuperNode keys for a run (``cryptography``)
  cli          ``baffle deploy`` (argument parser and entry point)
"""
