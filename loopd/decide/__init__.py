"""Decisions: the engine, incidents, guards, ``for:`` timers and throttles.

The only writer of incident and guard state."""
