"""Runs: the dispatcher, the workflow runner, task kinds, evidence (confirm), run states.

The only writer of run state."""
