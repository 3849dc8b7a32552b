"""The ``gradindex`` command line: thin commands over the library (``main.py``: the group and
the one place errors become ``Error: ...`` lines; ``options.py``: the options commands share;
one module per family of commands)."""
