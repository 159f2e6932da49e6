"""The engine-neutral connector layer: what any engine adapter (vLLM's in
kvdepot.integrations.vllm; SGLang's later) needs to use a kvdepot server, and nothing of any
engine's API.

Scheduler half: ``link`` (connect, register, outages) and ``lookups`` (lookups in flight,
their results, the leases they hold). Worker half: ``transfers`` (one rank's loads and stores:
the I/O thread, ``jobs`` against the server, ``engine_loads`` on the engine's thread),
``boot_copier`` and ``copier`` (bytes between the engine's blocks and the arena). Shared:
``specs`` (the load and store plans), ``settings``, ``counters``, ``logs``.

An adapter reads its engine's requests, plans and blocks, turns them into specs, and answers
its engine's questions from these parts.
"""
