"""The status page: `reconcile web`, and `--web HOST:PORT` on `reconcile serve` / `--watch`.

Layers, kopf-like: `views.py` is pure (a snapshot in, view objects out), `snapshot.py` reads
the state store and fed into a snapshot, `app.py` is the aiohttp + Jinja2 layer, `server.py`
runs it in a background thread beside a watch loop or the embedded systems. `svg.py` draws
the charts, shared with the HTML wave report. docs/status-page.md is the user's guide.
"""
