"""Operator actions from the web: enqueue, dequeue, promote, autohold.

Read-only is the default: these answer 403 until `web: admin-token` (or
`admin-token-file`) is set in zuul.yaml, and then only to a request that
carries it as `Authorization: Bearer <token>`. The checks and the request
itself are the CLI's (zuul_lite/management.py), so a refusal is the same
sentence and leaves the queue as it was.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from zuul_lite import autohold, management
from zuul_lite import config as zconfig
from zuul_lite.exceptions import ZuulLiteError
from zuul_lite.state import ZuulState

log = logging.getLogger("zuul_lite.web.operator")


class OperatorRequest(BaseModel):
    change: int = Field(ge=1)
    patchset: int | None = Field(default=None, ge=1)


class AutoholdBody(BaseModel):
    project: str
    job: str
    reason: str
    count: int = 1
    change: int | None = Field(default=None, ge=1)


def make_router(state: ZuulState, cfg: zconfig.ZuulConfig) -> APIRouter:
    router = APIRouter()
    bearer = HTTPBearer(auto_error=False)

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not cfg.web_admin_token:
            raise HTTPException(
                403, "Operator actions are off on this server (no web: admin-token in zuul.yaml)."
            )
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), cfg.web_admin_token.encode()):
            raise HTTPException(
                401,
                "Operator actions need the admin token as 'Authorization: Bearer <token>'.",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @router.post("/api/pipeline/{pipeline}/{kind}", status_code=202)
    def operator_action(
        pipeline: str, kind: str, body: OperatorRequest, _: None = Depends(authorised)
    ) -> JSONResponse:
        try:
            said = management.request(cfg, state, kind, pipeline, body.change, body.patchset)
        except ZuulLiteError as error:
            return JSONResponse({"detail": str(error)}, 400)
        log.info("Operator request from the web: %s", said)
        return JSONResponse({"detail": said}, 202)

    @router.get("/api/autohold")
    def autohold_list() -> list[dict]:
        return [{**r.to_dict(), "id": r.id} for r in autohold.requests(state)]

    @router.post("/api/autohold", status_code=202)
    def autohold_add(body: AutoholdBody, _: None = Depends(authorised)) -> JSONResponse:
        try:
            said = management.add_autohold(
                cfg, state, body.project, body.job, body.reason, body.count, body.change
            )
        except ZuulLiteError as error:
            return JSONResponse({"detail": str(error)}, 400)
        log.info("Operator request from the web: %s", said)
        return JSONResponse({"detail": said}, 202)

    @router.delete("/api/autohold/{request_id}")
    def autohold_delete(request_id: str, _: None = Depends(authorised)) -> JSONResponse:
        try:
            said = management.delete_autohold(state, request_id)
        except ZuulLiteError as error:
            return JSONResponse({"detail": str(error)}, 404)
        log.info("Operator request from the web: %s", said)
        return JSONResponse({"detail": said})

    return router
