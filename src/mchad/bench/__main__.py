"""``python -m mchad.bench``."""

from mchad.bench import main

main()
