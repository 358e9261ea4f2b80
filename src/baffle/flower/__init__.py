"""Thin adapter that runs BAFFLE on the Flower framework (``pip install 'baffle[flower]'``).

The only package that imports ``flwr``; importing ``baffle.flower`` itself, ``runconfig`` or ``cli``
does not, so the core package and the ``baffle`` command work without Flower installed.

  runconfig   the TOML run config of ``baffle train`` as a Flower app config, and back (no flwr)
  wire        the wire format: round plan → ConfigRecord, client reply ↔ MetricRecord
  strategy    ``BaffleStrategy``: Message-API strategy (configure_train / aggregate_train)
  server_app  the ``ServerApp``: waits for the nodes, runs the rounds, evaluates, writes the outputs
  client_app  the ``ClientApp``: forward passes only, replies with the K-vector and the example count
  launch      starts/stops SuperLink, SuperNodes and ``flwr run`` (deployment and simulation)
  node        SuperNode with short polls + a long-running ClientApp runtime per SuperNode (the fast default)
  trace       optional per-phase timestamps (``BAFFLE_FLOWER_TRACE``) for benchmarks/flower_rounds.py
  tls         self-signed CA, SuperLink certificate and SuperNode keys for a run (``cryptography``)
  cli         ``baffle deploy`` (argument parser and entry point)
"""
