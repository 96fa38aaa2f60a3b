"""``python -m mchad.registry keys`` (the method keys, table order) or
``python -m mchad.registry experiments paper|openood|osr [KEY...]``: one name a line, for the
bash scripts; an unknown key or kind exits 2 naming it."""

import sys

from mchad.registry import KINDS, experiments, keys


def main(argv: list[str]) -> int:
    if argv[:1] == ["keys"] and len(argv) == 1:
        print("\n".join(keys()))
        return 0
    if len(argv) >= 2 and argv[0] == "experiments" and argv[1] in KINDS:
        unknown = [k for k in argv[2:] if k not in keys()]
        if unknown:
            print(f"error: unknown method {' '.join(unknown)} (one of {' '.join(keys())})", file=sys.stderr)
            return 2
        print("\n".join(experiments(argv[1], argv[2:] or None)))
        return 0
    print(f"usage: python -m mchad.registry keys | experiments {{{','.join(KINDS)}}} [KEY...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
