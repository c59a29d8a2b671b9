"""API-key check: everything but the health probes and the API description needs a key when keys
are configured (``/metrics`` only with ``FUNDUS_METRICS_AUTH``).

Keys come from ``FUNDUS_API_KEYS``; a client sends ``Authorization: Bearer <key>`` or ``X-API-Key``.
Every configured key is compared in constant time, so timing reveals neither which key nearly
matched nor how many characters did.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import Request

from service.errors import ApiError
from service.state import get_state

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="fundus"'}


def presented_key(request: Request) -> str | None:
    header = request.headers.get("x-api-key")
    if header:
        return header.strip()
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_matches(presented: str, keys: list[str]) -> bool:
    candidate = presented.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode())
    return matched


def check_api_key(request: Request) -> None:
    keys = get_state(request).settings.api_key_list
    if not keys:
        return
    presented = presented_key(request)
    if presented is None:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required (Authorization: Bearer or X-API-Key)",
            headers=_CHALLENGE,
        )
    if not key_matches(presented, keys):
        raise ApiError(401, "unauthorized", "invalid API key", headers=_CHALLENGE)


# Declared for the OpenAPI document only (an "Authorize" button with both ways of sending a key);
# the check itself is ``check_api_key``, which also runs when no key is configured.
BEARER = HTTPBearer(auto_error=False, description="an API key from FUNDUS_API_KEYS")
KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key from FUNDUS_API_KEYS")


async def require_api_key(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
    _header: Annotated[str | None, Depends(KEY_HEADER)] = None,
) -> None:
    """FastAPI dependency for everything but the health probes and the API description."""
    check_api_key(request)


async def require_metrics_key(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None,
    _header: Annotated[str | None, Depends(KEY_HEADER)] = None,
) -> None:
    """FastAPI dependency for ``/metrics``: open unless ``FUNDUS_METRICS_AUTH`` is on."""
    if get_state(request).settings.metrics_auth:
        check_api_key(request)
