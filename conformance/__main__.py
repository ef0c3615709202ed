"""``python -m conformance`` is the ``llm-conformance`` command."""

from .cli import main

if __name__ == "__main__":
    main()
