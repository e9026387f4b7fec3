"""The operator dashboard: one static page at ``/admin/ui`` over the admin API.

The page holds no data and needs no token, so its route is public (mount this router *without*
``require_admin``). Its script reads the admin token from the URL fragment (``#token=…``, which a
browser never sends to a server) or from a sign-in form, keeps it in ``sessionStorage``, removes
it from the address bar and calls the admin API with ``Authorization: Bearer``: every byte of
data still passes ``require_admin``.

The HTML, with its inline ``<style>`` and ``<script>``, is read once (:func:`read_page`, which
inlines the CSS and script helpers it shares with the customer portal) and served with
``Cache-Control: no-store`` and a Content-Security-Policy that allows exactly those inline
blocks by their SHA-256 hashes (no ``'unsafe-inline'``), fetches to this origin only, and
nothing else: no frames, no form targets, no plugins, no external anything.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from starlette.responses import HTMLResponse

router = APIRouter()

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def _hash_source(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def content_security_policy(html: str) -> str:
    """A CSP that lets the page's own inline script and style run, and nothing else."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in _INLINE.findall(html):
        hashes[kind].append(_hash_source(body))
    none = "'none'"
    directives = [
        "default-src 'none'",
        "script-src " + (" ".join(hashes["script"]) or none),
        "style-src " + (" ".join(hashes["style"]) or none),
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
    return "; ".join(directives)


_INCLUDE = re.compile(r"^[ \t]*/\* include: (common\.css|common\.js) \*/$", re.MULTILINE)


def read_page(package: str, name: str) -> str:
    """A page from ``package``'s ``static`` folder, with each ``/* include: common.css */`` or
    ``/* include: common.js */`` line replaced by that file (here, beside the dashboard): the
    style and script helpers the dashboard and the customer portal share. Inlined, they stay
    under the page's CSP hashes."""
    static = resources.files("app.admin") / "static"

    def common(match: re.Match[str]) -> str:
        return (static / match.group(1)).read_text(encoding="utf-8").rstrip("\n")

    html = (resources.files(package) / "static" / name).read_text(encoding="utf-8")
    return _INCLUDE.sub(common, html)


@lru_cache(maxsize=8)
def static_page(package: str, name: str) -> tuple[bytes, dict[str, str]]:
    """A page (:func:`read_page`) read once, with the headers it goes out with: never cached,
    and its strict CSP."""
    html = read_page(package, name)
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
    }
    return html.encode("utf-8"), headers


@router.get("/admin/ui", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    body, headers = static_page("app.admin", "dashboard.html")
    return HTMLResponse(body, headers=headers)
