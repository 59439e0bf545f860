"""mailferry's reconciler: specs in, patent steps out (docs/design.md)."""
