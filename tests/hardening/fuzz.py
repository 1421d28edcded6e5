"""Run the hardening tests much longer than the suite does.

    python -m tests.hardening.fuzz                   # about 10 minutes of everything
    python -m tests.hardening.fuzz --seeds 500 --examples 100000 --flips 20000

It sets the sizes the tests read from the environment and runs them with pytest, which
prints the figures (crash states, flips, examples) at the end.
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=100, help="crash workloads (default 100)")
    parser.add_argument("--variants", type=int, default=8,
                        help="random crash images per crash point (default 8)")
    parser.add_argument("--examples", type=int, default=20000,
                        help="hypothesis examples per fuzz test (default 20000)")
    parser.add_argument("--flips", type=int, default=5000, help="random bit flips (default 5000)")
    parser.add_argument("what", nargs="*", default=["crash", "fuzz"],
                        help="crash and/or fuzz (default both)")
    args = parser.parse_args()
    os.environ.update(MATTE_CRASH_SEEDS=str(args.seeds), MATTE_CRASH_VARIANTS=str(args.variants),
                      MATTE_FUZZ_EXAMPLES=str(args.examples), MATTE_CRASH_FLIPS=str(args.flips))
    here = os.path.dirname(__file__)
    files = [os.path.join(here, f"test_{name}.py") for name in args.what]
    return pytest.main(["-q", "-s", "-p", "no:cacheprovider", *files])


if __name__ == "__main__":
    sys.exit(main())
