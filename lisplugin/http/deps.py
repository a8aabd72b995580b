"""FastAPI dependencies shared by every router: the runtime and a database session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from lisplugin.service.runtime import Runtime
from lisplugin.storage.orm import Case


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def get_session(runtime: Annotated[Runtime, Depends(get_runtime)]) -> Iterator[Session]:
    with runtime.db.session() as session:
        yield session


#: Committed when the route returns, before the response is sent ("function" scope): a client
#: that got an answer finds the change made, and a failed commit is an error, not a lost write.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def case_or_404(session: Session, case_id: int) -> Case:
    case = session.get(Case, case_id)
    if case is None:
        raise HTTPException(status_code=404, detail=f"no case {case_id}")
    return case
