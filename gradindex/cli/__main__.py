"""``python -m gradindex.cli``: the ``gradindex`` command (how torchrun launches a build)."""

from gradindex.cli.main import main

if __name__ == "__main__":  # pragma: no cover
    main()
