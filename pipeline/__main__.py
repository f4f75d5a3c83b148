"""`python -m pipeline` is the `pipeline` command."""

from pipeline.cli import main

if __name__ == "__main__":  # not when a walk process (multiprocessing spawn) imports the main module
    raise SystemExit(main())
