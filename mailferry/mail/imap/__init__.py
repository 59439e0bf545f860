"""IMAP plumbing: `mutf7` (folder names), `quoting`, `flags` (Maildir letters <-> IMAP
flags), `client` (the pipelined asyncio client), `blocking` (a synchronous wrapper over it),
`servers` (what each server family needs)."""
