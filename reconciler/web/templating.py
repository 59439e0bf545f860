"""The Jinja2 environment of the status page and the HTML wave report.

Autoescaping is on for every template (not only files named .html) and undefined names are
errors: a value from a spec, a mailbox or a server is always shown as text.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import jinja2

from reconciler.humanize import human_bytes, human_duration
from reconciler.jobs.view import age
from reconciler.status import STATE_FILTERS
from reconciler.web import svg
from reconciler.web.views import SEGMENTS

TEMPLATES = Path(__file__).resolve().parent / "templates"
FAILURES_SHOWN = 50  # on the overview; the table's "failed" filter lists them all
JOBS_SHOWN = 200  # the workers' jobs on the overview (as many as the fleet runs at once)


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%SZ")


def templates() -> jinja2.Environment:
    """The templates, autoescaping everything."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    env.filters.update(bytes=human_bytes, duration=human_duration, stamp=stamp, age=age)
    env.globals.update(svg=svg, SEGMENTS=SEGMENTS, STATE_FILTERS=STATE_FILTERS,
                       FAILURES_SHOWN=FAILURES_SHOWN, JOBS_SHOWN=JOBS_SHOWN)
    return env
