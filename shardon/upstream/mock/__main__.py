"""``python -m shardon.upstream.mock ...``: `shardon.upstream.mock.cli.main`."""

import sys

from .cli import main

sys.exit(main())
