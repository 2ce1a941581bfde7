"""Runs: the dispatcher, the workflow runner, task kinds, evidence (confirm), run states and
typed run progress.

The only writer of run state."""
