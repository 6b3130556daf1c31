"""``python -m taskmill``: the same as the ``taskmill`` command."""

from taskmill.cli import main

if __name__ == "__main__":
    main()
