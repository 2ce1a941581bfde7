"""The python runner: an async function from a pack's ``actions.py``.

The function takes its input (a pydantic model when its first parameter is
annotated with one, else a dict) and the ActionContext, and returns a dict, a
pydantic model or None. It raises ``ActionError`` (or returns normally).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from loopd.errors import ActionError
from loopd.packs.executor import ActionContext
from loopd.packs.registry import Action


class PythonRunner:
    async def run(self, action: Action, input: dict[str, Any], ctx: ActionContext
                  ) -> dict[str, Any]:
        if action.func is None:
            raise ActionError("python action has no function")
        arg: Any = input
        if action.input_model is not None:
            try:
                arg = action.input_model.model_validate(input)
            except ValidationError as exc:
                err = exc.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                raise ActionError(f"input: {loc}: {err['msg']}") from None
        result = await action.func(arg, ctx)
        if result is None:
            return {}
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json")
        if isinstance(result, dict):
            return result
        return {"result": result}

    async def close(self) -> None:
        return None
