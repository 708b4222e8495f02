"""`python -m hf_mae COMMAND ...`: the same as the `hf-mae` console script (see [`hf_mae.cli.main`])."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
