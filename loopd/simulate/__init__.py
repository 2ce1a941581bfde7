"""Replay recorded events through the real rules, guards and workflows (``loopd simulate``)."""
