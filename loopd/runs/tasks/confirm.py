"""Confirm tasks: wait for evidence (a matching event, a PromQL query) until a deadline."""

from __future__ import annotations

from typing import Any

from loopd.errors import ConditionError, ConfigError
from loopd.events import Event
from loopd.runs import states
from loopd.runs.evidence import Waiter
from loopd.runs.progress import TaskState
from loopd.runs.tasks.base import INCONCLUSIVE, TaskBase, TaskResult
from loopd.store.base import RunRecord
from loopd.workflow.loader import CompiledTask, Evidence, render_evidence
from loopd.workflow.model import Confirm


class ConfirmTasks(TaskBase):
    async def _confirm(self, run: RunRecord, ct: CompiledTask, ts: TaskState) -> TaskResult:
        confirm = ct.task.confirm
        assert confirm is not None
        deadline = self._begin_waiting(ts, confirm.within)
        evidence, query, why = None, None, None
        if ct.evidence is not None:
            try:
                evidence = render_evidence(ct.evidence, self.wf.scope(run))
            except (ConditionError, ConfigError) as exc:
                why = f"task {ct.name} confirm.event: {exc}"
        if ct.query is not None and self.wf.prometheus is not None:
            try:
                query = str(ct.query(self.wf.scope(run)))
            except ConditionError:
                query = None
        # the step's input is what it waits for, rendered for this run (the trace shows it)
        step = await self._waiting_step(run, ct, ts, states.WAITING,
                                        waiting_for(confirm, evidence, query))
        if why is not None:
            await self._finish(step, states.FAILED, None, why)
            self._settle(run, states.RUNNING)
            return TaskResult(states.FAILED, {}, why, 1, step)
        waiter = None
        if evidence is not None:
            waiter = Waiter(evidence, lambda ev, tv: self.wf.scope(run, event=ev, vars=tv))
            self.hub.add(waiter)
        query_false = 0
        output: dict[str, Any]
        try:
            found = await self._await_evidence(ct, deadline, waiter, query)
            await self.slots.take(run.id)
            if isinstance(found, Event):
                output = {"evidence": "event", "event": found.to_json()}
            elif found is True:
                output = {"evidence": "query"}
            else:
                query_false = -found if isinstance(found, int) and found < 0 else 0
                output = {}
        finally:
            if waiter is not None:
                self.hub.remove(waiter)
            self._settle(run, states.RUNNING)
        against = (waiter.against if waiter else 0) + query_false
        if output and against:
            output["against"] = against  # evidence against came before the confirmation
        status: str
        if output:
            status, error = states.SUCCEEDED, None
        elif against:
            status = states.FAILED
            error = (f"not fixed: {against} piece(s) of evidence against within "
                     f"{confirm.within:g}s")
            if waiter and waiter.last_against:
                output["last_evidence"] = waiter.last_against
        else:
            status, error = INCONCLUSIVE, f"no evidence within {confirm.within:g}s"
        await self._finish(step, status, output, error)
        return TaskResult(status, output, error, 1, step)

    async def _await_evidence(self, ct: CompiledTask, deadline: float, waiter: Waiter | None,
                              query: str | None) -> Event | bool | int:
        """The matching event, True for a query that held, else -(times the query was false)."""
        confirm = ct.task.confirm
        assert confirm is not None
        falses = 0
        while True:
            if query is not None and self.wf.prometheus is not None:
                held = await self.wf.prometheus.holds(query)
                if held:
                    return True
                if held is False:
                    falses += 1
            now = self.clock.now()
            if now >= deadline:
                return -falses
            until = min(deadline, now + confirm.interval) if query is not None else deadline
            if waiter is None:
                await self.clock.sleep_until(until)
                continue
            if await self.clock.wait(waiter.found, until):
                return waiter.found.result()


def waiting_for(confirm: Confirm, evidence: Evidence | None, query: str | None
                ) -> dict[str, Any]:
    """What a confirm step waits for, as its input shows it: the event filter and the
    PromQL query rendered for this run, the deadline and the poll interval."""
    shown: dict[str, Any] = {"within": confirm.within, "interval": confirm.interval}
    if evidence is not None:
        shown["event"] = {
            "source": evidence.source, "topic": evidence.pattern,
            "match": {".".join(path): sorted(values, key=str) if len(values) > 1
                      else next(iter(values), None) for path, values in evidence.match},
            "if": confirm.event.if_ if confirm.event is not None else None}
    if query is not None:
        shown["query"] = query
    return shown
