"""The Jinja2 environment of the HTML pages, and the filters they share."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from zuul_lite.reporter import format_duration

# A URL ends before whitespace, quotes or brackets, and never on the
# punctuation that closes the sentence around it.
URL = re.compile(r"""https?://[^\s<>"']*[^\s<>"'.,;:!?)\]]""")


def when(value: Any) -> str:
    """Epoch seconds as UTC text; anything else (an ISO string already) as it is."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if value is None else str(value)


def linkify(text: Any) -> Markup:
    """Escape plain text and make its URLs clickable: vote messages carry log URLs."""
    text = "" if text is None else str(text)
    parts: list[Markup] = []
    last = 0
    for match in URL.finditer(text):
        parts.append(escape(text[last : match.start()]))
        parts.append(Markup('<a href="{0}">{0}</a>').format(match.group(0)))
        last = match.end()
    parts.append(escape(text[last:]))
    return Markup("").join(parts)


def vote(value: int | None) -> Markup:
    """A vote as "+1"/"-1" coloured by sign; a report without a vote shows nothing."""
    if value is None:
        return Markup("")
    css = "positive" if value > 0 else "negative" if value < 0 else "muted"
    return Markup('<span class="{0}">{1:+d}</span>').format(css, value)


def age(seconds: float | None) -> str:
    """Seconds as the largest two units ("3h 12m", "45s")."""
    if seconds is None:
        return ""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (s, "s")]
    first = next((i for i, (n, _) in enumerate(parts) if n), len(parts) - 1)
    return " ".join(f"{n}{unit}" for n, unit in parts[first : first + 2])


def make_templates(local_changes: bool, history: bool = False) -> Jinja2Templates:
    """Templates that know whether the local inbox and history pages exist
    (for the menu and links)."""
    templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
    templates.env.globals["local_changes"] = local_changes
    templates.env.globals["history"] = history
    templates.env.filters["duration"] = format_duration
    templates.env.filters["when"] = when
    templates.env.filters["linkify"] = linkify
    templates.env.filters["vote"] = vote
    templates.env.filters["age"] = age
    return templates
