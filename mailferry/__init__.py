"""What every part of mailferry shares and nothing else: fed, the station agent and the
reconciler each import from here, never from one another (DESIGN.md, the layering rule)."""
