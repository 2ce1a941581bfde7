"""loopd: an event-driven closed-loop remediation daemon."""

from __future__ import annotations

__version__ = "0.1.0"
