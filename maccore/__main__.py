"""``python -m maccore``: the command line of :mod:`maccore.cli`."""
from maccore.cli import main
if __name__ == "__main__":
    raise SystemExit(main())
