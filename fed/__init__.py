"""fed: mailferry's SMTP routing hub (the patent's routing center FED with directory DIR).

A standalone server: it imports nothing from ``reconciler/``, which drives it over the
control API. See ``app.py`` for how the pieces fit and ``docs/fed-api.md`` for the API.
"""
