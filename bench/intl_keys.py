"""What one key per address costs (International addresses, issue 17).

Since the specs hold every address as its key (`mailferry.mail.addresses.address_key`:
the domain with A-labels, the local part in NFC) instead of `str.lower()`, each address of a
spec set pays a little more when the specs load, and fed pays it on every RCPT. This
measures, interleaved in one run (the machine is shared):

1. `address_key` against `str.lower()` for an ASCII address, an IDN domain and a UTF-8
   local part (per call, best of 5 rounds of 200,000);
2. `load_specs` of `bench/plan_scale.py`'s spec set (N mailboxes, three quarters with an
   alias) as it is, and with the loader's key replaced by `str.lower()` (what main did
   before; best of 5, alternating).

Usage: `python bench/intl_keys.py [--mailboxes 20000]`. Run by hand, never in the suite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import timeit
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def per_call() -> None:
    from mailferry.mail.addresses import address_key

    for text in ("jean.dupont1234@corp.example", "info@b\u00fccher.example",
                 "j\u00fcrgen@xn--bcher-kva.example"):
        key = min(timeit.repeat(partial(address_key, text), number=200_000, repeat=5))
        low = min(timeit.repeat(text.lower, number=200_000, repeat=5))
        print(f"{text:32} address_key {key / 0.2:6.2f} us  lower {low / 0.2:5.2f} us  "
              f"x{key / low:.1f}")


def spec_load(n: int) -> None:
    from plan_scale import generate

    from reconciler.spec import loader

    root = Path(tempfile.mkdtemp(prefix="intl-keys-"))
    specs, _, _ = generate(root, n)
    keyed = loader._Loader.address

    def lowered(self: Any, doc: Any, path: Any, text: str) -> str:
        return text.lower()

    times: dict[str, list[float]] = {"key": [], "lower": []}
    for _ in range(5):
        for name, fn in (("key", keyed), ("lower", lowered)):
            loader._Loader.address = fn  # type: ignore[method-assign]
            times[name].append(min(timeit.repeat(lambda: loader.load_specs(specs),
                                                 number=1, repeat=1)))
    loader._Loader.address = keyed  # type: ignore[method-assign]
    best = {name: min(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"load_specs {n} mailboxes, {name:5}: " + " ".join(f"{v:.2f}" for v in values)
              + f"  best {best[name]:.2f} s")
    print(f"key / lower: x{best['key'] / best['lower']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mailboxes", type=int, default=20_000)
    args = parser.parse_args()
    per_call()
    spec_load(args.mailboxes)


if __name__ == "__main__":
    main()
