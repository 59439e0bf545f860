"""The embedded maildir mail system: a small real mail server for demos and tests.

It hosts mailboxes as Maildir++ folders under one root directory, receives fed's mail over
LMTP and its own users' mail over SMTP submission, and redirects a mailbox through fed when
its account says so. `store` (with `mailfile`) is the on-disk format shared with the
reconciler's driver; `server`, `delivery` and `relay` are the running server; `cli` starts
it. Nothing here imports the reconciler: this is a separate server, as the patent's systems
are.
"""
