"""fed: mailferry's SMTP routing hub (the patent's routing center FED with directory DIR).

A standalone server: it imports nothing from ``reconciler/``, which drives it over the
control API. See ``app.py`` for how the pieces fit and ``docs/fed-api.md`` for the API.

The code lives in rooms, one sub-package per concern, importing one way only (an arrow
is "may import"; nothing imports upwards, and smtp and delivery ignore each other)::

    app · procs · cli · __main__        on top: wire the rooms together, run a node
      └─► admin/      control (HTTP API) · queueadmin (what `fed queue` does) · queuectl
            ├─► smtp/      server · protocol · policy · auth · tls          (mail in)
            └─► delivery/  scheduler · smtpclient · bounce                  (mail out)
                  └─► routing/   directory · holds · shared_db · nodes · node_agent
                        └─► queue/     spool · queuefile · blanks · groupcommit · store
                              └─► telemetry/  metrics · logs

routing sits above queue because the holds keep their node-local copy in the queue's
store (``queue/store.py``), and telemetry is at the bottom because the spool counts
what it accepts. Any room may import ``mailferry.mail`` (addresses, back-off, Message-IDs),
which imports nothing of fed. docs/fed.md has the map of each room.
"""
