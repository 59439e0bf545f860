"""Package data: `schemas/` and `examples/` of the source tree (symbolic links here, real
files in an sdist and a wheel). Read through `mailferry.resources`, never by path."""
