"""Mail plumbing every part of mailferry shares (one copy of each idea).

- `addresses`: access and physical addresses, comparison keys, IDN (one parser);
- `imap`: the modified UTF-7 codec, quoting, Maildir flag maps, one pipelined asyncio IMAP
  client and a small blocking wrapper over it;
- `messageid`: the Message-ID of a message or a header section;
- `http`: one HTTP client, connections kept alive, a timeout per route;
- `backoff`: one retry schedule, exponential with a cap and optional jitter.

fed, the maildir system, the station agent and the reconciler import from here; this
package imports none of them.
"""
