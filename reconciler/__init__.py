"""mailferry's reconciler: specs in, patent steps out (see ../DESIGN in the README)."""
