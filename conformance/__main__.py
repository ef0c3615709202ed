"""``python -m conformance`` is the ``llm-conformance`` command."""

from .cli import main

main()
