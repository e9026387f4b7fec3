"""The customer portal: one static page at ``/portal`` over the customer's own ``/v1/me`` API.

Like the operator dashboard (:mod:`app.admin.ui`), the page holds no data and needs no key, so
its route is public. Its script reads the customer key from the URL fragment (``#key=sk-pr-…``,
which a browser never sends to a server) or from a sign-in form, keeps it in ``sessionStorage``,
removes it from the address bar and calls ``/v1/me``, ``/v1/me/usage``, ``/v1/me/sessions`` and
``/v1/me/requests`` with ``x-api-key``: every byte of data is the key's own customer's, through
the same authentication as the relay. Same-origin, so no CORS is involved.

Served with ``Cache-Control: no-store`` and the dashboard's strict Content-Security-Policy (the
page's inline script and style by hash, fetches to this origin only, nothing else).
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import HTMLResponse

from app.admin.ui import static_page

router = APIRouter()


@router.get("/portal", include_in_schema=False)
async def portal() -> HTMLResponse:
    body, headers = static_page("app.portal", "portal.html")
    return HTMLResponse(body, headers=headers)
